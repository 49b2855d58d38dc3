"""Export a study's Pareto front as complete trial configs (plain YAML data, never code).

The file is a mapping ``{study, objectives, trials: [{number, defense, metrics, config}]}``; each
``config`` is exactly the trial config that produced the numbers (search attacks included), so
``robust-study trial best.yaml --out DIR`` re-runs them as they are.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from study.config import ConfigError, parse_trial_config
from study.reproducibility import pinned
from study.spec import StudySpec, trial_config_for

EXPORT_KIND = "robust-study/front"


def export_document(spec: StudySpec, records: list[dict[str, Any]]) -> dict[str, Any]:
    """The export document for the given (front) records."""
    trials = []
    for record in records:
        config = trial_config_for(spec, record["params"], name=f"{spec.name}-trial-{record['number']}")
        # What the trial's worker ran with (threads, determinism, library versions): a re-run
        # applies the same settings and warns when its libraries differ.
        config = pinned(config, record.get("reproducibility"))
        metrics = {k: record[k] for k in spec.objectives if record.get(k) is not None}
        if record.get("final"):
            metrics.update({f"final_{k}": record["final"][k] for k in ("clean_accuracy", "robust_accuracy")})
        trials.append(
            {
                "number": record["number"],
                "defense": record["defense"],
                "trusted": record["trusted"],
                "metrics": metrics,
                "config": config.model_dump(mode="json"),
            }
        )
    return {"kind": EXPORT_KIND, "study": spec.name, "objectives": list(spec.objectives), "trials": trials}


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
