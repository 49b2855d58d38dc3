"""The study's parent run: its parameters, artifacts and final metrics."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from study.mlflow_conventions import system_tags
from study.tracking.store import (
    _LOGGERS,
    STUDY_TAG,
    MlflowUnsynced,
    _brief,
    _client,
    _finite,
    ensure_experiment,
    flat_params,
    grace_seconds,
    retry_seconds,
)

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- parent run



class StudyRun:
    """The study's parent run; its id is kept in ``study.json`` so resume reuses it.

    Logging calls that fail (server away) are remembered and retried by :meth:`finish`, which
    raises :class:`MlflowUnsynced` if the server does not come back within the grace period.
    """

    def __init__(self, uri: str, experiment: str, artifact_root: Path | str | None, study_dir: Path | None = None) -> None:
        self.uri = uri
        self.experiment = experiment
        self.artifact_root = artifact_root
        self.study_dir = study_dir
        self.name = experiment
        self.experiment_id: str | None = None
        self.run_id: str | None = None
        self._pending_artifacts: list[Path] = []
        self._pending_metrics: dict[str, float] = {}
        self._pending_verification: list[dict[str, Any]] = []
        self._warned = False

    def start(self, name: str, existing_run_id: str | None, params: dict[str, Any], tags: dict[str, str]) -> str:
        from mlflow.entities import Param, RunTag

        self.name = name
        client = _client(self.uri)
        self.experiment_id = ensure_experiment(client, self.experiment, self.artifact_root)
        if existing_run_id:
            self.run_id = existing_run_id
            client.update_run(existing_run_id, status="RUNNING")
            return existing_run_id
        run = client.create_run(self.experiment_id, run_name=name, tags={**system_tags(), STUDY_TAG: name, **tags})
        self.run_id = run.info.run_id
        client.log_batch(
            self.run_id,
            params=[Param(k, v) for k, v in flat_params(params).items()],
            tags=[RunTag("mlflow.note.content", tags.get("description", ""))],
        )
        return self.run_id

    def log_artifacts(self, paths: list[Path]) -> None:
        self._pending_artifacts += [Path(p) for p in paths if Path(p).exists()]
        self._flush_parent()

    def log_verification(self, records: list[dict[str, Any]]) -> None:
        """Put the verification of the front (test numbers, flags, split sizes) on each trial's run."""
        self._pending_verification += [r for r in records if r.get("verified") is not None]
        self._flush_parent()

    def log_metrics(self, metrics: dict[str, float]) -> None:
        self._pending_metrics.update({k: float(v) for k, v in metrics.items() if _finite(v)})
        self._flush_parent()

    def _flush_parent(self) -> bool:
        """Log what is pending on the parent run; False (and kept pending) when that fails."""
        from mlflow.entities import Metric

        if not (self._pending_artifacts or self._pending_metrics or self._pending_verification):
            return True
        try:
            client = _client(self.uri)
            if self._pending_verification:
                from study.tracking.replay import _Runs
                from study.tracking.verification import log_verification

                runs = _Runs(client, str(self.experiment_id), str(self.run_id), self.name)
                log_verification(runs, self._pending_verification)
                self._pending_verification = []
            while self._pending_artifacts:
                client.log_artifact(self.run_id, str(self._pending_artifacts[0]))
                self._pending_artifacts.pop(0)
            if self._pending_metrics:
                now = int(time.time() * 1000)
                client.log_batch(self.run_id, metrics=[Metric(k, v, now, 0) for k, v in self._pending_metrics.items()])
                self._pending_metrics = {}
        except Exception as err:  # noqa: BLE001 - any failure keeps the work pending, reported by finish()
            if not self._warned:  # once: finish() retries quietly until the grace period ends
                log.warning("MLflow: could not log the study's results on %s yet (%s)", self.uri, _brief(err))
                self._warned = True
            return False
        return True

    def finish(self, status: str = "FINISHED") -> None:
        """Flush everything (waiting up to the grace period for a server), then terminate the run."""
        logger = _LOGGERS.get(self.run_id or "")
        deadline = time.monotonic() + grace_seconds()
        while True:
            trials_ok = logger is None or logger.flush_pending()
            parent_ok = self._flush_parent()
            if trials_ok and parent_ok:
                try:
                    _client(self.uri).set_terminated(self.run_id, status)
                    return
                except Exception as err:  # noqa: BLE001
                    log.warning("MLflow: could not close the study's run (%s)", _brief(err))
            if time.monotonic() >= deadline:
                break
            time.sleep(min(retry_seconds(), max(0.5, deadline - time.monotonic())) or 0.5)
        unlogged = len(logger.pending) if logger is not None else 0
        study_dir = self.study_dir or (logger.study_dir if logger is not None else None)
        raise MlflowUnsynced(unsynced_message(self.uri, unlogged, self.name, study_dir))


def unsynced_message(uri: str, trials: int, name: str, study_dir: Path | None) -> str:
    where = f" --storage {study_dir.parent}" if study_dir is not None else ""
    kept = f"; every result is kept in {study_dir}" if study_dir is not None else ""
    return (
        f"MLflow at {uri} is unreachable: {trials} trial run(s) and the study's parent run are not logged"
        f"{kept}; when the server answers again run: robust-study sync {name}{where}"
    )

