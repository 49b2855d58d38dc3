"""Each trial's network as an MLflow PyTorch model, and the front's in the model registry.

The work is split along the study's rule that only the driver writes to the tracking store:

* the trial's worker, which has the trained network and the data in hand, writes an MLflow model
  folder (``mlflow_model/``: weights, signature, an input example of real test images) into the
  trial's final checkpoint — :func:`save_trial_model`, local files only;
* the driver uploads that folder as the run's logged model ``model`` — :func:`log_trial_model` —
  so ``mlflow.pytorch.load_model("runs:/<run_id>/model")`` returns the network; replaying a trial
  after an outage finds the folder in the checkpoint like every other file;
* ``robust-study export --register NAME`` registers the front's logged models
  (:func:`front_models`, :func:`register_models`).

Format: MLflow 3 saves PyTorch models as ``torch.export`` programs (``pt2``) and refuses to load
pickled ones unless ``MLFLOW_ALLOW_PICKLE_DESERIALIZATION=true``. Some defenses do Python
arithmetic on the batch size (top-k convolution's memory-bounded chunks, KAF's reshapes), which
``torch.export`` freezes to the example's batch size; such a program fails on any other batch. So
each export is checked on another batch size (and, for deterministic models, against the
network's own outputs); one that fails is saved pickled instead, with the ``defenses`` package
inside (its only code), and tagged ``robust_study.model_format: pickle``.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from study.errors import ConfigError

log = logging.getLogger(__name__)

MODEL_DIR = "mlflow_model"  # inside a trial's final checkpoint
MODEL_NAME = "model"  # the logged model's name: runs:/<run_id>/model
FORMAT_TAG = "robust_study.model_format"


# --------------------------------------------------------------------------- worker side


def save_trial_model(trial_dir: str | Path, example: Any, *, stochastic: bool) -> float | None:
    """Write ``trial_dir/mlflow_model`` from the trial's saved weights; the seconds it took.

    Args:
        trial_dir: a folder :func:`study.trial.save_trial` wrote (``config.yaml``, ``model.pt``).
        example: a small batch of real inputs (N ≥ 2, C, H, W) in [0, 1]: the signature and the
            input example shown by MLflow.
        stochastic: the network is randomised (outputs differ call to call): the export is then
            checked for running on another batch size only.

    Returns:
        Seconds spent, or None when no model could be written (logged as a warning: the trial's
        results stand without it).
    """
    from study.trial import load_model

    start = time.perf_counter()
    out = Path(trial_dir) / MODEL_DIR
    try:
        model = load_model(trial_dir)  # exactly what model.pt holds, in eval mode
        _save(model, out, example.detach().cpu().float(), stochastic)
    except Exception as err:  # noqa: BLE001 - a model MLflow cannot save must not fail the trial
        shutil.rmtree(out, ignore_errors=True)
        log.warning("trial %s: no MLflow model logged (%s: %s)", Path(trial_dir).name, type(err).__name__,
                    str(err).strip().splitlines()[0] if str(err).strip() else "")
        return None
    return time.perf_counter() - start


def _save(model: Any, out: Path, example: Any, stochastic: bool) -> None:
    import mlflow.pytorch
    import torch
    from mlflow.models import infer_signature

    with torch.no_grad():
        signature = infer_signature(example.numpy(), model(example).numpy())
    # Given requirements: without them MLflow infers them by loading the model in a subprocess.
    common = {"signature": signature, "input_example": example.numpy(),
              "pip_requirements": [f"torch=={torch.__version__.split('+')[0]}"]}
    with _no_package_scan():
        try:
            mlflow.pytorch.save_model(model, str(out), serialization_format="pt2", **common)
            _check_export(out, model, example, stochastic)
            return
        except Exception as err:  # noqa: BLE001 - torch.export refuses many constructs; pickle takes all
            log.info("torch.export of %s unusable (%s); saving it pickled", out, str(err).strip().splitlines()[:1])
            shutil.rmtree(out, ignore_errors=True)
        import defenses

        mlflow.pytorch.save_model(model, str(out), serialization_format="pickle",
                                  code_paths=[str(Path(defenses.__file__).parent)], **common)


@contextmanager
def _no_package_scan() -> Iterator[None]:
    """Save without MLflow's scan of every installed distribution (1.5 s per trial worker here).

    Before saving, MLflow checks the model's requirements against what is installed. The check
    reads each version with importlib.metadata; only for a requirement whose distribution has no
    metadata does it fall back on a module-to-distribution map, built once per process by reading
    every installed distribution's file list (``packages_distributions``). Our requirements are
    torch and mlflow, both installed with metadata, so the map is never consulted: while saving it
    is left empty, and afterwards unbuilt again, so that anything else in the process that infers
    requirements (and does need it) still builds it in full. MLflow's private names: when they
    change, this does nothing and the scan runs as before.
    """
    from mlflow.utils import requirements_utils as ru

    if getattr(ru, "_MODULES_TO_PACKAGES", ()) is not None or getattr(ru, "_PACKAGES_TO_MODULES", ()) is not None:
        yield
        return
    ru._MODULES_TO_PACKAGES = {}
    try:
        yield
    finally:
        ru._MODULES_TO_PACKAGES = ru._PACKAGES_TO_MODULES = None


def _check_export(out: Path, model: Any, example: Any, stochastic: bool) -> None:
    import torch

    exported = torch.export.load(str(out / "data" / "model.pt2")).module()
    batch = torch.cat([example, example[:1]])  # another batch size than the example's
    with torch.no_grad():
        got, want = exported(batch), model(batch)
    if got.shape != want.shape:
        raise ValueError(f"exported model returns {tuple(got.shape)}, the network {tuple(want.shape)}")
    if not stochastic:
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def model_format(model_dir: Path) -> str:
    return "pt2" if (model_dir / "data" / "model.pt2").is_file() else "pickle"


# --------------------------------------------------------------------------- driver side


def logged_model(client: Any, experiment_id: str, run_id: str) -> Any | None:
    """The run's complete (READY) logged model ``model``, if any."""
    from mlflow.entities import LoggedModelStatus

    for model in client.search_logged_models([experiment_id], filter_string=f"source_run_id = '{run_id}'"):
        if model.name == MODEL_NAME and model.status == LoggedModelStatus.READY:
            return model
    return None


