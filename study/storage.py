"""Where a study's files live: a local (or NFS) folder, or an object-store URI (``s3://``, ``gs://``).

With a URI the driver keeps a local working copy of the study folder (Optuna's SQLite file, the
default MLflow SQLite store, fronts, plots) under the cache folder and mirrors it to the URI with
pyarrow.fs: after the study starts, after every finished trial and at the end. Ray Tune is given
the URI itself (its trial folders and checkpoints go there from every node). ``resume``,
``export``, ``pareto`` and ``sync`` first replace the working copy with what the URI holds, so the
URI is the one source of truth.

Credentials come from the environment only (the variables pyarrow, boto3 and Ray's workers read),
never from the spec.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from study.errors import ConfigError

log = logging.getLogger(__name__)

#: URI schemes accepted by ``storage`` (pyarrow.fs and Ray Tune both read them).
REMOTE_SCHEMES = ("s3", "gs")

#: Words that mark a spec key or a URI query parameter as a credential.
CREDENTIAL_PATTERN = re.compile(r"access[_-]?key|secret|session[_-]?token|password|credential", re.IGNORECASE)

ENV_HINT = {
    "s3": "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), plus AWS_ENDPOINT_URL for a non-AWS server",
    "gs": "GOOGLE_APPLICATION_CREDENTIALS",
}

STUDY_FILE = "study.json"
TUNE_DIR = "tune"
#: The default MLflow store beside the studies (study.tracking.default_tracking_uri).
MLFLOW_DB = "mlflow.db"


def is_remote(storage: str | os.PathLike[str]) -> bool:
    return "://" in str(storage)


def validate_storage(value: str) -> str:
    """``storage`` as the spec may give it; ValueError (one line) otherwise."""
    if not is_remote(value):
        return value
    parts = urlsplit(value)
    if parts.scheme not in REMOTE_SCHEMES:
        raise ValueError(
            f"{value!r}: scheme {parts.scheme}:// is not supported; use a local/NFS path, "
            + " or ".join(f"{s}://bucket/prefix" for s in REMOTE_SCHEMES)
        )
    if parts.username or parts.password or "@" in parts.netloc:
        raise ValueError("credentials do not belong in the storage URI; set them in the environment "
                         f"({ENV_HINT[parts.scheme]})")
    if parts.query or parts.fragment:
        if CREDENTIAL_PATTERN.search(parts.query):
            raise ValueError("credentials do not belong in the storage URI; set them in the environment "
                             f"({ENV_HINT[parts.scheme]})")
        raise ValueError(f"{value!r}: no query or fragment allowed; configure the endpoint with AWS_ENDPOINT_URL")
    if not parts.netloc:
        raise ValueError(f"{value!r}: no bucket; use {parts.scheme}://bucket/prefix")
    return value.rstrip("/")


def find_credential_key(data: Any, where: str = "", _seen: set[int] | None = None) -> str | None:
    """The dotted path of the first credential-looking key in a spec mapping, if any.

    Each container is visited once: YAML aliases share them, and walking the expanded tree of an
    alias bomb would never end.
    """
    seen = set() if _seen is None else _seen
    if isinstance(data, (dict, list)):
        if id(data) in seen:
            return None
        seen.add(id(data))
    if isinstance(data, dict):
        for key, value in data.items():
            path = f"{where}.{key}" if where else str(key)
            if isinstance(key, str) and CREDENTIAL_PATTERN.search(key):
                return path
            found = find_credential_key(value, path, seen)
            if found:
                return found
    elif isinstance(data, list):
        for i, value in enumerate(data):
            found = find_credential_key(value, f"{where}[{i}]", seen)
            if found:
                return found
    return None


def cache_root() -> Path:
    """Where the driver keeps working copies of remote studies (ROBUST_STUDY_CACHE overrides)."""
    explicit = os.environ.get("ROBUST_STUDY_CACHE")
    if explicit:
        return Path(explicit).expanduser().resolve()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache").expanduser().resolve() / "robust-study"


def work_root(storage: str | os.PathLike[str]) -> Path:
    """The local folder that holds the studies of ``storage`` (itself, or the remote's working copy).

    A working copy's path depends only on the URI: Optuna's pickled searcher state names its
    SQLite file by absolute path, so a resumed driver must find it at the same place.
    """
    if not is_remote(storage):
        return Path(storage).expanduser().resolve()
    parts = urlsplit(str(storage))
    return cache_root() / parts.scheme / parts.netloc / parts.path.strip("/")


def study_uri(storage: str, name: str) -> str:
    return f"{storage.rstrip('/')}/{name}"


def _filesystem(uri: str, timeout: float | None = None) -> tuple[Any, str]:
    """A pyarrow filesystem and the path inside it. ``timeout`` makes a probe fail fast."""
    import pyarrow.fs as pafs

    parts = urlsplit(uri)
    path = (parts.netloc + parts.path).rstrip("/")
    if parts.scheme == "s3" and timeout is not None:
        # The constructor, unlike from_uri (what Ray's workers use), ignores the endpoint and
        # region variables: pass them on, or the probe would ask AWS instead.
        fs = pafs.S3FileSystem(connect_timeout=timeout, request_timeout=timeout,
                               endpoint_override=s3_endpoint(),
                               region=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION"),
                               retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=1))
        return fs, path
    fs, _ = pafs.FileSystem.from_uri(uri)
    return fs, path


def s3_endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def _has_credentials(scheme: str) -> bool:
    env = os.environ
    if scheme == "s3":
        return bool((env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY")) or env.get("AWS_PROFILE")
                    or env.get("AWS_WEB_IDENTITY_TOKEN_FILE"))
    return bool(env.get("GOOGLE_APPLICATION_CREDENTIALS"))


def check_remote(storage: str, timeout: float = 5.0) -> None:
    """Credentials present, endpoint reachable, bucket there: one ConfigError line otherwise.

    Runs before Ray starts and before anything is written.
    """
    if not is_remote(storage):
        return
    parts = urlsplit(storage)
    if not _has_credentials(parts.scheme):
        raise ConfigError(f"storage: {storage} needs credentials in the environment: {ENV_HINT[parts.scheme]}")
    # Without this the AWS SDKs may ask a cloud metadata address for credentials or region.
    os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
    import pyarrow.fs as pafs

    fs, _ = _filesystem(storage, timeout=timeout)
    endpoint = s3_endpoint() or "the default endpoint"
    try:
        info = fs.get_file_info(parts.netloc)
    except OSError as err:
        text = str(err)
        if "NETWORK_CONNECTION" in text or "connect" in text.lower() or "timed out" in text.lower():
            raise ConfigError(f"storage: cannot reach {endpoint} for {storage} (connection failed)") from None
        if "ACCESS_DENIED" in text or "403" in text or "InvalidAccessKeyId" in text or "SignatureDoesNotMatch" in text:
            raise ConfigError(f"storage: access to {parts.scheme}://{parts.netloc} denied: check the credentials "
                              f"in the environment ({ENV_HINT[parts.scheme]})") from None
        raise ConfigError(f"storage: {storage}: {text.splitlines()[0] if text else type(err).__name__}") from None
    if info.type == pafs.FileType.NotFound:
        raise ConfigError(f"storage: bucket {parts.netloc!r} does not exist at {endpoint}; create it first")


def remote_exists(storage: str, name: str, filename: str = STUDY_FILE) -> bool:
    import pyarrow.fs as pafs

    fs, path = _filesystem(study_uri(storage, name))
    return fs.get_file_info(f"{path}/{filename}").type == pafs.FileType.File


def study_exists(storage: str, name: str) -> bool:
    if is_remote(storage):
        check_remote(storage)
        return remote_exists(storage, name)
    return (work_root(storage) / name / STUDY_FILE).is_file()


def fetch_study(storage: str, name: str, *, include_tune: bool = False) -> Path:
    """The local folder of study ``name``; for a URI a fresh copy of what the URI holds.

    ``include_tune``: also Tune's trial folders (``sync`` reads them); otherwise they stay remote.

    Raises:
        ConfigError: storage unreachable, or no such study there.
    """
    local = work_root(storage) / name
    if not is_remote(storage):
        return local
    check_remote(storage)
    if not remote_exists(storage, name):
        raise ConfigError(f"no study {name!r} under {storage} (no {STUDY_FILE})")
    download(storage, name, include_tune=include_tune)
    return local


def download(storage: str, name: str, *, include_tune: bool = False) -> None:
    """Replace the local working copy of a remote study by the remote's files."""
    import pyarrow.fs as pafs

    fs, path = _filesystem(study_uri(storage, name))
    local = work_root(storage) / name
    if local.exists():
        shutil.rmtree(local)
    local.mkdir(parents=True)
    # The default MLflow store: a driver on another machine (or with a wiped cache) needs the
    # study's parent run; a store already here is this machine's own and at least as new.
    db = work_root(storage) / MLFLOW_DB
    root_fs, root = _filesystem(storage)
    if not db.exists() and root_fs.get_file_info(f"{root}/{MLFLOW_DB}").type == pafs.FileType.File:
        _get(root_fs, f"{root}/{MLFLOW_DB}", db)
    for info in fs.get_file_info(pafs.FileSelector(path, recursive=True)):
        relative = info.path[len(path) + 1:]
        if not include_tune and (relative == TUNE_DIR or relative.startswith(TUNE_DIR + "/")):
            continue
        target = local / relative
        if info.type == pafs.FileType.Directory:
            target.mkdir(parents=True, exist_ok=True)
        elif info.type == pafs.FileType.File:
            _get(fs, info.path, target)


def _get(fs: Any, path: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".part")
    with fs.open_input_stream(path) as src, tmp.open("wb") as dst:
        shutil.copyfileobj(src, dst, length=1 << 20)
    tmp.replace(target)


def _put(file: Path, fs: Any, path: str) -> None:
    # Object stores have no rename, but a single PUT is atomic: a reader sees the old object or
    # the new one, never half of it.
    with file.open("rb") as src, fs.open_output_stream(path) as dst:
        shutil.copyfileobj(src, dst, length=1 << 20)


def upload(storage: str, name: str) -> None:
    """Copy the local working copy's files (not Tune's, which Tune writes itself) to the URI,
    and the default MLflow store beside it."""
    fs, path = _filesystem(study_uri(storage, name))
    local = work_root(storage) / name
    for file in sorted(local.rglob("*")):
        if not file.is_file() or file.suffix in (".tmp", ".part") or file.relative_to(local).parts[0] == TUNE_DIR:
            continue
        _put(file, fs, f"{path}/{file.relative_to(local).as_posix()}")
    db = work_root(storage) / MLFLOW_DB
    if db.is_file():
        root_fs, root = _filesystem(storage)
        _put(db, root_fs, f"{root}/{MLFLOW_DB}")


def clear_local(storage: str, name: str) -> None:
    """Drop a stale working copy before a new study of the same name starts."""
    local = work_root(storage) / name
    if is_remote(storage) and local.exists():
        shutil.rmtree(local)


def tune_storage_path(storage: str, study_dir: Path, name: str) -> str:
    """What Ray Tune's ``storage_path`` gets: the study's URI, or the local study folder."""
    return study_uri(storage, name) if is_remote(storage) else str(study_dir)


def checkpoint_location(checkpoint: Any) -> str:
    """A Tune checkpoint as a string another process can open: a local path or a URI."""
    type_name = getattr(getattr(checkpoint, "filesystem", None), "type_name", "local")
    scheme = {"s3": "s3", "gcs": "gs"}.get(type_name)
    return f"{scheme}://{checkpoint.path}" if scheme else str(checkpoint.path)


@contextmanager
def local_copy(location: str) -> Iterator[str]:
    """A local folder with the files of ``location`` (itself when it is already local)."""
    if not is_remote(location):
        yield location
        return
    import tempfile

    import pyarrow.fs as pafs

    fs, path = _filesystem(location)
    with tempfile.TemporaryDirectory(prefix="robust-study-") as directory:
        pafs.copy_files(path, directory, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        yield directory
