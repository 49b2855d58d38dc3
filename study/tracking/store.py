"""The MLflow store: tags, opening and checking it, the study's experiment."""

from __future__ import annotations

import math
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from study.config import ConfigError
from study.mlflow_conventions import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, mark_model_training

TRIAL_ID_TAG = "robust_study.trial_id"
STUDY_TAG = "robust_study.study"
PARENT_TAG = "mlflow.parentRunId"
_MAX_PARAM_LEN = 6000
_MAX_BATCH_METRICS = 900  # MLflow's log_batch accepts at most 1000 metrics per call
TERMINAL_MLFLOW = ("FINISHED", "FAILED", "KILLED")
# Files of a finished study logged on its parent run (what study.results.artifacts writes).
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
        from study.tracking.sqlite_template import seed_new_store

        seed_new_store(path)
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


#: The driver's trial loggers (callback.MlflowTrialLogger) by parent run id, so the parent's
#: ``finish`` can flush what the trial logger still holds (both live in the Tune driver process).
_LOGGERS: dict[str, Any] = {}


def _brief(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return (text[0] if text else type(err).__name__)[:300]
