"""MLflow records: one parent run per study, one nested run per trial.

All writes happen in the Tune driver (a :class:`MlflowTrialLogger` callback), never in the
trials: a SQLite store with several writers fails with "database is locked", and a single writer
also makes resume idempotent — a trial's run is looked up by its Ray trial id before one is
created, and its parameters are logged only once.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

from ray.tune import Callback

log = logging.getLogger(__name__)

TRIAL_ID_TAG = "robust_study.trial_id"
STUDY_TAG = "robust_study.study"
PARENT_TAG = "mlflow.parentRunId"
_MAX_PARAM_LEN = 6000


def default_tracking_uri(storage_root: Path) -> str:
    """A SQLite store shared by every study under one storage root (the UI shows them all)."""
    return f"sqlite:///{storage_root.resolve() / 'mlflow.db'}"


def _client(uri: str) -> Any:
    # Fail fast on an unreachable server instead of mlflow's minutes of retries.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def check_reachable(uri: str) -> None:
    """Raise ConfigError (one line) when the tracking store cannot be reached."""
    from study.config import ConfigError

    if not uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5) as response:  # noqa: S310
            if response.status != 200:
                raise ConfigError(f"mlflow.tracking_uri: {uri} answered HTTP {response.status} on /health")
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise ConfigError(f"mlflow.tracking_uri: cannot reach MLflow server at {uri} ({reason})") from None


def ensure_experiment(client: Any, name: str, artifact_root: Path | None) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = artifact_root.resolve().as_uri() if artifact_root is not None else None
    return client.create_experiment(name, artifact_location=location)


def flat_params(params: dict[str, Any]) -> dict[str, str]:
    return {k: str(v)[:_MAX_PARAM_LEN] for k, v in sorted(params.items())}


class StudyRun:
    """The study's parent run; its id is kept in ``study.json`` so resume reuses it."""

    def __init__(self, uri: str, experiment: str, artifact_root: Path | None) -> None:
        self.uri = uri
        self.experiment = experiment
        self.artifact_root = artifact_root
        self.experiment_id: str | None = None
        self.run_id: str | None = None

    def start(self, name: str, existing_run_id: str | None, params: dict[str, Any], tags: dict[str, str]) -> str:
        from mlflow.entities import Param, RunTag

        client = _client(self.uri)
        self.experiment_id = ensure_experiment(client, self.experiment, self.artifact_root)
        if existing_run_id:
            self.run_id = existing_run_id
            client.update_run(existing_run_id, status="RUNNING")
            return existing_run_id
        run = client.create_run(self.experiment_id, run_name=name, tags={STUDY_TAG: name, **tags})
        self.run_id = run.info.run_id
        client.log_batch(
            self.run_id,
            params=[Param(k, v) for k, v in flat_params(params).items()],
            tags=[RunTag("mlflow.note.content", tags.get("description", ""))],
        )
        return self.run_id

    def log_artifacts(self, paths: list[Path]) -> None:
        client = _client(self.uri)
        for path in paths:
            if path.exists():
                client.log_artifact(self.run_id, str(path))

    def log_metrics(self, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        client = _client(self.uri)
        items = [Metric(k, float(v), now, 0) for k, v in metrics.items() if _finite(v)]
        if items:
            client.log_batch(self.run_id, metrics=items)

    def finish(self, status: str = "FINISHED") -> None:
        _client(self.uri).set_terminated(self.run_id, status)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class MlflowTrialLogger(Callback):
    """Tune callback: a nested MLflow run per trial, written from the driver only.

    Picklable (Tune stores callbacks with the experiment for ``Tuner.restore``): the client and
    the trial → run cache are rebuilt lazily.
    """

    def __init__(self, uri: str, experiment_id: str, parent_run_id: str, study: str) -> None:
        self.uri = uri
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.study = study
        self._client_obj: Any = None
        self._runs: dict[str, str] | None = None
        self._logged_params: set[str] = set()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_client_obj=None, _runs=None, _logged_params=set())
        return state

    @property
    def client(self) -> Any:
        if self._client_obj is None:
            self._client_obj = _client(self.uri)
        return self._client_obj

    def _existing_runs(self) -> dict[str, str]:
        if self._runs is None:
            self._runs = {}
            runs = self.client.search_runs(
                [self.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{self.parent_run_id}'", max_results=50000
            )
            for run in runs:
                trial_id = run.data.tags.get(TRIAL_ID_TAG)
                if trial_id:
                    self._runs[trial_id] = run.info.run_id
                    if run.data.params:
                        self._logged_params.add(trial_id)
        return self._runs

    def run_id_for(self, trial: Any) -> str:
        runs = self._existing_runs()
        if trial.trial_id not in runs:
            run = self.client.create_run(
                self.experiment_id,
                run_name=f"trial-{trial.trial_id}",
                tags={PARENT_TAG: self.parent_run_id, TRIAL_ID_TAG: trial.trial_id, STUDY_TAG: self.study},
            )
            runs[trial.trial_id] = run.info.run_id
        return runs[trial.trial_id]

    def _log_params_once(self, trial: Any, run_id: str) -> None:
        from mlflow.entities import Param

        if trial.trial_id in self._logged_params:
            return
        params = flat_params(dict(trial.config))
        self.client.log_batch(run_id, params=[Param(k, v) for k, v in params.items()])
        self._logged_params.add(trial.trial_id)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        run_id = self.run_id_for(trial)
        self._log_params_once(trial, run_id)
        self.client.update_run(run_id, status="RUNNING")

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        from mlflow.entities import Metric

        run_id = self.run_id_for(trial)
        step = int(result.get("epoch", result.get("training_iteration", 0)))
        now = int(time.time() * 1000)
        if result.get("final"):
            names = [k for k in result if k.startswith(("clean_", "robust_", "final_"))] + [
                "train_seconds",
                "eval_seconds",
                "num_parameters",
                "epochs_run",
                "trusted",
            ]
            prefix = ""
        else:
            names = [k for k in result if k.startswith("epoch_")]
            prefix = ""
        metrics = [Metric(prefix + k, float(result[k]), now, step) for k in names if _finite(result.get(k))]
        tags = []
        if result.get("final"):
            from mlflow.entities import RunTag

            tags.append(RunTag("status", str(result.get("status"))))
            tags.append(RunTag("trusted", str(bool(result.get("trusted")))))
            for flag in json.loads(result.get("flags_json", "[]")):
                tags.append(RunTag(f"flag.{flag['id']}", "pass" if flag.get("passed") else "FAIL"))
            if result.get("reason"):
                tags.append(RunTag("reason", str(result["reason"])[:5000]))
        if metrics or tags:
            self.client.log_batch(run_id, metrics=metrics, tags=tags)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        run_id = self.run_id_for(trial)
        last = trial.last_result or {}
        if trial.checkpoint is not None and last.get("final"):
            path = Path(trial.checkpoint.path)
            for name in ("model.pt", "result.json", "config.yaml"):
                if (path / name).is_file():
                    self.client.log_artifact(run_id, str(path / name))
        status = "FINISHED" if last.get("status") == "completed" else "FAILED"
        if not last.get("final"):
            self.client.set_tag(run_id, "status", "stopped")
            status = "KILLED"
        self.client.set_terminated(run_id, status)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        run_id = self.run_id_for(trial)
        reason = _error_text(trial)
        self.client.set_tag(run_id, "status", "error")
        self.client.set_tag(run_id, "reason", reason[:5000])
        self.client.set_terminated(run_id, "FAILED")


def _error_text(trial: Any) -> str:
    path = getattr(trial, "error_file", None) or ""
    try:
        text = Path(path).read_text() if path else ""
    except OSError:
        text = ""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "trial raised an error"
