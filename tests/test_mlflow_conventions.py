"""MLflow conventions: the tracking URI found as MLflow programs find it, a model-training
experiment, MLflow's system tags on runs, each trial's network as a loadable MLflow PyTorch model
and the front in the model registry."""

from __future__ import annotations

import getpass
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Driver, write_spec

from study.errors import ConfigError
from study.mlflow_conventions import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, resolve_tracking_uri

# --------------------------------------------------------------------------- the URI (pure)


def test_tracking_uri_precedence_flag_spec_environment_default(tmp_path: Path) -> None:
    env = {"MLFLOW_TRACKING_URI": "http://127.0.0.1:5005"}
    default = f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    assert resolve_tracking_uri("sqlite:///flag.db", "http://spec:5000", env, tmp_path) == "sqlite:///flag.db"
    assert resolve_tracking_uri(None, "http://spec:5000", env, tmp_path) == "http://spec:5000"
    assert resolve_tracking_uri(None, None, env, tmp_path) == "http://127.0.0.1:5005"
    assert resolve_tracking_uri(None, None, {}, tmp_path) == default
    # Empty values are "not given" (an exported-but-empty variable must not mean "a folder named ''").
    assert resolve_tracking_uri("", " ", {"MLFLOW_TRACKING_URI": ""}, tmp_path) == default


@pytest.mark.parametrize(("flag", "spec", "env", "source"), [
    ("localhost:5000", None, {}, "--tracking-uri"),
    (None, "127.0.0.1:5000", {}, "mlflow.tracking_uri"),
    (None, None, {"MLFLOW_TRACKING_URI": "htp://typo:5000"}, "MLFLOW_TRACKING_URI"),
])
def test_a_uri_mlflow_would_misread_is_refused_naming_its_source(tmp_path, flag, spec, env, source) -> None:
    with pytest.raises(ConfigError, match=source) as err:
        resolve_tracking_uri(flag, spec, env, tmp_path)
    assert "http(s)://host:port" in str(err.value) and "\n" not in str(err.value)


def run_cli(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "study", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})})


def test_bad_tracking_uri_flag_is_one_line_exit_2_before_anything(tmp_path: Path) -> None:
    spec = write_spec(tmp_path, "refused", trials=1)
    proc = run_cli("run", str(spec), "--tracking-uri", "localhost:5000", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "--tracking-uri" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "results").exists() and not (tmp_path / "localhost:5000").exists()


