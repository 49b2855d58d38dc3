"""A real MLflow tracking server: a concurrent study logs every trial once; the server away at
launch is one clear error; the server away mid-study loses nothing (issue 5, fault 5)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import MlflowServer, free_port, write_spec

STUDY_FIELDS = ("val_clean_accuracy", "val_robust_accuracy")
PARENT_ARTIFACTS = {"front.csv", "front.png", "front.html", "best.yaml"}


def study_runs(uri: str, experiment: str) -> tuple[list, list]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no experiment {experiment!r} on {uri}"
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return parents, children


def assert_study_logged_once(uri: str, study_dir: Path, name: str) -> None:
    """Every trial of the study has exactly one complete nested run under one finished parent."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    records = json.loads((study_dir / "trials.json").read_text())
    parents, children = study_runs(uri, name)
    assert len(parents) == 1, [p.info.run_name for p in parents]
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    trial_ids = [c.data.tags["robust_study.trial_id"] for c in children]
    assert sorted(trial_ids) == sorted(r["trial_id"] for r in records), "MLflow runs != the study's trials"
    assert len(set(trial_ids)) == len(trial_ids), f"a trial was logged twice: {trial_ids}"
    assert all(c.data.tags["mlflow.parentRunId"] == parent.info.run_id for c in children)
    by_id = {c.data.tags["robust_study.trial_id"]: c for c in children}
    for record in records:
        child = by_id[record["trial_id"]]
        assert child.info.status in ("FINISHED", "FAILED", "KILLED"), (record["trial_id"], child.info.status)
        assert child.data.params.get("defense") == record["defense"]
        if record["status"] != "completed":
            assert child.info.status != "FINISHED"
            continue
        assert child.info.status == "FINISHED"
        for field in STUDY_FIELDS:
            assert child.data.metrics[field] == pytest.approx(record[field]), field
        assert any(k.startswith("flag.") for k in child.data.tags), child.data.tags
        # Per-epoch metrics are there once per epoch, not once per attempt to log them.
        history = client.get_metric_history(child.info.run_id, "epoch_val_accuracy")
        assert sorted(m.step for m in history) == [1, 2], [(m.step, m.timestamp) for m in history]
        assert "model.pt" in {a.path for a in client.list_artifacts(child.info.run_id)}
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert PARENT_ARTIFACTS <= artifacts, artifacts


@pytest.mark.server
@pytest.mark.ray
@pytest.mark.timeout(900)
def test_concurrent_study_logs_every_trial_once_to_a_server(logged_study: dict, mlflow_server: MlflowServer) -> None:
    assert logged_study["returncode"] == 0, logged_study["output"][-3000:]
    mlflow_server.start()
    assert_study_logged_once(mlflow_server.uri, logged_study["study_dir"], logged_study["name"])
    # The server stores the artifacts itself (proxied), so any node could read them.
    from mlflow.tracking import MlflowClient

    parents, _ = study_runs(mlflow_server.uri, logged_study["name"])
    assert parents[0].info.artifact_uri.startswith("mlflow-artifacts:")
    assert list((mlflow_server.root / "mlartifacts").rglob("front.png"))
    assert MlflowClient(tracking_uri=mlflow_server.uri).get_experiment_by_name("served") is not None


