"""A real study end to end on local Ray (2 CPUs, tiny budget): MLflow runs, artifacts, export, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import write_spec

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[1]


def tiny_spec(tmp_path: Path, name: str = "tiny", trials: int = 4, **extra) -> Path:
    """conftest's tiny study with the baseline, KAP and k-WTA (unless ``defenses`` says otherwise)."""
    return write_spec(tmp_path, name, trials, **{"defenses": ["kap", "kwta"], **extra})


def cli(*args: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "study", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env
    )


def mlflow_runs(tracking_uri: str, experiment: str) -> tuple[list, list]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return parents, children


def test_study_end_to_end_records_runs_artifacts_and_exports(tmp_path: Path) -> None:
    spec = tiny_spec(tmp_path)
    proc = cli("run", str(spec), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Search front" in proc.stdout and "Verified front" in proc.stdout

    study_dir = tmp_path / "results" / "tiny"
    records = json.loads((study_dir / "trials.json").read_text())
    assert len(records) == 4
    # The paper defaults are enqueued first: the baseline, KAP and k-WTA all ran.
    assert {r["defense"] for r in records} >= {"none", "kap", "kwta"}
    completed = [r for r in records if r["status"] == "completed"]
    assert completed, records
    for r in completed:
        assert 0.0 <= r["val_robust_accuracy"] <= r["val_clean_accuracy"] <= 1.0
    front = [r for r in records if r["on_front"]]
    assert front and all(r["trusted"] for r in front)
    assert all(r.get("final") for r in front), "front trials were not re-evaluated with the final attacks"
    for name in ("front.csv", "front_final.csv", "front.png", "front.html", "hypervolume.csv", "hypervolume.png",
                 "timeline.png", "best.yaml", "optuna.db"):
        assert (study_dir / name).stat().st_size > 0, name

    # Tune's files per trial: result.json (replay reads it) and progress.csv, no TensorBoard file;
    # the experiment snapshot keeps no running statistics of a finished trial (tune_state).
    trial_dirs = [p for p in (study_dir / "tune").iterdir() if p.is_dir()]
    assert len(trial_dirs) == 4
    for folder in trial_dirs:
        assert (folder / "result.json").stat().st_size > 0 and (folder / "progress.csv").is_file()
        assert not list(folder.glob("events.out.tfevents*")), sorted(p.name for p in folder.iterdir())
    snapshot = json.loads(max((study_dir / "tune").glob("experiment_state-*.json")).read_text())
    states = [json.loads(run_metadata) for _, run_metadata in snapshot["trial_data"]]
    assert len(states) == 4 and all(s["last_result"] for s in states)
    assert all(s["metric_analysis"] == {} and s["metric_n_steps"] == {} for s in states)

    uri = f"sqlite:///{tmp_path / 'results' / 'mlflow.db'}"
    parents, children = mlflow_runs(uri, "tiny")
    assert len(parents) == 1 and len(children) == 4
    assert all(c.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for c in children)
    finished = [c for c in children if c.info.status == "FINISHED"]
    assert len(finished) == len(completed)
    for child in finished:
        assert "val_clean_accuracy" in child.data.metrics and "val_robust_accuracy" in child.data.metrics
        assert any(k.startswith("flag.") for k in child.data.tags)
        assert child.data.params["defense"] in ("none", "kap", "kwta")
    from mlflow.tracking import MlflowClient

    artifacts = {a.path for a in MlflowClient(tracking_uri=uri).list_artifacts(parents[0].info.run_id)}
    assert {"front.csv", "front.png", "front.html", "hypervolume.png", "timeline.png", "best.yaml"} <= artifacts
    child_artifacts = {a.path for a in MlflowClient(tracking_uri=uri).list_artifacts(finished[0].info.run_id)}
    assert "model.pt" in child_artifacts

    # The evaluation-cost benchmark on this study: every completed trial attacked with the strong
    # suite; the verification it compares against is the one this study ran.
    from study.bench.evaluation import bench_evaluation, format_evaluation

    cost = bench_evaluation("tiny", tmp_path / "results", workers=1)
    assert cost["trials"] == len(completed)
    assert cost["strong_everywhere_s"] > 0 and cost["verify_attack_s"] > 0
    assert cost["verify_attack_s"] == pytest.approx(sum(r["final"]["seconds"] for r in records if r.get("final")))
    assert {t["number"] for t in cost["front_as_run"]} == {r["number"] for r in records if r["on_final_front"]}
    assert cost["front_strong_everywhere"], format_evaluation(cost)

    # Optuna saw every trial once.
    import optuna

    ot = optuna.load_study(study_name="tiny", storage=f"sqlite:///{study_dir / 'optuna.db'}")
    assert len(ot.trials) == 4

    # pareto prints the front; export → trial runs the exported configs as they are.
    table = cli("pareto", "tiny", "--storage", str(tmp_path / "results"), cwd=tmp_path)
    assert table.returncode == 0 and str(front[0]["number"]) in table.stdout
    out = tmp_path / "best.yaml"
    exported = cli("export", "tiny", "--storage", str(tmp_path / "results"), "--out", str(out), cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr
    document = yaml.safe_load(out.read_text())
    assert document["trials"] and all("config" in t and "metrics" in t for t in document["trials"])
    first = document["trials"][0]
    single = tmp_path / "one.yaml"
    single.write_text(yaml.safe_dump(first["config"]))
    rerun = cli("trial", str(single), "--out", str(tmp_path / "rerun"), cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    rerun_result = json.loads((tmp_path / "rerun" / "result.json").read_text())
    # Same config, same seed, same CPU: the exported trial reproduces its search numbers.
    assert rerun_result["clean_accuracy"] == pytest.approx(first["metrics"]["val_clean_accuracy"], abs=1e-9)
    assert rerun_result["robust_accuracy"] == pytest.approx(first["metrics"]["val_robust_accuracy"], abs=1e-9)


def test_resume_after_driver_killed_finishes_without_duplicates(tmp_path: Path) -> None:
    spec = tiny_spec(tmp_path, name="resumable", trials=6, training={"epochs": 4, "batch_size": 64})
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    driver = subprocess.Popen(
        [sys.executable, "-m", "study", "run", str(spec)], cwd=tmp_path, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    study_dir = tmp_path / "results" / "resumable"
    deadline = time.monotonic() + 300
    done_lines = 0
    try:
        assert driver.stdout is not None
        for line in driver.stdout:
            if line.startswith("[") and "done" in line:
                done_lines += 1
            if done_lines >= 2:
                break
            assert time.monotonic() < deadline, "study made no progress"
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait(timeout=60)
    assert not (study_dir / "trials.json").exists(), "the study finished before it could be interrupted"

    resumed = cli("resume", "resumable", "--storage", str(tmp_path / "results"), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    records = json.loads((study_dir / "trials.json").read_text())
    assert len(records) == 6
    assert len({r["trial_id"] for r in records}) == 6
    uri = f"sqlite:///{tmp_path / 'results' / 'mlflow.db'}"
    parents, children = mlflow_runs(uri, "resumable")
    assert len(parents) == 1
    assert len(children) == 6
    assert len({c.data.tags["robust_study.trial_id"] for c in children}) == 6
    # Optuna: each completed trial once; nothing left RUNNING (an orphan of the killed driver,
    # asked for after Tune's last snapshot, is closed as FAIL; the resumed study replaced it).
    import optuna

    ot = optuna.load_study(study_name="resumable", storage=f"sqlite:///{study_dir / 'optuna.db'}")
    states = [t.state.name for t in ot.trials]
    assert "RUNNING" not in states, states
    # Completed and trusted → COMPLETE; an untrusted evaluation is told as FAIL (not evidence).
    assert states.count("COMPLETE") == sum(r["status"] == "completed" and r["trusted"] for r in records)
    assert set(states) <= {"COMPLETE", "FAIL"}, states


@pytest.mark.parametrize("rule", ["mo_asha", "asha"])
def test_early_stopped_trials_never_reach_the_front_or_optuna(tmp_path: Path, rule: str) -> None:
    # Early stopping on (MO-ASHA or ASHA): trials cut short are recorded as "stopped", kept off the
    # front, and told to Optuna as pruned (Ray's OptunaSearch would otherwise tell it their
    # under-trained numbers).
    spec = tiny_spec(tmp_path, name="asha", trials=6, training={"epochs": 4, "batch_size": 64},
                     early_stopping={"enabled": True, "rule": rule, "grace_epochs": 1, "reduction_factor": 2})
    proc = cli("run", str(spec), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = json.loads((tmp_path / "results" / "asha" / "trials.json").read_text())
    assert len(records) == 6
    stopped = [r for r in records if r["status"] == "stopped"]
    assert stopped, "ASHA stopped no trial"
    assert not any(r["on_front"] for r in stopped)
    for r in stopped:  # what a stopped trial spent stays in its record (timeline, worker-seconds)
        assert r["val_clean_accuracy"] is None and r["eval_seconds"] is None, r
        assert 0 < r["train_seconds"] <= r["ended_at"] - r["started_at"], r
    assert (tmp_path / "results" / "asha" / "timeline.png").is_file()
    import optuna

    study = optuna.load_study(study_name="asha", storage=f"sqlite:///{tmp_path / 'results' / 'asha' / 'optuna.db'}")
    states = [t.state.name for t in study.trials]
    assert states.count("PRUNED") == len(stopped)
    assert states.count("COMPLETE") == sum(r["status"] == "completed" and r["trusted"] for r in records)
    assert states.count("FAIL") == sum(r["status"] == "completed" and not r["trusted"] for r in records)