def test_existing_experiment_gets_the_model_training_kind_once(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    from study.tracking import ensure_experiment

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    old = client.create_experiment("made-before", artifact_location=(tmp_path / "a").as_uri())
    ensure_experiment(client, "made-before", tmp_path)
    assert client.get_experiment(old).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    # A kind someone chose stays.
    chosen = client.create_experiment("chosen", tags={EXPERIMENT_KIND_TAG: "genai_development"})
    ensure_experiment(client, "chosen", tmp_path)
    assert client.get_experiment(chosen).tags[EXPERIMENT_KIND_TAG] == "genai_development"


# --------------------------------------------------------------------------- one real study


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """A 2-trial study (baseline + k-WTA) run from a git working copy, its spec naming no
    tracking store and MLFLOW_TRACKING_URI pointing at a SQLite file elsewhere."""
    root = tmp_path_factory.mktemp("conventions")
    work, store = root / "work", root / "elsewhere"
    work.mkdir()
    store.mkdir()
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid"]
    spec = write_spec(work, "conv", trials=2, models=True)  # its tests read the logged models
    subprocess.run([*git, "init", "-q", str(work)], check=True)
    subprocess.run([*git, "-C", str(work), "add", spec.name], check=True)
    subprocess.run([*git, "-C", str(work), "commit", "-q", "-m", "spec"], check=True)
    head = subprocess.run(["git", "-C", str(work), "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()
    uri = f"sqlite:///{store / 'custom.db'}"
    assert "mlflow" not in spec.read_text()
    driver = Driver("run", str(spec), cwd=work, env={"MLFLOW_TRACKING_URI": uri})
    try:
        code = driver.wait(timeout=800)
    finally:
        driver.stop()
    assert code == 0, driver.output[-4000:]
    study_dir = work / "results" / "conv"
    yield {"uri": uri, "work": work, "head": head, "study_dir": study_dir,
           "records": json.loads((study_dir / "trials.json").read_text()),
           "state": json.loads((study_dir / "study.json").read_text())}


def _runs(uri: str) -> tuple[object, list, list]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("conv")
    assert experiment is not None, f"no experiment 'conv' in {uri}"
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    return experiment, parents, [r for r in runs if "mlflow.parentRunId" in r.data.tags]


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_runs_go_to_the_store_the_environment_names(study: dict) -> None:
    assert study["state"]["tracking_uri"] == study["uri"]
    _, parents, children = _runs(study["uri"])
    assert len(parents) == 1 and len(children) == len(study["records"]) == 2
    assert not (study["work"] / "results" / "mlflow.db").exists()  # the default store was never made


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_experiment_is_model_training_and_runs_carry_system_tags(study: dict) -> None:
    experiment, parents, children = _runs(study["uri"])
    assert experiment.tags.get(EXPERIMENT_KIND_TAG) == EXPERIMENT_KIND
    for run in parents + children:
        tags = run.data.tags
        assert tags.get("mlflow.user") == getpass.getuser()
        assert tags.get("mlflow.source.type") == "LOCAL"
        assert tags.get("mlflow.source.name", "").endswith(("study/__main__.py", "robust-study")), tags
        assert tags.get("mlflow.source.git.commit") == study["head"], tags  # the working directory's


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_logged_model_loads_and_predicts_like_the_saved_weights(study: dict, monkeypatch) -> None:
    import mlflow
    import mlflow.pytorch
    import torch

    from study.config import load_trial_config
    from study.data import eval_tensors, load_data
    from study.trial import load_model

    monkeypatch.setenv("MLFLOW_TRACKING_URI", study["uri"])
    assert mlflow.get_tracking_uri() == study["uri"]
    _, _, children = _runs(study["uri"])
    run_of = {r.data.tags["robust_study.trial_id"]: r for r in children}
    completed = [r for r in study["records"] if r["status"] == "completed"]
    assert completed
    for record in completed:
        run = run_of[record["trial_id"]]
        assert run.data.metrics.get("model_seconds", 0) > 0  # the worker wrote it
        logged = mlflow.pytorch.load_model(f"runs:/{run.info.run_id}/model")
        saved = load_model(record["checkpoint"])
        config = load_trial_config(Path(record["checkpoint"]) / "config.yaml")
        x, _ = eval_tensors(load_data(config.data, seed=config.seed).test, 7, seed=1)  # not the example's size
        with torch.no_grad():
            torch.testing.assert_close(logged(x), saved(x))
        info = mlflow.models.get_model_info(f"runs:/{run.info.run_id}/model")
        assert info.signature is not None and list(info.signature.inputs.to_dict()[0]["tensor-spec"]["shape"]) == [
            -1, 1, 8, 8]  # any batch size of digits images
        assert info.run_id == run.info.run_id


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_export_register_creates_one_version_per_front_trial(study: dict, monkeypatch) -> None:
    from mlflow.tracking import MlflowClient

    storage = str(study["study_dir"].parent)
    front = [r for r in study["records"] if r.get("on_final_front")] or [r for r in study["records"] if r["on_front"]]
    assert front
    # A bad name: one line, exit 2, nothing written.
    bad = run_cli("export", "conv", "--storage", storage, "--out", "bad.yaml", "--register", "it's", cwd=study["work"])
    assert bad.returncode == 2 and "--register" in bad.stderr and not (study["work"] / "bad.yaml").exists()

    out = run_cli("export", "conv", "--storage", storage, "--out", "best.yaml", "--register", "robust-front",
                  cwd=study["work"])
    assert out.returncode == 0, out.stderr[-3000:]
    client = MlflowClient(tracking_uri=study["uri"])
    versions = client.search_model_versions("name = 'robust-front'")
    assert sorted(int(v.tags["robust_study.trial_number"]) for v in versions) == sorted(r["number"] for r in front)
    by_number = {r["number"]: r for r in front}
    for version in versions:
        record = by_number[int(version.tags["robust_study.trial_number"])]
        assert version.tags["robust_study.defense"] == record["defense"]
        verified = bool(record.get("final")) and bool(record["final"].get("trusted"))
        assert version.tags["robust_study.verified"] == str(verified).lower()
        assert version.run_id in {r.info.run_id for r in _runs(study["uri"])[2]}
    # A registered version loads as the trial's network.
    import mlflow.pytorch
    import torch

    from study.trial import load_model

    version = versions[0]
    checkpoint = by_number[int(version.tags["robust_study.trial_number"])]["checkpoint"]
    x = torch.rand(5, 1, 8, 8)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", study["uri"])  # models:/ URIs resolve in the default store
    registered = mlflow.pytorch.load_model(f"models:/robust-front/{version.version}")
    with torch.no_grad():
        torch.testing.assert_close(registered(x), load_model(checkpoint)(x))
    # Again: the front is registered already, no new versions.
    again = run_cli("export", "conv", "--storage", storage, "--out", "best.yaml", "--register", "robust-front",
                    cwd=study["work"])
    assert again.returncode == 0, again.stderr[-3000:]
    assert len(client.search_model_versions("name = 'robust-front'")) == len(versions)


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_register_refuses_a_front_trial_without_a_model(study: dict) -> None:
    from study.mlflow_model import front_models

    ghost = {"trial_id": "not-a-trial", "number": 99, "defense": "none"}
    with pytest.raises(ConfigError, match="99"):
        front_models(study["state"], [*study["records"][:1], ghost])
