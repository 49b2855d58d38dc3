"""The Ray Tune callback that logs every trial from the driver, retrying while MLflow is away."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from ray.tune import Callback

from study.tracking.replay import _log_trial_artifacts, _Runs, replay_trial
from study.tracking.store import (
    _LOGGERS,
    TRIAL_ID_TAG,
    _brief,
    _client,
    flat_params,
    grace_seconds,
    retry_seconds,
    server_answers,
)
from study.tracking.trial_files import _error_text, result_metrics, result_params, trial_files_from_trial

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- the callback


class MlflowTrialLogger(Callback):
    """Tune callback: a nested MLflow run per trial, written from the driver only.

    Picklable (Tune stores callbacks with the experiment for ``Tuner.restore``): the client, the
    trial → run cache and the outage state are rebuilt lazily.
    """

    def __init__(self, uri: str, experiment_id: str, parent_run_id: str, study: str) -> None:
        self.uri = uri
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.study = study
        self._reset()

    def _reset(self) -> None:
        self._client_obj: Any = None
        self._runs: _Runs | None = None
        self._logged_params: set[str] = set()
        # trial id → trial, for trials whose live logging failed: replayed from their files.
        self.pending: dict[str, Any] = {}
        self._finished: set[str] = set()  # trials Tune has completed or failed
        self._offline_until = 0.0
        self._warned = False  # one warning per outage, not one per call
        self.study_dir: Path | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {k: self.__dict__[k] for k in ("uri", "experiment_id", "parent_run_id", "study")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset()

    # ------------------------------------------------------------------ plumbing

    @property
    def client(self) -> Any:
        if self._client_obj is None:
            self._client_obj = _client(self.uri)
        return self._client_obj

    @property
    def runs(self) -> _Runs:
        if self._runs is None:
            self._runs = _Runs(self.client, self.experiment_id, self.parent_run_id, self.study)
        return self._runs

    def _note(self, trial: Any) -> None:
        _LOGGERS[self.parent_run_id] = self
        if self.study_dir is None:
            path = getattr(trial, "path", None)
            if path:
                self.study_dir = Path(path).parent.parent  # <study>/tune/<trial>

    def _online(self) -> bool:
        if not self._offline_until:
            return True
        if time.monotonic() < self._offline_until:
            return False
        if not server_answers(self.uri):
            self._offline_until = time.monotonic() + retry_seconds()
            return False
        log.warning("MLflow at %s answers again; logging the %d buffered trial(s)", self.uri, len(self.pending))
        self._offline_until = 0.0
        self._warned = False
        self._runs = None  # runs may have been created by a request whose answer was lost
        return True

    def _failed(self, trial: Any, err: BaseException) -> None:
        if not self._warned:
            log.warning(
                "MLflow at %s failed (%s); trials go on, their runs are logged when it answers again",
                self.uri, _brief(err),
            )
            self._warned = True
        self._offline_until = time.monotonic() + retry_seconds()
        self._runs = None
        self.pending[trial.trial_id] = trial

    def _live(self, trial: Any, action: Any) -> None:
        """Run one live logging action, or buffer the trial for replay."""
        self._note(trial)
        if not self._online():
            self.pending[trial.trial_id] = trial
            return
        if trial.trial_id in self.pending:  # buffered: replayed whole once Tune finishes it
            self._replay_finished()
            return
        try:
            action()
        except Exception as err:  # noqa: BLE001 - never let tracking kill a study; replay later
            self._failed(trial, err)
            return
        self._replay_finished()

    def _replay_finished(self) -> None:
        """Replay buffered trials that Tune has finished, while the server answers."""
        for trial_id, trial in list(self.pending.items()):
            finished = trial_id in self._finished or getattr(trial, "status", "") in ("TERMINATED", "ERROR")
            if not finished:
                continue
            try:
                replay_trial(self.runs, trial_files_from_trial(trial, finished=True))
            except Exception as err:  # noqa: BLE001
                self._failed(trial, err)
                return
            self.pending.pop(trial_id, None)

    def flush_pending(self) -> bool:
        """Replay every buffered finished trial now; True when nothing is left."""
        if self.pending and (not self._offline_until or server_answers(self.uri)):
            self._offline_until = 0.0
            self._runs = None
            self._replay_finished()
        return not self.pending

    # ------------------------------------------------------------------ Tune hooks

    def _params_once(self, trial: Any) -> None:
        from mlflow.entities import Param

        run_id = self.runs.run_id(trial.trial_id)
        if trial.trial_id not in self._logged_params and not self.runs.has_params(trial.trial_id):
            params = flat_params(dict(trial.config))
            self.client.log_batch(run_id, params=[Param(k, v) for k, v in params.items()])
        self._logged_params.add(trial.trial_id)
        self.client.update_run(run_id, status="RUNNING")

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._live(trial, lambda: self._params_once(trial))

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        def action() -> None:
            run_id = self.runs.run_id(trial.trial_id)
            metrics, tags = result_metrics(result)
            params = result_params(result)
            if metrics or tags or params:
                self.client.log_batch(run_id, metrics=metrics, params=params,
                                      tags=list({t.key: t for t in tags}.values()))

        self._live(trial, action)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._finished.add(trial.trial_id)

        def action() -> None:
            run_id = self.runs.run_id(trial.trial_id)
            last = trial.last_result or {}
            if trial.checkpoint is not None and last.get("final"):
                # as_directory: a checkpoint in an object store is fetched to a temporary folder.
                with trial.checkpoint.as_directory() as directory:
                    _log_trial_artifacts(self.client, self.experiment_id, run_id, Path(directory))
            status = "FINISHED" if last.get("status") == "completed" else "FAILED"
            if not last.get("final"):
                self.client.set_tag(run_id, "status", "stopped")
                status = "KILLED"
            self.client.set_terminated(run_id, status)

        self._live(trial, action)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._finished.add(trial.trial_id)

        def action() -> None:
            from mlflow.entities import RunTag

            run_id = self.runs.run_id(trial.trial_id)
            reason = _error_text(trial)
            self.client.log_batch(run_id, tags=[RunTag("status", "error"), RunTag("reason", reason[:5000])])
            self.client.set_terminated(run_id, "FAILED")

        self._live(trial, action)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        """Reconcile: every trial Tune finished must have a complete (terminated) run.

        Catches what this process buffered and, after a driver crash and ``resume``, what the
        dead driver never logged. Waits up to the grace period for an absent server; what is
        still unlogged afterwards is reported by :meth:`StudyRun.finish`.
        """
        for trial in trials:
            self._note(trial)
        deadline = time.monotonic() + (grace_seconds() if self.pending or self._offline_until else 0.0)
        while True:
            if server_answers(self.uri):
                try:
                    self._runs = None
                    for trial in trials:
                        if trial.status in ("TERMINATED", "ERROR") and not self.runs.is_complete(trial.trial_id):
                            self.pending[trial.trial_id] = trial
                    self._offline_until = 0.0
                    self._replay_finished()
                    self._retire_lost_trials({trial.trial_id for trial in trials})
                except Exception as err:  # noqa: BLE001
                    log.warning("MLflow: reconciling the study's runs failed (%s)", _brief(err))
                    self._offline_until = time.monotonic() + retry_seconds()
                if not self.pending:
                    return
            if time.monotonic() >= deadline:
                break
            time.sleep(min(retry_seconds(), max(0.5, deadline - time.monotonic())))
        log.error("MLflow at %s: %d trial run(s) not logged yet", self.uri, len(self.pending))

    def _retire_lost_trials(self, tune_ids: set[str]) -> None:
        """Delete (softly: restorable) runs of trials that Tune no longer has.

        A driver killed mid-study can have started a trial after Tune's last experiment snapshot;
        the resumed Tune never heard of it and runs that configuration again under a new id. Its
        run would count the trial twice, so it goes, tagged with the reason.
        """
        for run in self.runs.duplicates:
            # A second run of a trial already represented by one: the trial must count once.
            self.client.set_tag(run.info.run_id, "robust_study.superseded",
                                "a second run of the same trial; the trial's run is the other one")
            self.client.delete_run(run.info.run_id)
            log.info("MLflow: removed run %s, a duplicate of trial %s's run", run.info.run_id,
                     run.data.tags.get(TRIAL_ID_TAG))
        self.runs.duplicates = []
        if not tune_ids:  # nothing to compare with: never delete on an empty list
            return
        for trial_id, run in list(self.runs.by_trial.items()):
            if trial_id in tune_ids:
                continue
            self.client.set_tag(run.info.run_id, "robust_study.superseded",
                                "started by a driver that died; Tune's resumed state re-ran it as a new trial")
            self.client.delete_run(run.info.run_id)
            del self.runs.by_trial[trial_id]
            log.info("MLflow: removed run %s of trial %s, unknown to the resumed study", run.info.run_id, trial_id)

