"""MLflow records: one parent run per study, one nested run per trial.

All writes happen in the Tune driver (a :class:`MlflowTrialLogger` callback), never in the
trials: a SQLite store with several writers fails with "database is locked", and a single writer
also makes resume idempotent — a trial's run is looked up by its Ray trial id before one is
created, and its parameters are logged only once.

A tracking server may go away mid-study. Trials never wait for it and never lose results:
everything a run needs is already on disk in Ray Tune's trial folders (``params.json``, one
``result.json`` line per report, the final checkpoint with ``model.pt``). When a logging call
fails, the callback stops calling the server for a while, marks the trial and, once the server
answers again (or at the end of the study, after a grace period), *replays* the trial from those
files. Replay is idempotent — the run is found by its trial-id tag, parameters are logged only
when absent, metrics carry Ray's own timestamps so an identical metric is stored once — and a run
is set terminated only after everything else of it is logged, so "terminated in MLflow" means
"complete". If the server is still away at the end, the study fails loudly with the number of
unlogged runs and the command that logs them later (:func:`sync_study`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray.tune import Callback

from study.config import ConfigError
from study.mlflow_conventions import (  # noqa: F401 - default_tracking_uri: public here too
    EXPERIMENT_KIND,
    EXPERIMENT_KIND_TAG,
    default_tracking_uri,
    mark_model_training,
    system_tags,
)

log = logging.getLogger(__name__)

TRIAL_ID_TAG = "robust_study.trial_id"
STUDY_TAG = "robust_study.study"
PARENT_TAG = "mlflow.parentRunId"
_MAX_PARAM_LEN = 6000
_MAX_BATCH_METRICS = 900  # MLflow's log_batch accepts at most 1000 metrics per call
TERMINAL_MLFLOW = ("FINISHED", "FAILED", "KILLED")
# Files of a finished study logged on its parent run (what study.artifacts writes).
PARENT_ARTIFACTS = ("trials.json", "front.csv", "front_final.csv", "front.png", "front_final.png", "front.html",
                    "hypervolume.csv", "hypervolume.png", "timeline.png", "best.yaml")


def _env_seconds(name: str, default: float) -> float:
    try:
        return max(0.0, float(os.environ.get(name, default)))
    except ValueError:
        return default


def retry_seconds() -> float:
    """How long the driver leaves an unreachable server alone before asking again."""
    return _env_seconds("ROBUST_STUDY_MLFLOW_RETRY_S", 5.0)


def grace_seconds() -> float:
    """How long the end of a study waits for an unreachable server before failing."""
    return _env_seconds("ROBUST_STUDY_MLFLOW_GRACE_S", 60.0)


class MlflowUnsynced(ConfigError):
    """Runs could not be logged because the tracking store is unreachable; results are on disk.

    A ConfigError so that every command prints it as one line with a non-zero exit status.
    """


def is_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def _client(uri: str) -> Any:
    # Fail fast on an unreachable server instead of mlflow's minutes of retries: the driver
    # buffers and replays instead (module docstring).
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def open_store(uri: str) -> list[Path]:
    """Create (or open) the tracking store now, so later calls find it ready (it is cached per
    process); for a SQLite URI this builds the schema of a new database.

    Returns what this created on disk (a new SQLite file, then the folders made for it, deepest
    first), so that a study refused right after can leave nothing behind (:func:`remove_created`).
    """
    created: list[Path] = []
    if uri.startswith("sqlite:///"):
        path = Path(uri.removeprefix("sqlite:///"))
        for p in (path, *path.parents):
            if p.exists():
                break
            created.append(p)
    _client(uri)
    return created


def remove_created(paths: list[Path]) -> None:
    """Undo :func:`open_store`'s creations: the file, then each folder if it is still empty."""
    for p in paths:
        try:
            if p.is_dir():
                p.rmdir()
            else:
                p.unlink(missing_ok=True)
        except OSError:  # a folder someone else has written to meanwhile stays
            break


def server_answers(uri: str, timeout: float = 3.0) -> bool:
    """True when ``uri`` is not a server, or its ``/health`` answers 200."""
    if not is_server(uri):
        return True
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def check_reachable(uri: str) -> None:
    """Raise ConfigError (one line) when the tracking store cannot be reached."""
    if not is_server(uri):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5) as response:
            if response.status != 200:
                raise ConfigError(f"mlflow.tracking_uri: {uri} answered HTTP {response.status} on /health")
    except (urllib.error.URLError, OSError, ValueError) as err:  # ValueError: a malformed URL
        reason = getattr(err, "reason", err)
        raise ConfigError(f"mlflow.tracking_uri: cannot reach MLflow server at {uri} ({reason})") from None


def ensure_experiment(client: Any, name: str, artifact_root: Path | str | None) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        mark_model_training(client, experiment)  # experiments made before the tag existed
        return experiment.experiment_id
    # A server stores artifacts itself (proxied ``mlflow-artifacts:``), so every node can read
    # them; a local folder is only right for the local SQLite store.
    # A URI (an object store, study.storage) is given to MLflow as it is.
    if is_server(client.tracking_uri) or artifact_root is None:
        location = None
    elif isinstance(artifact_root, str):
        location = artifact_root
    else:
        location = artifact_root.resolve().as_uri()
    return client.create_experiment(name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})