def log_trial_model(client: Any, experiment_id: str, run_id: str, model_dir: Path) -> str:
    """Upload a folder :func:`save_trial_model` wrote as the run's logged model; its id.

    Idempotent (a replay finds the model already there); marked READY only once every file is
    uploaded, so a failure halfway leaves a PENDING model that the replay replaces.
    """
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus
    from mlflow.models import Model

    existing = logged_model(client, experiment_id, run_id)
    if existing is not None:
        return existing.model_id
    model = client.create_logged_model(experiment_id, name=MODEL_NAME, source_run_id=run_id,
                                       tags={FORMAT_TAG: model_format(model_dir)})
    client.log_model_artifacts(model.model_id, str(model_dir))
    # The MLmodel file names its run and model, as mlflow.pytorch.log_model writes it.
    meta = Model.load(str(model_dir / "MLmodel"))
    meta.run_id, meta.model_id, meta.model_uuid = run_id, model.model_id, model.model_id
    meta.artifact_path = model.artifact_location
    with tempfile.TemporaryDirectory() as tmp:
        meta.save(str(Path(tmp) / "MLmodel"))
        client.log_model_artifacts(model.model_id, tmp)
    client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=0)])
    client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
    return model.model_id


# --------------------------------------------------------------------------- registry


def front_models(state: dict[str, Any], front: list[dict[str, Any]]) -> list[tuple[dict[str, Any], Any]]:
    """(record, logged model) for every front trial of a study, from its tracking store.

    Raises:
        ConfigError: the store is unreachable, or a front trial has no logged model (nothing is
            registered then).
    """
    from study.tracking.store import PARENT_TAG, TRIAL_ID_TAG, _client, check_reachable

    uri, parent = state["tracking_uri"], state["parent_run_id"]
    if not front:
        raise ConfigError("--register: the study's front is empty; nothing to register")
    check_reachable(uri)
    client = _client(uri)
    experiment_id = state.get("experiment_id") or client.get_run(parent).info.experiment_id
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent}'", max_results=50000)
    run_of = {r.data.tags.get(TRIAL_ID_TAG): r.info.run_id for r in runs}
    pairs, missing = [], []
    for record in front:
        run_id = run_of.get(record["trial_id"])
        model = logged_model(client, experiment_id, run_id) if run_id else None
        if model is None:
            missing.append(str(record["number"]))
        pairs.append((record, model))
    if missing:
        raise ConfigError(
            f"--register: front trial(s) {', '.join(missing)} have no logged MLflow model in {uri} "
            "(the spec's mlflow.log_models was off, or the study's runs are not synced: robust-study sync)"
        )
    return pairs


def check_registry_name(name: str) -> None:
    """A registered model name: not empty, no quotes (MLflow's search filters quote it)."""
    if not name.strip() or any(c in name for c in "'\"`"):
        raise ConfigError(f"--register: {name!r} is not a usable model name; use letters, digits, '.', '-', '_' or spaces")


def register_models(uri: str, name: str, pairs: list[tuple[dict[str, Any], Any]]) -> list[Any]:
    """One version of registered model ``name`` per front trial (created if new); the versions.

    A trial whose model is already a version of ``name`` keeps it (running export twice adds
    nothing). Each version is tagged with the trial number, the defense and whether the final
    (strong) attacks verified it.

    Raises:
        ConfigError: MLflow refuses the name.
    """
    from mlflow.exceptions import MlflowException

    from study.tracking.store import _client

    client = _client(uri)
    try:
        client.get_registered_model(name)
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise ConfigError(f"--register: {name!r}: {str(err).splitlines()[0]}") from None
        try:
            client.create_registered_model(name, description="Pareto-front models of robust-study studies")
        except MlflowException as create_err:
            raise ConfigError(f"--register: {name!r}: {str(create_err).splitlines()[0]}") from None
    # By run: the SQL registry does not return a version's model id (mlflow 3.17); a run has one model.
    known = {v.run_id for v in client.search_model_versions(f"name = '{name}'")}
    versions = []
    for record, model in pairs:
        if model.source_run_id in known:
            continue
        final = record.get("final") or {}
        # The model's own location, not models:/<id>: MLflow's SQL registry would look that up
        # in the process's default tracking store, not this client's (mlflow 3.17).
        versions.append(client.create_model_version(
            name, source=model.artifact_location, run_id=model.source_run_id, model_id=model.model_id,
            tags={"robust_study.trial_number": str(record["number"]), "robust_study.defense": str(record["defense"]),
                  "robust_study.verified": str(bool(final) and bool(final.get("trusted"))).lower()},
        ))
    return versions
