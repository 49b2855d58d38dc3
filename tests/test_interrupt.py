"""Ctrl-C, then resume (real CLI, local Ray, tiny budget): every trial is counted once and nothing
is lost — trials.json, MLflow and Optuna agree trial for trial."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import write_spec

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(900)]


def test_ctrl_c_then_resume_counts_every_trial_once_in_every_store(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    spec = write_spec(tmp_path, "ctrlc", 4, training={"epochs": 3, "batch_size": 64})
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    driver = subprocess.Popen(
        [sys.executable, "-m", "study", "run", str(spec)],
        cwd=tmp_path,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    study_dir = tmp_path / "results" / "ctrlc"
    output: list[str] = []
    try:
        assert driver.stdout is not None
        deadline = time.monotonic() + 400
        for line in driver.stdout:
            output.append(line)
            if line.startswith("[") and "done" in line:  # one trial over, the next ones running
                driver.send_signal(signal.SIGINT)  # the driver only, as Ctrl-C reaches it
                break
            assert time.monotonic() < deadline, "study made no progress"
        output += driver.stdout.readlines()
        code = driver.wait(timeout=300)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait(timeout=60)
    text = "".join(output)
    # Interrupted, not finished: exit 130, the line that says how to continue, nothing recorded.
    assert code == 130, text[-3000:]
    assert "robust-study resume ctrlc" in text, text[-3000:]
    assert json.loads((study_dir / "study.json").read_text())["status"] == "interrupted"
    assert not (study_dir / "trials.json").exists()

    resumed = subprocess.run(
        [sys.executable, "-m", "study", "resume", "ctrlc", "--storage", str(tmp_path / "results")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    records = json.loads((study_dir / "trials.json").read_text())
    ids = [r["trial_id"] for r in records]
    assert len(ids) == len(set(ids)) == 4
    assert json.loads((study_dir / "study.json").read_text())["status"] == "finished"

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'results' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("ctrlc")
    children = [r for r in client.search_runs([experiment.experiment_id]) if "mlflow.parentRunId" in r.data.tags]
    assert sorted(c.data.tags["robust_study.trial_id"] for c in children) == sorted(ids)

    import optuna

    ot = optuna.load_study(study_name="ctrlc", storage=f"sqlite:///{study_dir / 'optuna.db'}")
    states = [t.state.name for t in ot.trials]
    assert len(states) == len(ids), states
    # The trials cut by Ctrl-C were finished by the resumed search and told to Optuna as such.
    assert states.count("COMPLETE") == sum(r["status"] == "completed" and r["trusted"] for r in records), states
    assert "RUNNING" not in states
