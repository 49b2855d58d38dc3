"""A real two-host Ray cluster (network namespaces + veth, see tests/_netns.py) running real studies.

- a study submitted with ``ray job submit -- robust-study run`` completes with trials on both hosts;
- a study with ``address: <head>:6379`` in its spec, run on the head host, does the same;
- fault 4: mid-trial, the worker host is cut off (link down) or its Ray node stops; its trial is
  retried on the head from its last checkpoint and the study completes with every trial exactly
  once (trials.json and MLflow);
- without an address, the local instance stays on 127.0.0.1.

Each node offers one CPU and each trial takes one, so two concurrent trials must use both hosts.
All traffic stays inside the test's namespaces (docs/architecture.md, "Tests that cross a network"): every command that talks to the
cluster runs inside one of them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from _netns import RAY, VENV_BIN, TwoHostCluster, unavailable_reason

pytestmark = [pytest.mark.ray, pytest.mark.slow]

_REASON = unavailable_reason()
needs_namespaces = pytest.mark.skipif(_REASON is not None, reason=f"two-host cluster tests: {_REASON}")

NUM_TRIALS = 4


def cluster_spec(storage: Path, name: str, address: str | None, epochs: int = 2, *, models: bool = False,
                 **extra: Any) -> dict[str, Any]:
    spec = {
        "name": name,
        "data": {"name": "digits", "train_subset": 600},
        "model": {"backbone": "small_cnn"},
        "defenses": ["kap", "kwta"],
        "include_baseline": True,
        "training": {"epochs": epochs, "batch_size": 64},
        # KAP attacked as deployed only, as in conftest's write_spec (its noise-on EOT arm is
        # tested with the evaluation, not here).
        "search_eval": {"n_samples": 60, "attacks": [{"name": "pgd", "steps": 3}], "eps_curve": [0.1],
                        "check_samples": 30, "protocol_arms": "deployed"},
        "final_eval": {"n_samples": 40, "attacks": [{"name": "pgd", "steps": 5}], "eps_curve": [],
                       "check_samples": 20, "protocol_arms": "deployed"},
        "num_trials": NUM_TRIALS,
        "concurrency": 2,
        "resources": {"cpu": 1},
        # One filesystem seen by both hosts: the shared storage a real cluster needs. MLflow's
        # SQLite store lives there too; only the driver writes it.
        "storage": str(storage),
        # As conftest's write_spec: no MLflow model per trial (a third of a tiny trial's work)
        # unless ``models`` (the job-submit test: a worker host writes them into the shared storage).
        "mlflow": {"log_models": models},
        **extra,
    }
    if address is not None:
        spec["address"] = address
    return spec


def write_spec(tmp_path: Path, spec: dict[str, Any]) -> Path:
    path = tmp_path / f"{spec['name']}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def study_records(storage: Path, name: str) -> list[dict[str, Any]]:
    return json.loads((storage / name / "trials.json").read_text())


def nested_runs(storage: Path, experiment: str) -> list[Any]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{storage / 'mlflow.db'}")
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no MLflow experiment {experiment!r}"
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    return [r for r in runs if "mlflow.parentRunId" in r.data.tags]


def assert_complete_on(records: list[dict[str, Any]], storage: Path, name: str, hosts: set[str]) -> None:
    assert len(records) == NUM_TRIALS, records
    assert len({r["trial_id"] for r in records}) == NUM_TRIALS, "a trial was counted twice"
    assert all(r["status"] == "completed" for r in records), [(r["trial_id"], r["status"], r["reason"]) for r in records]
    assert {r["node_ip"] for r in records} == hosts, [(r["trial_id"], r["node_ip"]) for r in records]
    children = nested_runs(storage, name)
    assert len(children) == NUM_TRIALS
    assert len({c.data.tags["robust_study.trial_id"] for c in children}) == NUM_TRIALS
    assert all(c.info.status == "FINISHED" for c in children), [c.info.status for c in children]


@pytest.fixture(scope="module")
def cluster() -> Iterator[TwoHostCluster]:
    """One cluster shared by the two "study completes" tests (starting one costs ~20 s)."""
    c = TwoHostCluster()
    try:
        c.start()
        yield c
    finally:
        c.teardown()


@pytest.mark.server
@needs_namespaces
@pytest.mark.timeout(600)
def test_job_submit_runs_trials_on_both_hosts(cluster: TwoHostCluster, tmp_path: Path) -> None:
    storage = tmp_path / "shared"
    # No address in the spec: Ray gives the job's driver RAY_ADDRESS.
    spec = write_spec(tmp_path, cluster_spec(storage, "jobstudy", None, models=True))
    start = time.perf_counter()
    # The submitter is another machine on the cluster network: the worker host, reaching the head's
    # dashboard through the veth link, with the cluster's token. The job's driver runs on the head.
    proc = cluster.run_in(
        cluster.worker_ns,
        [str(RAY), "job", "submit", f"--address={cluster.dashboard_url}", "--submission-id=robust-study-job",
         "--", str(VENV_BIN / "robust-study"), "run", str(spec)],
        timeout=540, check=False, name="job-submit",
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert "succeeded" in output.lower(), output[-4000:]
    assert f"Ray: cluster at {cluster.gcs_address} (from RAY_ADDRESS), 2 nodes" in output, output[-4000:]
    assert_complete_on(study_records(storage, "jobstudy"), storage, "jobstudy", {cluster.head_ip, cluster.worker_ip})
    print(f"job-submitted study: {time.perf_counter() - start:.1f}s")


@pytest.mark.server
@needs_namespaces
@pytest.mark.timeout(600)
def test_spec_address_runs_trials_on_both_hosts(cluster: TwoHostCluster, tmp_path: Path) -> None:
    storage = tmp_path / "shared"
    spec = write_spec(tmp_path, cluster_spec(storage, "addrstudy", cluster.gcs_address))
    start = time.perf_counter()
    proc = cluster.run_in(cluster.head_ns, [str(VENV_BIN / "python"), "-m", "study", "run", str(spec)],
                          timeout=540, check=False, cwd=tmp_path, name="address-run")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert_complete_on(study_records(storage, "addrstudy"), storage, "addrstudy", {cluster.head_ip, cluster.worker_ip})
    print(f"address: study: {time.perf_counter() - start:.1f}s")


def trial_rows(study_dir: Path) -> dict[str, list[dict[str, Any]]]:
    """Every result each trial has reported so far (Tune's result.json, written as results arrive)."""
    rows: dict[str, list[dict[str, Any]]] = {}
    for path in (study_dir / "tune").glob("*/result.json"):
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line being written
                continue
            rows.setdefault(row["trial_id"], []).append(row)
    return rows


@pytest.mark.server
@needs_namespaces
@pytest.mark.timeout(600)
@pytest.mark.parametrize("fault", ["link_down", "node_stopped"])
def test_worker_host_lost_mid_study_reschedules_its_trial_on_head(fault: str, tmp_path: Path) -> None:
    """Fault 4: the worker host is cut off (link down) or its Ray node stops, mid-trial.

    ``node_stopped`` kills every process on the worker host, as ``ray stop --force`` there would
    (``ray stop`` itself matches processes machine-wide, see tests/_netns.py).
    """
    storage = tmp_path / "shared"
    cluster = TwoHostCluster()
    try:
        cluster.start()
        # Epochs of ~0.2 s: 30 of them keep the worker's trial mid-training for seconds after its
        # first checkpoint, so the fault reliably lands mid-trial. A checkpoint every epoch
        # (checkpoint_every_seconds: 0): epochs this short would otherwise save none before the
        # final one, and the retry would start over.
        spec = write_spec(tmp_path, cluster_spec(storage, "faultstudy", cluster.gcs_address, epochs=30,
                                                 checkpoint_every_seconds=0))
        start = time.perf_counter()
        log = tmp_path / "driver.log"
        driver = cluster.popen_in(cluster.head_ns, [str(VENV_BIN / "python"), "-m", "study", "run", str(spec)],
                                  log=log, cwd=tmp_path)
        try:
            victim = None
            deadline = time.monotonic() + 300
            while victim is None:
                assert driver.poll() is None, f"the study ended before the worker was cut off:\n{log.read_text()[-3000:]}"
                assert time.monotonic() < deadline, "no trial reported from the worker host"
                for trial_id, rows in trial_rows(storage / "faultstudy").items():
                    if rows[-1].get("node_ip") == cluster.worker_ip and not rows[-1].get("final"):
                        victim = trial_id
                time.sleep(0.2)
            if fault == "link_down":
                cluster.cut_worker_link()
            else:
                cluster.kill_worker_node()
            cut_at = time.perf_counter() - start
            returncode = driver.wait(timeout=420)
        finally:
            if driver.poll() is None:
                driver.kill()
                driver.wait(timeout=30)
        output = log.read_text()
        assert returncode == 0, output[-4000:]
    finally:
        cluster.teardown()

    records = study_records(storage, "faultstudy")
    assert len(records) == NUM_TRIALS, records
    assert len({r["trial_id"] for r in records}) == NUM_TRIALS, "a trial was counted twice"
    assert all(r["status"] == "completed" for r in records), [(r["trial_id"], r["status"], r["reason"]) for r in records]
    by_id = {r["trial_id"]: r for r in records}
    assert by_id[victim]["node_ip"] == cluster.head_ip, "the cut-off trial did not finish on the head"
    rows = trial_rows(storage / "faultstudy")[victim]
    on_worker = [r["epoch"] for r in rows if r["node_ip"] == cluster.worker_ip]
    on_head = [r["epoch"] for r in rows if r["node_ip"] == cluster.head_ip]
    assert on_worker and on_head, rows
    # Retried from its last checkpoint, not from scratch: the head continues where the worker stopped.
    assert on_head[0] > 1 and on_head[0] <= max(on_worker) + 1, (on_worker, on_head)
    children = nested_runs(storage, "faultstudy")
    assert len(children) == NUM_TRIALS, "the retried trial must keep its one MLflow run"
    assert len({c.data.tags["robust_study.trial_id"] for c in children}) == NUM_TRIALS
    assert all(c.info.status == "FINISHED" for c in children), [c.info.status for c in children]
    print(f"fault study ({fault}): worker lost at {cut_at:.1f}s, finished in {time.perf_counter() - start:.1f}s")


@pytest.mark.timeout(120)
def test_local_instance_stays_on_loopback(tmp_path: Path) -> None:
    """No address: Ray's node is 127.0.0.1 even though ray (ray.tune) was imported before init_ray."""
    code = (
        "from ray import tune  # run_study imports it before init_ray\n"
        "import json, ray\n"
        "from study.orchestration.runner import init_ray\n"
        "from study.spec import StudySpec\n"
        "init_ray(StudySpec.model_validate({'name': 'loopback'}))\n"
        "print(json.dumps({'nodes': [n['NodeManagerAddress'] for n in ray.nodes()],\n"
        "                  'gcs': ray.get_runtime_context().gcs_address}))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=100, cwd=tmp_path,
                          env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["nodes"] == ["127.0.0.1"], seen
    assert seen["gcs"].startswith("127.0.0.1:"), seen
