"""What every MLflow user expects of a study's records, whichever process writes them.

* The tracking URI is found the way MLflow programs find it (:func:`resolve_tracking_uri`).
* The experiment is marked as model training, so MLflow 3's UI opens it on its runs table with
  the accuracy columns rather than on the GenAI overview (:data:`EXPERIMENT_KIND`).
* Runs carry MLflow's system tags (user, source, git commit): the ones its fluent
  ``mlflow.start_run`` adds, which ``MlflowClient.create_run`` (used here) does not.

No Ray, no torch: the CLI resolves the URI before anything heavy is imported.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlparse

from study.errors import ConfigError

TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
#: The value MLflow's UI itself stores when one picks "custom model development" (mlflow 3).
EXPERIMENT_KIND = "custom_model_development"
# Backends MLflow has a tracking store for ("" is a local folder, as MLflow reads a bare path).
_SCHEMES = ("", "file", "sqlite", "http", "https", "postgresql", "mysql", "mssql", "databricks", "databricks-uc")


def default_tracking_uri(storage_root: Path) -> str:
    """A SQLite store shared by every study under one storage root (the UI shows them all)."""
    return f"sqlite:///{storage_root.resolve() / 'mlflow.db'}"


def resolve_tracking_uri(flag: str | None, spec_uri: str | None, environ: Mapping[str, str],
                         storage_root: Path) -> str:
    """The study's tracking URI: the first one given of ``--tracking-uri``, the spec's
    ``mlflow.tracking_uri`` and ``MLFLOW_TRACKING_URI``; else the local SQLite store.

    Raises:
        ConfigError: the chosen URI is not one MLflow can open (named with where it came from).
    """
    for source, uri in (("--tracking-uri", flag), ("mlflow.tracking_uri", spec_uri),
                        (TRACKING_URI_ENV, environ.get(TRACKING_URI_ENV))):
        if uri is not None and uri.strip():
            check_tracking_uri(uri.strip(), source)
            return uri.strip()
    return default_tracking_uri(storage_root)


def check_tracking_uri(uri: str, source: str) -> None:
    """Refuse URIs MLflow would misread, e.g. ``localhost:5000`` (no scheme: a folder of that name)."""
    scheme = urlparse(uri).scheme.lower().split("+")[0]  # postgresql+psycopg2 is postgresql
    if scheme not in _SCHEMES or (scheme == "" and re.match(r"^[\w.-]+:\d+(/|$)", uri)):
        raise ConfigError(
            f"{source}: {uri!r} is not an MLflow tracking URI; use http(s)://host:port, "
            "sqlite:///path/mlflow.db, file:///path, postgresql://... or mysql://..."
        )


def system_tags() -> dict[str, str]:
    """MLflow's standard run tags for this process: ``mlflow.user``, ``mlflow.source.name`` and
    ``.type`` and, from git, ``mlflow.source.git.commit`` (plus branch and repository URL).

    MLflow reads git from the program's file; a study is defined by what the working directory
    holds (its spec), so a git repository there wins.
    """
    return dict(_system_tags(os.getcwd()))


@functools.lru_cache(maxsize=4)
def _system_tags(cwd: str) -> tuple[tuple[str, str], ...]:
    from mlflow.tracking.context.registry import resolve_tags
    from mlflow.utils.git_utils import get_git_branch, get_git_commit, get_git_repo_url
    from mlflow.utils.mlflow_tags import MLFLOW_GIT_BRANCH, MLFLOW_GIT_COMMIT, MLFLOW_GIT_REPO_URL

    tags = {k: str(v) for k, v in resolve_tags().items()}
    commit = get_git_commit(cwd)
    if commit:
        git = {MLFLOW_GIT_COMMIT: commit, MLFLOW_GIT_BRANCH: get_git_branch(cwd),
               MLFLOW_GIT_REPO_URL: get_git_repo_url(cwd)}
        for key, value in git.items():
            tags.pop(key, None)  # never mix the program's repository with the working directory's
            if value:
                tags[key] = value
    return tuple(sorted(tags.items()))


def mark_model_training(client: object, experiment: object) -> None:
    """Tag an existing experiment as model training unless it already says what it is."""
    if EXPERIMENT_KIND_TAG not in (experiment.tags or {}):  # type: ignore[attr-defined]
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)  # type: ignore[attr-defined]
