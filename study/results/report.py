"""What a finished study prints: its fronts (validation and test numbers, labelled), the short
answer per defense and the hyperparameters that mattered."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def _pct(value: float) -> str:
    return f"{100 * value:5.1f}%"


def format_front(records: list[dict[str, Any]], title: str) -> str:
    """The front as a fixed-width table: validation numbers (search attacks) and, where verified,
    test numbers (final attacks). A front trial whose verification failed says so in the test
    columns; one never verified shows ``-`` there."""
    header = (f"{'#':>4}  {'defense':<10} {'val clean':>9} {'val robust':>10} {'test clean':>10} "
              f"{'test robust':>11}  params")
    lines = [title, header, "-" * len(header)]
    for r in records:
        final = r.get("final") or {}
        # ``cas.recipe`` decides ``training.recipe``: one name=value pair is shown once.
        shown = dict.fromkeys(f"{k.split('.', 1)[-1]}={_short(v)}" for k, v in sorted(r["params"].items()) if k != "defense")
        params = ", ".join(shown)
        if final:
            tc = _pct(final["test_clean_accuracy"])
            tr = _pct(final["test_robust_accuracy"]) + ("" if final.get("trusted", True) else "!")
        else:
            tc, tr = ("UNVERIFIED", "") if r.get("verified") is False else ("-", "-")
        lines.append(
            f"{r['number']:>4}  {r['defense']:<10} {_pct(r['val_clean_accuracy']):>9} "
            f"{_pct(r['val_robust_accuracy']):>10} {tc:>10} {tr:>11}  {params}"
        )
        if r.get("verified") is False:
            lines.append(f"{'':>6}verification failed: {r.get('final_error') or 'unknown error'}")
    if not records:
        lines.append("  (no trusted completed trial)")
    return "\n".join(lines)


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def count_line(name: str, records: Sequence[Mapping[str, Any]], seconds: float) -> str:
    """How the study's trials ended. Stopped early is by design (early stopping), not a fault, so
    it is counted apart from failed (diverged, raised)."""
    done = sum(r["status"] == "completed" for r in records)
    stopped = sum(r["status"] == "stopped" for r in records)
    untrusted = sum(r["status"] == "completed" and not r["trusted"] for r in records)
    return (f"study {name}: {len(records)} trials ({done} completed, {stopped} stopped early, "
            f"{len(records) - done - stopped} failed, {untrusted} untrusted) in {seconds:.0f}s")


def report_study(outcome: Any, spec: Any) -> None:
    records = outcome.records
    print("\n" + count_line(spec.name, records, outcome.seconds))
    from study.results.export import front_to_quote

    print(format_front(outcome.front, f"\nSearch front (validation split; search attacks: "
                                      f"{_attack_names(spec.search_eval)})"))
    if spec.verify:
        print(format_front(front_to_quote(records), f"\nVerified front (test split, untouched by the search; "
                                                    f"final attacks: {_attack_names(spec.final_eval)}) — quote these"))
    else:
        print("\nNo verified front (verify: false): the numbers above are validation numbers of the search attacks")
    _print_answer(outcome, spec)
    print(f"\nresults  {outcome.study_dir}  (front.png, front_defenses.png, front.html, front.csv, best.yaml)")
    print(f"MLflow   {outcome.tracking_uri}")
    storage = spec.storage if "://" in spec.storage else spec.study_dir().parent
    print(f"open the UI:  robust-study ui --storage {storage}   (then http://127.0.0.1:5000)")
    print(f"export:       robust-study export {spec.name} --storage {storage} --out best.yaml")


def _print_answer(outcome: Any, spec: Any) -> None:
    """The short answer per defense and what mattered: over the whole study (which of the defense
    and the training recipe moves each objective) and within each defense on the front."""
    from study.results.answer import answer_floor, format_answer, short_answer

    floor = answer_floor(outcome.records, spec.clean_floor)
    print("\n" + format_answer(short_answer(outcome.records, floor), floor, spec.clean_floor is not None))
    path = Path(outcome.study_dir) / "importances.json"
    if path.exists():
        from study.orchestration.importance import OVERALL, format_importances

        on_front = sorted({r["defense"] for r in (outcome.final_front or outcome.front)})
        data = json.loads(path.read_text())
        from study.results.records import SEARCH_SPLIT, labelled

        objectives = [labelled(o, SEARCH_SPLIT) for o in spec.objectives[:2]]
        print("\n" + format_importances(data, [OVERALL, *on_front], objectives))


def _attack_names(eval_cfg: Any) -> str:
    return ", ".join(a.name for a in eval_cfg.attacks) + f" at eps {eval_cfg.eps:g}"


