"""A finished study's artifacts: records, front tables, plots, hypervolume history, export."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from study.spec import StudySpec

# val_: the search's numbers (validation split, search attacks); test_: the verification's (test
# split, final attacks), empty when the trial was not verified (verified says why).
FRONT_COLUMNS = ("number", "defense", "val_clean_accuracy", "val_robust_accuracy", "val_trusted",
                 "test_clean_accuracy", "test_robust_accuracy", "test_trusted", "verified", "params")


def verified_label(record: dict[str, Any]) -> str:
    """``yes``; ``FAILED: <reason>`` for a front trial whose verification failed; ``no`` otherwise."""
    if record.get("verified"):
        return "yes"
    if record.get("verified") is False:
        return f"FAILED: {record.get('final_error') or 'verification failed'}"
    return "no"


def front_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for r in records:
        final = r.get("final") or {}
        rows.append(
            {
                "number": r["number"],
                "defense": r["defense"],
                "val_clean_accuracy": r["val_clean_accuracy"],
                "val_robust_accuracy": r["val_robust_accuracy"],
                "val_trusted": r["trusted"],
                "test_clean_accuracy": final.get("test_clean_accuracy"),
                "test_robust_accuracy": final.get("test_robust_accuracy"),
                "test_trusted": final.get("trusted"),
                "verified": verified_label(r),
                "params": json.dumps({k: v for k, v in r["params"].items() if k != "defense"}, sort_keys=True),
            }
        )
    return rows


def write_csv(rows: list[dict[str, Any]], path: Path) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=FRONT_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return path


def hypervolume_series(spec: StudySpec, records: list[dict[str, Any]]) -> list[float]:
    """Hypervolume of the trusted (clean, robust) search front after each finished trial (validation
    numbers, reference 0, 0): how the search progressed, as the search saw it."""
    from study.results.pareto import hypervolume_history

    points = [
        [r["val_clean_accuracy"], r["val_robust_accuracy"]] if r["status"] == "completed" and r["trusted"] else [0.0, 0.0]
        for r in records
    ]
    return hypervolume_history(points, ["max", "max"], [0.0, 0.0]) if points else []


def write_study_artifacts(
    spec: StudySpec, records: list[dict[str, Any]], front: list[dict[str, Any]], final_front: list[dict[str, Any]]
) -> list[Path]:
    """Write everything into the study folder; returns the paths to log on the parent run."""
    from study.results.export import export_document, front_to_quote, write_export
    from study.results.plots import plot_front_html, plot_front_png, plot_hypervolume_png, plot_timeline_png
    from study.results.plots.defense_fronts import plot_defense_fronts_html, plot_defense_fronts_png

    d = spec.study_dir()
    paths: list[Path] = []
    trials = d / "trials.json"
    tmp = trials.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(records, indent=2, default=str))
    tmp.replace(trials)
    paths.append(trials)
    paths.append(write_csv(front_rows(front), d / "front.csv"))
    best = front_to_quote(records)
    # The verified front plus, marked, the front trials whose verification failed.
    paths.append(write_csv(front_rows(best), d / "front_final.csv"))
    title = f"{spec.name}: accuracy vs robustness ({len(records)} trials)"
    paths.append(Path(plot_front_png(records, d / "front.png", title=title, stage="search")))
    if any(r.get("final") for r in records):
        paths.append(Path(plot_front_png(records, d / "front_final.png", title=title + " — verified", stage="final")))
    paths.append(Path(plot_front_html(records, d / "front.html", title=title)))
    stage = "final" if any(r.get("final") for r in records) else "search"
    per_defense = f"{spec.name}: each defense's own front" + (" (verified)" if stage == "final" else "")
    paths.append(Path(plot_defense_fronts_png(records, d / "front_defenses.png", title=per_defense, stage=stage)))
    paths.append(Path(plot_defense_fronts_html(records, d / "front_defenses.html", title=per_defense, stage=stage)))
    history = hypervolume_series(spec, records)
    with (d / "hypervolume.csv").open("w") as handle:
        handle.write("trials,hypervolume\n")
        handle.writelines(f"{i + 1},{v:.6f}\n" for i, v in enumerate(history))
    paths.append(d / "hypervolume.csv")
    paths.append(Path(plot_hypervolume_png(history, d / "hypervolume.png", title=f"{spec.name}: hypervolume")))
    if any(r.get("started_at") for r in records):
        paths.append(Path(plot_timeline_png(records, d / "timeline.png", title=f"{spec.name}: trials over time")))
    paths.append(write_export(export_document(spec, best), d / "best.yaml"))
    paths.append(d / "spec.yaml")
    paths.append(d / "search_space.json")
    return paths
