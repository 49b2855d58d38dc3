"""``storage: s3://bucket/prefix`` against an S3-compatible server (moto) on 127.0.0.1.

Fast tests: refused storage values and unreachable / credential-less / bucket-less stores, each one
line and exit 2 with nothing written. The end-to-end test runs a study into the bucket, kills its
driver, resumes it from the URI with the local working copy wiped, and reads pareto, export and
sync from the bucket.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import free_port, stop_group, write_spec

pytestmark = [pytest.mark.timeout(900)]

AWS_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL",
            "AWS_ENDPOINT_URL_S3", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_REGION", "AWS_DEFAULT_REGION")


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    """moto's S3 server on a free loopback port; its whole process group is stopped afterwards."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, "moto server exited"
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "moto server did not start"
                time.sleep(0.2)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_group(proc)


def s3_env(endpoint: str, cache: Path) -> dict[str, str]:
    return {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
            "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint, "ROBUST_STUDY_CACHE": str(cache)}


def make_bucket(endpoint: str, name: str) -> None:
    import boto3

    boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
                 region_name="us-east-1").create_bucket(Bucket=name)


def bucket_keys(endpoint: str, bucket: str) -> list[str]:
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
                          region_name="us-east-1")
    keys: list[str] = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        keys += [o["Key"] for o in page.get("Contents", [])]
    return keys


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No AWS variables from the machine; the working copies under tmp_path/cache."""
    for name in AWS_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ROBUST_STUDY_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run_cli(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str]:
    from study.cli import main

    code = main(list(args))
    return code, capsys.readouterr().err


def assert_refused(code: int, err: str, *words: str) -> None:
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    for word in words:
        assert word in lines[0], lines[0]


def written(tmp_path: Path, spec: Path) -> list[str]:
    return sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p != spec)


# --------------------------------------------------------------------------- refused in the spec


@pytest.mark.parametrize(
    ("storage", "words"),
    [
        ("ftp://bucket/x", ("scheme ftp://", "s3://bucket/prefix")),
        ("s3://KEY:SECRET@bucket/x", ("credentials do not belong",)),
        ("s3://bucket/x?access_key=A&secret_key=B", ("credentials do not belong",)),
        ("s3:///x", ("no bucket",)),
    ],
)
def test_bad_storage_uri_is_refused(clean_env: Path, capsys: pytest.CaptureFixture, storage: str,
                                    words: tuple[str, ...]) -> None:
    spec = write_spec(clean_env, "bad", storage=storage)
    code, err = run_cli(capsys, "run", str(spec))
    assert_refused(code, err, "storage", *words)
    assert written(clean_env, spec) == []


def test_credentials_in_the_spec_are_refused(clean_env: Path, capsys: pytest.CaptureFixture) -> None:
    spec = write_spec(clean_env, "creds", storage="s3://bucket/x", aws_secret_access_key="abc")
    code, err = run_cli(capsys, "run", str(spec))
    assert_refused(code, err, "aws_secret_access_key", "environment")
    assert written(clean_env, spec) == []


# --------------------------------------------------------------------------- refused up front


def test_missing_credentials(clean_env: Path, capsys: pytest.CaptureFixture) -> None:
    spec = write_spec(clean_env, "nocreds", storage="s3://bucket/x")
    code, err = run_cli(capsys, "run", str(spec))
    assert_refused(code, err, "s3://bucket/x", "AWS_ACCESS_KEY_ID")
    assert written(clean_env, spec) == []


def test_unreachable_endpoint(clean_env: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    closed = free_port()  # bound and released: nothing listens there
    for key, value in s3_env(f"http://127.0.0.1:{closed}", clean_env / "cache").items():
        monkeypatch.setenv(key, value)
    spec = write_spec(clean_env, "away", storage="s3://bucket/x")
    code, err = run_cli(capsys, "run", str(spec))
    assert_refused(code, err, "cannot reach", f"127.0.0.1:{closed}")
    assert written(clean_env, spec) == []
    code, err = run_cli(capsys, "export", "away", "--storage", "s3://bucket/x", "--out", str(clean_env / "o.yaml"))
    assert_refused(code, err, "cannot reach")
    assert written(clean_env, spec) == []


@pytest.mark.server
def test_missing_bucket_and_missing_study(clean_env: Path, capsys: pytest.CaptureFixture,
                                          monkeypatch: pytest.MonkeyPatch, moto_endpoint: str) -> None:
    for key, value in s3_env(moto_endpoint, clean_env / "cache").items():
        monkeypatch.setenv(key, value)
    spec = write_spec(clean_env, "nobucket", storage="s3://no-such-bucket/x")
    code, err = run_cli(capsys, "run", str(spec))
    assert_refused(code, err, "bucket 'no-such-bucket' does not exist")
    assert written(clean_env, spec) == []

    make_bucket(moto_endpoint, "empty")
    for command in (("pareto", "ghost"), ("resume", "ghost"), ("sync", "ghost"),
                    ("export", "ghost", "--out", str(clean_env / "o.yaml"))):
        code, err = run_cli(capsys, *command, "--storage", "s3://empty/studies")
        assert_refused(code, err, "no study 'ghost'", "s3://empty/studies")
    assert written(clean_env, spec) == []
    assert bucket_keys(moto_endpoint, "empty") == []


# --------------------------------------------------------------------------- end to end


@pytest.mark.server
@pytest.mark.ray
@pytest.mark.slow
def test_study_in_s3_survives_a_killed_driver(tmp_path: Path, moto_endpoint: str) -> None:
    make_bucket(moto_endpoint, "studies")
    storage = "s3://studies/team/a"
    cache = tmp_path / "cache"
    spec = write_spec(tmp_path, "remote", 6, defenses=["kap", "kwta"], storage=storage,
                      training={"epochs": 4, "batch_size": 64})
    env = {k: v for k, v in os.environ.items() if k not in AWS_VARS}
    env.update(s3_env(moto_endpoint, cache), PYTHONUNBUFFERED="1")
    prefix = "team/a/remote/"

    driver = subprocess.Popen(
        [sys.executable, "-m", "study", "run", str(spec)], cwd=tmp_path, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    deadline = time.monotonic() + 400
    done_lines, output = 0, []
    try:
        assert driver.stdout is not None
        for line in driver.stdout:
            output.append(line)
            if line.startswith("[") and "done" in line:
                done_lines += 1
            if done_lines >= 2:
                break
            assert time.monotonic() < deadline, "study made no progress"
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait(timeout=60)
    assert done_lines >= 2, "".join(output)[-3000:]
    keys = set(bucket_keys(moto_endpoint, "studies"))
    assert prefix + "trials.json" not in keys, "the study finished before it could be interrupted"
    # Mirrored while it ran: what resume needs is in the bucket, Tune's state and checkpoints too.
    assert {prefix + "study.json", prefix + "optuna.db", "team/a/mlflow.db"} <= keys
    assert any(k.startswith(prefix + "tune/") and k.endswith("tuner.pkl") for k in keys)
    assert any("/checkpoint_" in k for k in keys)
    # Trials that finished before the kill (their final checkpoint holds model.pt), by Tune id.
    trial_dir = re.compile(re.escape(prefix) + r"tune/_trainable_([0-9a-f]+)_\d+_[^/]*/.*model\.pt$")
    finished_before = {m.group(1) for m in map(trial_dir.match, keys) if m}
    assert len(finished_before) >= 2, sorted(keys)

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "study", *args], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=800)

    # The driver's working copy goes: everything resume reads must come from the bucket.
    import shutil

    shutil.rmtree(cache)
    resumed = cli("resume", "remote", "--storage", storage)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    keys = set(bucket_keys(moto_endpoint, "studies"))
    for name in ("trials.json", "front.csv", "front_final.csv", "front.png", "front.html", "hypervolume.csv",
                 "best.yaml", "spec.yaml", "study.json", "optuna.db"):
        assert prefix + name in keys, name
    records = json.loads((cache / "s3/studies/team/a/remote/trials.json").read_text())
    assert len(records) == 6 and len({r["trial_id"] for r in records}) == 6
    # Resumed, not restarted: the trials finished before the kill are kept, not run again.
    assert finished_before <= {r["trial_id"] for r in records}
    assert all(r["checkpoint"].startswith("s3://studies/team/a/remote/tune/")
               for r in records if r["status"] == "completed")
    front = [r for r in records if r["on_front"]]
    assert front and all(r.get("final") for r in front), "front not verified from the S3 checkpoints"
    # Trials' model files reached MLflow's artifact root in the bucket.
    assert any(k.startswith("team/a/mlartifacts/") and k.endswith("model.pt") for k in keys)

    import optuna

    ot = optuna.load_study(study_name="remote", storage=f"sqlite:///{cache / 's3/studies/team/a/remote/optuna.db'}")
    states = [t.state.name for t in ot.trials]
    assert "RUNNING" not in states, states
    assert states.count("COMPLETE") == sum(r["status"] == "completed" and r["trusted"] for r in records)

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{cache / 's3/studies/team/a/mlflow.db'}")
    experiment = client.get_experiment_by_name("remote")
    assert experiment.artifact_location == f"{storage}/mlartifacts"
    children = [r for r in client.search_runs([experiment.experiment_id], max_results=100)
                if "mlflow.parentRunId" in r.data.tags]
    assert len({c.data.tags["robust_study.trial_id"] for c in children}) == len(children) == 6

    # pareto and export read the bucket, with no working copy left.
    shutil.rmtree(cache)
    table = cli("pareto", "remote", "--storage", storage)
    assert table.returncode == 0, table.stderr
    assert all(f"{r['number']:>4}  {r['defense']}" in table.stdout for r in front), table.stdout
    out = tmp_path / "best.yaml"
    exported = cli("export", "remote", "--storage", storage, "--out", str(out))
    assert exported.returncode == 0, exported.stderr
    import yaml

    document = yaml.safe_load(out.read_text())
    final_front = [r for r in records if r["on_final_front"]] or front
    assert len(document["trials"]) == len(final_front)
    # sync reads Tune's trial folders from the bucket: every trial found, all already logged.
    shutil.rmtree(cache)
    synced = cli("sync", "remote", "--storage", storage)
    assert synced.returncode == 0, synced.stderr
    assert "remote: 6 trials, 0 run(s) logged now" in synced.stdout, synced.stdout
    # Never a local folder named after the scheme.
    assert not list(tmp_path.rglob("s3:*"))
