"""One trial's record on disk (Tune's results and checkpoint), read back for replay."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from study.results.identity import trial_id_from_dir
from study.results.records import REACHED_SUFFIX, reached_values
from study.tracking.store import _finite

# --------------------------------------------------------------------------- one trial's record


def result_metrics(result: dict[str, Any]) -> tuple[list[Any], list[Any]]:
    """The MLflow metrics and tags of one Tune result (a per-epoch or the final report).

    Timestamps come from the result itself (Ray's ``timestamp``), not the clock, so logging the
    same result twice (live, then replayed) stores each metric once.
    """
    from mlflow.entities import Metric, RunTag

    step = int(result.get("epoch", result.get("training_iteration", 0)) or 0)
    stamp = int(result.get("timestamp") or time.time()) * 1000
    if result.get("final"):
        names = [k for k in result if k.startswith(("val_", "test_", "final_")) or k.endswith(REACHED_SUFFIX)] + [
            "train_seconds", "eval_seconds", "num_parameters", "epochs_run", "trusted", "model_seconds",
        ]
    else:
        names = [k for k in result if k.startswith("epoch_")]
    metrics = [Metric(k, float(result[k]), stamp, step) for k in names if _finite(result.get(k))]
    tags = []
    if result.get("final"):
        tags.append(RunTag("status", str(result.get("status"))))
        tags.append(RunTag("trusted", str(bool(result.get("trusted")))))
        for flag in json.loads(result.get("flags_json", "[]") or "[]"):
            tags.append(RunTag(f"flag.{flag['id']}", "pass" if flag.get("passed") else "FAIL"))
        if result.get("split"):
            tags.append(RunTag("search_split", str(result["split"])))
        sizes = json.loads(result.get("split_sizes_json") or "{}")
        tags += [RunTag(f"split.{name}", str(size)) for name, size in sizes.items() if name != "evaluated"]
        if "evaluated" in sizes:
            tags.append(RunTag(f"{result.get('split', 'val')}_samples_attacked", str(sizes["evaluated"])))
        if result.get("reason"):
            tags.append(RunTag("reason", str(result["reason"])[:5000]))
    return metrics, tags


def result_params(result: dict[str, Any]) -> list[Any]:
    """MLflow params of a final result: what the training schedule reached (``kwta_gamma_reached``).

    Logged as params too (beside the metric), since they describe the trained model as its
    configuration does; the same value logged again (live, then replayed) is accepted by MLflow.
    """
    from mlflow.entities import Param

    if not result.get("final"):
        return []
    return [Param(k, str(v)) for k, v in reached_values(result).items() if _finite(v)]


@dataclass
class TrialFiles:
    """Everything MLflow needs about one trial, read from Ray Tune's files."""

    trial_id: str
    params: dict[str, Any]
    results: list[dict[str, Any]]
    checkpoint: Path | None
    error: str
    finished: bool  # terminal in Tune (completed, stopped or errored)
    stopped: bool = False  # terminated without a final report (early stopping)

    @property
    def final(self) -> dict[str, Any] | None:
        finals = [r for r in self.results if r.get("final")]
        return finals[-1] if finals else None


def _read_results(trial_dir: Path) -> list[dict[str, Any]]:
    path = trial_dir / "result.json"
    if not path.is_file():
        return []
    results = []
    for line in path.read_text().splitlines():
        try:
            results.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a crash
            continue
    return results


def _last_checkpoint(trial_dir: Path) -> Path | None:
    checkpoints = sorted(p for p in trial_dir.glob("checkpoint_*") if (p / "model.pt").is_file())
    return checkpoints[-1] if checkpoints else None


def _last_line(path: Path) -> str:
    try:
        lines = [line for line in path.read_text().strip().splitlines() if line.strip()]
    except OSError:
        return ""
    return lines[-1] if lines else ""


def trial_files_from_dir(trial_dir: Path, status: str | None = None) -> TrialFiles | None:
    """A trial's record from its folder under ``<study>/tune/``; ``status`` from trials.json."""
    results = _read_results(trial_dir)
    trial_id = next((r["trial_id"] for r in reversed(results) if r.get("trial_id")), None)
    if trial_id is None:
        trial_id = trial_id_from_dir(trial_dir.name)
    if trial_id is None:
        return None
    try:
        params = json.loads((trial_dir / "params.json").read_text())
    except (OSError, json.JSONDecodeError):
        params = {}
    error = _last_line(trial_dir / "error.txt") if (trial_dir / "error.txt").is_file() else ""
    files = TrialFiles(trial_id, params, results, None, error, finished=False)
    files.checkpoint = _last_checkpoint(trial_dir) if files.final else None
    files.finished = bool(files.final) or bool(error) or status in ("stopped", "failed", "error", "completed")
    files.stopped = not files.final and not error and status == "stopped"
    return files


def trial_files_from_trial(trial: Any, finished: bool = False) -> TrialFiles:
    """A live Tune trial's record (the driver's staging copy of its results is the freshest).

    ``finished``: Tune has finished it (``on_trial_complete`` runs before Tune marks it so).
    """
    results: list[dict[str, Any]] = []
    for folder in (getattr(trial, "local_path", None), getattr(trial, "path", None)):
        if folder and (Path(folder) / "result.json").is_file():
            results = _read_results(Path(folder))
            break
    if not results and trial.last_result:
        results = [dict(trial.last_result)]
    checkpoint = None
    if trial.checkpoint is not None and Path(trial.checkpoint.path).is_dir():
        checkpoint = Path(trial.checkpoint.path)
    status = getattr(trial, "status", "")
    files = TrialFiles(
        trial.trial_id, dict(trial.config), results, checkpoint,
        error=_error_text(trial) if status == "ERROR" else "",
        finished=finished or status in ("TERMINATED", "ERROR"),
    )
    files.stopped = files.finished and status != "ERROR" and files.final is None
    return files


def _error_text(trial: Any) -> str:
    path = getattr(trial, "error_file", None) or ""
    try:
        text = Path(path).read_text() if path else ""
    except OSError:
        text = ""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "trial raised an error"
