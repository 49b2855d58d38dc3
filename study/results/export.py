"""Export a study's Pareto front as complete trial configs (plain YAML data, never code).

The file is a mapping ``{study, objectives, verified, trials: [{number, defense, verified, metrics,
config}]}``; each ``config`` is exactly the trial config that produced the numbers (search attacks
included), so ``robust-study trial best.yaml --out DIR`` re-runs them as they are. ``metrics`` name
their split: ``val_...`` the search's numbers, ``test_...`` the verification's (the ones to quote);
a trial that was not verified has no ``test_...`` numbers and says why.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from study.config import ConfigError, parse_trial_config
from study.reproducibility import pinned
from study.results.records import FINAL_SPLIT, SEARCH_SPLIT, SPLIT_METRICS, labelled, stage_values
from study.spec import StudySpec, trial_config_for

EXPORT_KIND = "robust-study/front"


def front_to_quote(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The front a study reports: the verified front, then the search-front trials whose
    verification failed (marked ``verified: false``). When nothing was verified (``verify: false``)
    the search front, every trial of it unverified; never search numbers in place of test ones."""
    if any(r.get("verified") is not None for r in records):
        return [r for r in records if r.get("on_final_front")] + [r for r in records if r.get("verified") is False]
    return [r for r in records if r.get("on_front")]


def export_document(spec: StudySpec, records: list[dict[str, Any]]) -> dict[str, Any]:
    """The export document for the given (front) records."""
    trials = []
    for record in records:
        config = trial_config_for(spec, record["params"], name=f"{spec.name}-trial-{record['number']}")
        # What the trial's worker ran with (threads, determinism, library versions): a re-run
        # applies the same settings and warns when its libraries differ.
        config = pinned(config, record.get("reproducibility"))
        search = stage_values(record, spec.objectives, "search")
        metrics = {labelled(k, SEARCH_SPLIT): v for k, v in zip(spec.objectives, search, strict=True) if v is not None}
        final = record.get("final")
        entry: dict[str, Any] = {"number": record["number"], "defense": record["defense"],
                                 "trusted": record["trusted"], "verified": bool(record.get("verified") and final)}
        if entry["verified"]:
            metrics.update({k: final[k] for k in (labelled(o, FINAL_SPLIT) for o in SPLIT_METRICS) if k in final})
            entry["test_trusted"] = bool(final.get("trusted"))
        else:
            entry["not_verified"] = record.get("final_error") or (
                "verification failed" if record.get("verified") is False else "verification did not run")
        trials.append({**entry, "metrics": metrics, "config": config.model_dump(mode="json")})
    return {"kind": EXPORT_KIND, "study": spec.name, "objectives": list(spec.objectives),
            "verified": bool(trials) and all(t["verified"] for t in trials), "trials": trials}


def write_export(document: dict[str, Any], out: str | Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(document, sort_keys=False))
    tmp.replace(out)
    return out


def is_export(data: Any) -> bool:
    return isinstance(data, dict) and data.get("kind") == EXPORT_KIND


def configs_from_export(data: dict[str, Any]) -> list[tuple[int, Any]]:
    """(trial number, validated TrialConfig) for every trial of an export document."""
    trials = data.get("trials")
    if not isinstance(trials, list) or not trials:
        raise ConfigError("export file has no trials")
    out = []
    for entry in trials:
        try:
            out.append((int(entry["number"]), parse_trial_config(entry["config"])))
        except (KeyError, TypeError) as err:
            raise ConfigError(f"export file: malformed trial entry ({err})") from None
    return out