@pytest.mark.timeout(300)
def test_unreachable_server_at_launch_is_one_line_before_training(tmp_path: Path) -> None:
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    spec = write_spec(tmp_path, "nowhere", mlflow={"tracking_uri": uri})
    proc = subprocess.run([sys.executable, "-m", "study", "run", str(spec)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=240, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert uri in lines[0] and "cannot reach" in lines[0]
    assert not (tmp_path / "results" / "nowhere").exists(), "something was written before the check"


@pytest.mark.server
@pytest.mark.ray
@pytest.mark.timeout(900)
def test_server_restarted_mid_study_loses_and_duplicates_nothing(
    mlflow_server: MlflowServer, driver_factory, tmp_path: Path
) -> None:
    mlflow_server.start()
    # models: the trials' model folders go to the server through the outage too
    spec = write_spec(tmp_path, "outage", trials=3, models=True, mlflow={"tracking_uri": mlflow_server.uri})
    driver = driver_factory("run", str(spec), cwd=tmp_path,
                            env={"ROBUST_STUDY_MLFLOW_RETRY_S": "2", "ROBUST_STUDY_MLFLOW_GRACE_S": "300"})
    driver.wait_until(lambda: driver.trials_done() >= 1, 400, "the first trial to finish")
    mlflow_server.stop()
    assert driver.proc.poll() is None, "the study finished before the server could be taken away"
    mlflow_server.start()  # same port, same stores; ~30 s here, while the study goes on
    code = driver.wait(timeout=600)
    assert code == 0, driver.output[-3000:]
    assert "MLflow at" in driver.output and "failed" in driver.output, "the outage was never noticed"
    assert_study_logged_once(mlflow_server.uri, tmp_path / "results" / "outage", "outage")


@pytest.mark.server
@pytest.mark.ray
@pytest.mark.timeout(900)
def test_server_gone_for_good_fails_loudly_then_sync_logs_everything(
    mlflow_server: MlflowServer, driver_factory, tmp_path: Path
) -> None:
    from study.tracking import sync_study

    mlflow_server.start()
    # models: sync replays the trials' model folders too
    spec = write_spec(tmp_path, "gone", trials=3, models=True, mlflow={"tracking_uri": mlflow_server.uri})
    driver = driver_factory("run", str(spec), cwd=tmp_path,
                            env={"ROBUST_STUDY_MLFLOW_RETRY_S": "1", "ROBUST_STUDY_MLFLOW_GRACE_S": "3"})
    driver.wait_until(lambda: driver.trials_done() >= 1, 400, "the first trial to finish")
    mlflow_server.stop()
    code = driver.wait(timeout=600)
    assert code != 0, driver.output[-3000:]
    errors = [line for line in driver.output.splitlines() if line.startswith("robust-study run: ")]
    assert len(errors) == 1, driver.output[-3000:]  # one line, not a traceback
    match = re.search(r"(\d+) trial run\(s\) and the study's parent run are not logged", errors[0])
    assert match and int(match.group(1)) >= 1, errors[0]
    assert mlflow_server.uri in errors[0] and "robust-study sync gone" in errors[0], errors[0]
    study_dir = tmp_path / "results" / "gone"
    assert (study_dir / "trials.json").is_file(), "results must be kept on disk"

    mlflow_server.start()
    report = sync_study(study_dir)
    assert report.trials == 3 and 1 <= report.replayed <= int(match.group(1)) and report.parent_logged
    assert_study_logged_once(mlflow_server.uri, study_dir, "gone")
    again = sync_study(study_dir)  # idempotent: nothing left to log
    assert again.replayed == 0 and not again.parent_logged
    assert_study_logged_once(mlflow_server.uri, study_dir, "gone")


# --------------------------------------------------------------------------- buffering, no server


class FakeTrial:
    """The parts of a Tune trial the logger reads, backed by a trial folder like Tune's."""

    def __init__(self, root: Path, trial_id: str, defense: str) -> None:
        self.trial_id = trial_id
        self.config = {"defense": defense}
        self.status = "RUNNING"
        self.local_path = self.path = str(root / "tune" / f"_trainable_{trial_id}_1_defense={defense}")
        Path(self.path).mkdir(parents=True)
        (Path(self.path) / "params.json").write_text(json.dumps(self.config))
        self.last_result: dict = {}
        self.checkpoint = None
        self.error_file = None

    def report(self, result: dict) -> dict:
        result = {**result, "trial_id": self.trial_id, "timestamp": 1_800_000_000 + len(self.results())}
        with (Path(self.path) / "result.json").open("a") as out:
            out.write(json.dumps(result) + "\n")
        self.last_result = result
        return result

    def results(self) -> list:
        path = Path(self.path) / "result.json"
        return path.read_text().splitlines() if path.exists() else []

    def finish(self) -> dict:
        ckpt = Path(self.path) / "checkpoint_000002"
        ckpt.mkdir()
        (ckpt / "model.pt").write_bytes(b"weights")
        self.checkpoint = type("Ckpt", (), {"path": str(ckpt)})()
        flags = [{"id": "R1", "passed": True}]
        return self.report({"final": 1, "status": "completed", "val_clean_accuracy": 0.9, "val_robust_accuracy": 0.5,
                            "epoch": 2, "epochs_run": 2, "trusted": 1, "flags_json": json.dumps(flags)})


def test_logger_buffers_an_outage_and_replays_each_trial_once(tmp_path: Path, monkeypatch) -> None:
    from mlflow.tracking import MlflowClient

    from study.tracking import MlflowTrialLogger, StudyRun, sync_study

    monkeypatch.setenv("ROBUST_STUDY_MLFLOW_RETRY_S", "0")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    study = StudyRun(uri, "buffered", tmp_path / "mlartifacts")
    parent = study.start("buffered", None, params={"num_trials": 2}, tags={})
    logger = MlflowTrialLogger(uri, study.experiment_id, parent, "buffered")
    a, b = FakeTrial(tmp_path, "aaaa0001", "none"), FakeTrial(tmp_path, "bbbb0002", "kwta")

    logger.on_trial_start(0, [a, b], a)
    logger.on_trial_result(0, [a, b], a, a.report({"epoch": 1, "final": 0, "epoch_val_accuracy": 0.4}))

    real_log_batch = logger.client.log_batch
    outage = {"on": True}

    def flaky(*args, **kwargs):
        if outage["on"]:
            raise ConnectionError("connection refused")
        return real_log_batch(*args, **kwargs)

    monkeypatch.setattr(logger.client, "log_batch", flaky)
    # The server is away: a's second epoch and final result and all of b are buffered, nothing raises.
    logger.on_trial_result(0, [a, b], a, a.report({"epoch": 2, "final": 0, "epoch_val_accuracy": 0.6}))
    logger.on_trial_start(0, [a, b], b)
    logger.on_trial_result(0, [a, b], b, b.report({"epoch": 1, "final": 0, "epoch_val_accuracy": 0.3}))
    logger.on_trial_result(0, [a, b], a, a.finish())
    logger.on_trial_complete(0, [a, b], a)
    assert set(logger.pending) == {"aaaa0001", "bbbb0002"}

    outage["on"] = False  # back: b's next event replays a (finished) and keeps b buffered until it ends
    logger.on_trial_result(0, [a, b], b, b.report({"epoch": 2, "final": 0, "epoch_val_accuracy": 0.5}))
    assert set(logger.pending) == {"bbbb0002"}
    logger.on_trial_result(0, [a, b], b, b.finish())
    logger.on_trial_complete(0, [a, b], b)
    assert not logger.pending
    # A trial started by a driver that then died, which the resumed Tune never knew: its run goes.
    ghost = FakeTrial(tmp_path, "dddd0004", "none")
    logger.on_trial_start(0, [a, b, ghost], ghost)
    a.status = b.status = "TERMINATED"
    logger.on_experiment_end([a, b])
    study.finish()

    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([study.experiment_id])
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent]
    assert sorted(r.data.tags["robust_study.trial_id"] for r in children) == ["aaaa0001", "bbbb0002"]
    for run in children:
        assert run.info.status == "FINISHED"
        assert run.data.metrics["val_clean_accuracy"] == 0.9 and run.data.tags["flag.R1"] == "pass"
        history = client.get_metric_history(run.info.run_id, "epoch_val_accuracy")
        assert sorted(m.step for m in history) == [1, 2]  # a's epoch 1 was logged live AND replayed: once
        assert [f.path for f in client.list_artifacts(run.info.run_id)] == ["model.pt"]
    assert client.get_run(parent).info.status == "FINISHED"

    # sync on a complete study changes nothing.
    (tmp_path / "trials.json").write_text(json.dumps([{"trial_id": t.trial_id, "status": "completed"} for t in (a, b)]))
    (tmp_path / "study.json").write_text(json.dumps({"tracking_uri": uri, "parent_run_id": parent,
                                                     "experiment_id": study.experiment_id,
                                                     "spec": {"name": "buffered"}}))
    report = sync_study(tmp_path)
    assert (report.trials, report.replayed, report.parent_logged) == (2, 0, False)


def test_study_fails_loudly_when_the_store_stays_unreachable(tmp_path: Path, monkeypatch) -> None:
    from study.config import ConfigError
    from study.tracking import MlflowTrialLogger, StudyRun

    monkeypatch.setenv("ROBUST_STUDY_MLFLOW_RETRY_S", "0")
    monkeypatch.setenv("ROBUST_STUDY_MLFLOW_GRACE_S", "0")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    study = StudyRun(uri, "lost", tmp_path / "mlartifacts")
    parent = study.start("lost", None, params={}, tags={})
    logger = MlflowTrialLogger(uri, study.experiment_id, parent, "lost")
    trial = FakeTrial(tmp_path, "cccc0003", "none")

    def down(*args, **kwargs):
        raise ConnectionError("connection refused")

    monkeypatch.setattr(logger.client, "create_run", down)
    logger.on_trial_start(0, [trial], trial)
    logger.on_trial_result(0, [trial], trial, trial.finish())
    logger.on_trial_complete(0, [trial], trial)
    monkeypatch.setattr("study.tracking._Runs.__init__", lambda self, *a: (_ for _ in ()).throw(ConnectionError()))
    trial.status = "TERMINATED"
    logger.on_experiment_end([trial])
    with pytest.raises(ConfigError, match=r"1 trial run\(s\) and the study's parent run are not logged.*"
                                          r"robust-study sync lost"):
        study.finish()
