"""Logging a trial's run from its files, once, whenever MLflow answers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from study.mlflow_conventions import system_tags
from study.tracking.store import _MAX_BATCH_METRICS, PARENT_TAG, STUDY_TAG, TERMINAL_MLFLOW, TRIAL_ID_TAG, flat_params
from study.tracking.trial_files import TrialFiles, result_metrics, result_params

# --------------------------------------------------------------------------- replay


class _Runs:
    """Trial id → nested run id under one parent, looked up once and kept current."""

    def __init__(self, client: Any, experiment_id: str, parent_run_id: str, study: str) -> None:
        self.client = client
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.study = study
        self.by_trial: dict[str, Any] = {}
        # Runs beyond the first of a trial id. None should exist (every writer looks the trial up
        # first); a store that has some (an older version, two drivers on one study) must still
        # count the trial once: they are never logged to, and the reconciliation retires them.
        self.duplicates: list[Any] = []
        found: dict[str, list[Any]] = {}
        for run in client.search_runs(
            [experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}'", max_results=50000
        ):
            trial_id = run.data.tags.get(TRIAL_ID_TAG)
            if trial_id:
                found.setdefault(trial_id, []).append(run)
        for trial_id, candidates in found.items():
            # The most complete run stands for the trial: terminated, then the one with parameters,
            # then the oldest (so every driver picks the same one).
            candidates.sort(key=lambda r: (r.info.status not in TERMINAL_MLFLOW, not r.data.params,
                                           r.info.start_time or 0, r.info.run_id))
            self.by_trial[trial_id] = candidates[0]
            self.duplicates += candidates[1:]

    def is_complete(self, trial_id: str) -> bool:
        run = self.by_trial.get(trial_id)
        return run is not None and run.info.status in TERMINAL_MLFLOW

    def run_id(self, trial_id: str) -> str:
        if trial_id not in self.by_trial:
            self.by_trial[trial_id] = self.client.create_run(
                self.experiment_id,
                run_name=f"trial-{trial_id}",
                tags={**system_tags(), PARENT_TAG: self.parent_run_id, TRIAL_ID_TAG: trial_id, STUDY_TAG: self.study},
            )
        return self.by_trial[trial_id].info.run_id

    def has_params(self, trial_id: str) -> bool:
        run = self.by_trial.get(trial_id)
        return bool(run is not None and getattr(run.data, "params", None))


def replay_trial(runs: _Runs, files: TrialFiles) -> None:
    """Log one trial completely from its files; idempotent (module docstring)."""
    from mlflow.entities import Param, RunTag

    client = runs.client
    run_id = runs.run_id(files.trial_id)
    if not runs.has_params(files.trial_id):
        params = flat_params(files.params)
        client.log_batch(run_id, params=[Param(k, v) for k, v in params.items()])
    metrics, tags = [], []
    for result in files.results:
        m, t = result_metrics(result)
        metrics += m
        tags += t
    for i in range(0, len(metrics), _MAX_BATCH_METRICS):
        client.log_batch(run_id, metrics=metrics[i : i + _MAX_BATCH_METRICS])
    if tags:
        client.log_batch(run_id, tags=list({t.key: t for t in tags}.values()))
    reached = result_params(files.final or {})
    if reached:
        client.log_batch(run_id, params=reached)
    if not files.finished:
        return
    final = files.final
    if final is not None and files.checkpoint is not None:
        _log_trial_artifacts(client, runs.experiment_id, run_id, files.checkpoint)
    if final is not None:
        status = "FINISHED" if final.get("status") == "completed" else "FAILED"
    elif files.error:
        client.log_batch(run_id, tags=[RunTag("status", "error"), RunTag("reason", files.error[:5000])])
        status = "FAILED"
    else:
        client.set_tag(run_id, "status", "stopped")
        status = "KILLED"
    client.set_terminated(run_id, status)
    run = client.get_run(run_id)
    runs.by_trial[files.trial_id] = run


def _log_trial_artifacts(client: Any, experiment_id: str, run_id: str, checkpoint: Path) -> None:
    for name in ("model.pt", "result.json", "config.yaml"):
        if (checkpoint / name).is_file():
            client.log_artifact(run_id, str(checkpoint / name))
    from study.mlflow_model import MODEL_DIR, log_trial_model

    if (checkpoint / MODEL_DIR / "MLmodel").is_file():  # written by the trial (spec: mlflow.log_models)
        log_trial_model(client, experiment_id, run_id, checkpoint / MODEL_DIR)