def flat_params(params: dict[str, Any]) -> dict[str, str]:
    return {k: str(v)[:_MAX_PARAM_LEN] for k, v in sorted(params.items())}


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


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
        names = [k for k in result if k.startswith(("clean_", "robust_", "final_"))] + [
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
        if result.get("reason"):
            tags.append(RunTag("reason", str(result["reason"])[:5000]))
    return metrics, tags


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
        parts = trial_dir.name.split("_")  # _trainable_<id>_<n>_<params>_<date>
        trial_id = parts[2] if len(parts) > 2 and trial_dir.name.startswith("_") else None
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


# --------------------------------------------------------------------------- replay


class _Runs:
    """Trial id → nested run id under one parent, looked up once and kept current."""

    def __init__(self, client: Any, experiment_id: str, parent_run_id: str, study: str) -> None:
        self.client = client
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.study = study
        self.by_trial: dict[str, Any] = {}
        for run in client.search_runs(
            [experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}'", max_results=50000
        ):
            trial_id = run.data.tags.get(TRIAL_ID_TAG)
            if trial_id:
                self.by_trial[trial_id] = run

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


# --------------------------------------------------------------------------- parent run

# The driver's loggers by parent run id, so the parent's ``finish`` can flush what the trial
# logger still holds (both live in the Tune driver process).
_LOGGERS: dict[str, MlflowTrialLogger] = {}


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

    def log_metrics(self, metrics: dict[str, float]) -> None:
        self._pending_metrics.update({k: float(v) for k, v in metrics.items() if _finite(v)})
        self._flush_parent()

    def _flush_parent(self) -> bool:
        """Log what is pending on the parent run; False (and kept pending) when that fails."""
        from mlflow.entities import Metric

        if not (self._pending_artifacts or self._pending_metrics):
            return True
        try:
            client = _client(self.uri)
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


def _brief(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return (text[0] if text else type(err).__name__)[:300]


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
            if metrics or tags:
                self.client.log_batch(run_id, metrics=metrics, tags=list({t.key: t for t in tags}.values()))

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


def _error_text(trial: Any) -> str:
    path = getattr(trial, "error_file", None) or ""
    try:
        text = Path(path).read_text() if path else ""
    except OSError:
        text = ""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "trial raised an error"


# --------------------------------------------------------------------------- sync command


@dataclass
class SyncReport:
    trials: int  # trials found on disk
    replayed: int  # trials whose runs were (re)logged
    parent_logged: bool


def sync_study(study_dir: Path) -> SyncReport:
    """Log into MLflow whatever of a study is missing there, from the study's files.

    For ``robust-study sync NAME``: after a study failed because its tracking server was away.
    Idempotent: complete runs are left alone, so it can be run any number of times.

    Raises:
        ConfigError: no such study, or the tracking store still unreachable.
    """
    state_file = study_dir / "study.json"
    if not state_file.is_file():
        raise ConfigError(f"sync: no study in {study_dir} (no study.json)")
    state = json.loads(state_file.read_text())
    uri, parent_run_id = state["tracking_uri"], state["parent_run_id"]
    name = state.get("spec", {}).get("name", study_dir.name)
    check_reachable(uri)
    client = _client(uri)
    experiment_id = state.get("experiment_id") or client.get_run(parent_run_id).info.experiment_id
    records = []
    if (study_dir / "trials.json").is_file():
        records = json.loads((study_dir / "trials.json").read_text())
    status_of = {r.get("trial_id"): r.get("status") for r in records}
    runs = _Runs(client, experiment_id, parent_run_id, name)
    trials = replayed = 0
    for trial_dir in sorted(p for p in (study_dir / "tune").glob("*") if (p / "params.json").is_file()):
        files = trial_files_from_dir(trial_dir)
        if files is None:
            continue
        if records and files.trial_id not in status_of:
            continue  # not one of the study's trials (see MlflowTrialLogger._retire_lost_trials)
        files = trial_files_from_dir(trial_dir, status_of.get(files.trial_id))
        trials += 1
        if files is not None and not runs.is_complete(files.trial_id):
            replay_trial(runs, files)
            replayed += 1
    parent_logged = False
    parent = client.get_run(parent_run_id)
    if records and parent.info.status != "FINISHED":
        from mlflow.entities import Metric

        for artifact in PARENT_ARTIFACTS:
            if (study_dir / artifact).is_file():
                client.log_artifact(parent_run_id, str(study_dir / artifact))
        now = int(time.time() * 1000)
        summary = {
            "trials_completed": sum(r.get("status") == "completed" for r in records),
            "trials_failed": sum(r.get("status") != "completed" for r in records),
            "front_size": sum(bool(r.get("on_front")) for r in records),
            "final_front_size": sum(bool(r.get("on_final_front")) for r in records),
        }
        client.log_batch(parent_run_id, metrics=[Metric(k, float(v), now, 0) for k, v in summary.items()])
        client.set_terminated(parent_run_id, "FINISHED")
        parent_logged = True
    return SyncReport(trials, replayed, parent_logged)
