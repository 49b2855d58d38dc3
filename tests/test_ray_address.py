"""Which Ray a study runs on: --address, the spec's address, RAY_ADDRESS, then a new local instance.

The fast tests check the precedence as a pure function and the refusals through the real CLI
(they never start Ray). The ``ray`` tests start a Ray cluster the way a user does
(``ray start --head``) on 127.0.0.1 and run tiny studies on it with RAY_ADDRESS and through
``ray job submit``, with no address in the spec.

The cluster is stopped without ``ray stop``: that command finds Ray processes by name across the
whole machine and would stop every other Ray instance running here. ``ray start --block`` runs in
its own process group, which the test kills (SIGTERM, then SIGKILL); every process started from
it, however deep, inherits the cluster's random token in its environment, and teardown kills and
then checks for any process still carrying it (a job's driver runs in a process group of its own).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import free_port, stop_group, write_spec

from study.config import ConfigError
from study.orchestration.ray_cluster import RayTarget, resolve_address, validate_target

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
RAY = VENV_BIN / "ray"


# --------------------------------------------------------------------------- precedence (pure)


@pytest.mark.parametrize(
    ("flag", "spec", "env", "expected"),
    [
        ("10.0.0.1:6379", "10.0.0.2:6379", {"RAY_ADDRESS": "10.0.0.3:6379"}, RayTarget("10.0.0.1:6379", "--address")),
        (None, "10.0.0.2:6379", {"RAY_ADDRESS": "10.0.0.3:6379"}, RayTarget("10.0.0.2:6379", "address")),
        (None, None, {"RAY_ADDRESS": "10.0.0.3:6379"}, RayTarget("10.0.0.3:6379", "RAY_ADDRESS")),
        (None, None, {}, RayTarget(None, "default")),
        # Empty values are unset, as Ray treats an empty RAY_ADDRESS.
        ("", " ", {"RAY_ADDRESS": ""}, RayTarget(None, "default")),
        ("", None, {"RAY_ADDRESS": "10.0.0.3:6379"}, RayTarget("10.0.0.3:6379", "RAY_ADDRESS")),
        # "local" anywhere above RAY_ADDRESS keeps the study off the cluster RAY_ADDRESS names.
        ("local", None, {"RAY_ADDRESS": "10.0.0.3:6379"}, RayTarget(None, "--address")),
        (None, "local", {"RAY_ADDRESS": "10.0.0.3:6379"}, RayTarget(None, "address")),
        (None, "auto", {"RAY_ADDRESS": "10.0.0.3:6379"}, RayTarget("auto", "address")),
        (" 10.0.0.1:6379 ", None, {}, RayTarget("10.0.0.1:6379", "--address")),
    ],
)
def test_address_precedence(flag, spec, env, expected) -> None:
    assert resolve_address(flag, spec, env) == expected


@pytest.mark.parametrize("address", ["auto", "10.0.0.5:6379", "head.example:6379", "[::1]:6379"])
def test_valid_addresses_pass(address: str) -> None:
    validate_target(RayTarget(address, "--address"))
    validate_target(RayTarget(None, "default"))


@pytest.mark.parametrize(
    ("address", "needle"),
    [("ray://10.0.0.5:10001", "ray job submit"), ("http://10.0.0.5:8265", "ray job submit --address"),
     ("10.0.0.5", "host:port"), ("10.0.0.5:port", "host:port"), (":6379", "host:port")],
)
def test_malformed_or_client_addresses_are_refused_naming_their_source(address: str, needle: str) -> None:
    with pytest.raises(ConfigError) as caught:
        validate_target(RayTarget(address, "RAY_ADDRESS"))
    message = str(caught.value)
    assert message.startswith("RAY_ADDRESS: ") and address in message and needle in message
    assert "\n" not in message


@pytest.mark.parametrize("argv", [["run", "spec.yaml"], ["demo"], ["resume", "name"]])
def test_study_commands_take_address(argv: list[str]) -> None:
    from study.cli import build_parser

    assert build_parser().parse_args([*argv, "--address", "10.0.0.5:6379"]).address == "10.0.0.5:6379"
    assert build_parser().parse_args(argv).address is None


# --------------------------------------------------------------------------- refusals through the CLI


def run_cli(*args: str, cwd: Path, env: dict[str, str], timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "study", *args], cwd=cwd, capture_output=True, text=True,
                          check=False, timeout=timeout, env={**env, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"})


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any Ray setting (another session's RAY_ADDRESS, ...)."""
    return {**{k: v for k, v in os.environ.items() if not k.startswith("RAY_")}, **extra}


def assert_refused(proc: subprocess.CompletedProcess, tmp_path: Path, *needles: str) -> str:
    assert proc.returncode == 2, (proc.stdout[-1000:], proc.stderr[-3000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("robust-study run: "), proc.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert not (tmp_path / "results").exists(), "a refused study left files behind"
    return lines[0]


@pytest.mark.timeout(300)
def test_ray_client_address_is_refused_before_ray_starts(tmp_path: Path) -> None:
    spec = write_spec(tmp_path, "client", trials=1)
    proc = run_cli("run", str(spec), cwd=tmp_path, env=clean_env(RAY_ADDRESS="ray://127.0.0.1:10001"))
    assert_refused(proc, tmp_path, "RAY_ADDRESS", "ray://127.0.0.1:10001", "ray job submit")


@pytest.mark.timeout(300)
def test_unreachable_ray_address_is_one_line_naming_its_source(tmp_path: Path) -> None:
    spec = write_spec(tmp_path, "gone", trials=1)
    address = f"127.0.0.1:{free_port()}"  # nothing listens: refused at once
    proc = run_cli("run", str(spec), cwd=tmp_path, env=clean_env(RAY_ADDRESS=address))
    assert_refused(proc, tmp_path, "RAY_ADDRESS", address, "cannot reach Ray")


@pytest.mark.timeout(300)
def test_flag_then_spec_come_before_ray_address(tmp_path: Path) -> None:
    """The refusal names the source that won: the flag over the spec over RAY_ADDRESS."""
    spec = write_spec(tmp_path, "order", trials=1, address=f"127.0.0.1:{free_port()}")
    env = clean_env(RAY_ADDRESS="ray://127.0.0.1:10001")
    proc = run_cli("run", str(spec), cwd=tmp_path, env=env)
    assert_refused(proc, tmp_path, "robust-study run: address: cannot reach Ray")
    flag = f"127.0.0.1:{free_port()}"
    proc = run_cli("run", str(spec), "--address", flag, cwd=tmp_path, env=env)
    assert_refused(proc, tmp_path, "robust-study run: --address: cannot reach Ray", flag)


# --------------------------------------------------------------------------- a local instance

LOCAL_PROBE = (
    "from ray import tune  # run_study imports it before init_ray\n"
    "import json, ray\n"
    "from ray._private.services import get_ray_address_from_environment\n"
    "from study.orchestration.runner import init_ray\n"
    "from study.orchestration.ray_cluster import describe, resolve_address\n"
    "from study.spec import StudySpec\n"
    "import os\n"
    "seen = get_ray_address_from_environment(None, None)  # what a bare ray.init() would join\n"
    "spec = StudySpec.model_validate({'name': 'probe', 'concurrency': 2})\n"
    "init_ray(spec)\n"
    "print(json.dumps({'line': describe(resolve_address(None, None, os.environ)), 'would_join': seen,\n"
    "                  'gcs': ray.get_runtime_context().gcs_address,\n"
    "                  'nodes': [n['NodeManagerAddress'] for n in ray.nodes()]}))\n"
)


def probe_local(cwd: Path, env: dict[str, str]) -> tuple[dict, str]:
    proc = subprocess.Popen([sys.executable, "-c", LOCAL_PROBE], cwd=cwd, text=True, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**env, "PYTHONPATH": str(ROOT)})
    try:
        out, err = proc.communicate(timeout=150)
    finally:
        stop_group(proc)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1]), err


@pytest.mark.ray
@pytest.mark.timeout(200)
def test_local_instance_line_and_no_token_notice(tmp_path: Path) -> None:
    """No address anywhere: a new instance on 127.0.0.1, said in one line, and Ray's notice that
    token authentication is on (printed by every ray.init() that starts an instance with
    RAY_AUTH_MODE unset) does not reach the terminal."""
    seen, err = probe_local(tmp_path, clean_env())
    assert seen["line"] == f"Ray: new local instance on 127.0.0.1 ({max(2, os.cpu_count() or 1)} CPUs)", seen
    assert seen["nodes"] == ["127.0.0.1"], seen
    assert "Token authentication" not in err, err[-3000:]


# --------------------------------------------------------------------------- a cluster on this machine


class LoopbackCluster:
    """``ray start --head --block`` on 127.0.0.1 with 2 CPUs, its own temp dir, ports and token.

    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 keeps the node on loopback (without it Ray binds the
    machine's outward address whatever --node-ip-address says); a driver that connects to it
    needs the same setting, or Ray rewrites 127.0.0.1 to that outward address. Token
    authentication stays on: the token reaches every process of the cluster and its drivers.
    """

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="rsa-", dir="/tmp"))  # short: socket paths < 108 chars
        self.port, self.dashboard_port = free_port(), free_port()
        self.token = secrets.token_hex(32)
        self.proc: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def env(self, **extra: str) -> dict[str, str]:
        return clean_env(
            PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            PYTHONPATH=str(ROOT),  # the cluster's job drivers run this checkout
            PYTHONUNBUFFERED="1",
            RAY_TMPDIR=str(self.root),  # where `ray start` records the cluster for a bare ray.init()
            RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN=self.token,
            RAY_USAGE_STATS_ENABLED="0",
            **extra,
        )

    def start(self, timeout: float = 180) -> None:
        log = self.root / "head.log"
        cmd = [str(RAY), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={self.port}",
               "--num-cpus=2", "--num-gpus=0", "--disable-usage-stats", "--object-store-memory=100000000",
               # The dashboard serves `ray job submit`; every port is a free one, not Ray's fixed defaults
               # (other sessions here may run Ray too).
               "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
               f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
               f"--dashboard-agent-grpc-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
               f"--metrics-export-port={free_port()}"]
        with log.open("w") as out:
            self.proc = subprocess.Popen(cmd, cwd=self.root, env=self.env(), stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        # The dashboard answers last; with token authentication only a request that carries the token.
        deadline = time.monotonic() + timeout
        request = urllib.request.Request(self.dashboard_url + "/api/version",
                                         headers={"Authorization": f"Bearer {self.token}"})
        while True:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the head did not come up (exit {self.proc.poll()}):\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(request, timeout=2) as response:  # loopback only
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)

    def our_pids(self) -> list[int]:
        """Live processes carrying this cluster's token (the cluster, its workers, its job drivers)."""
        needle = f"RAY_AUTH_TOKEN={self.token}".encode()
        pids = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) != os.getpid():
                try:
                    if needle in (entry / "environ").read_bytes().split(b"\0"):
                        pids.append(int(entry.name))
                except OSError:
                    continue
        return pids

    def stop(self) -> None:
        stop_group(self.proc)
        for _ in range(10):
            pids = self.our_pids()
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.5)
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster() -> Iterator[LoopbackCluster]:
    c = LoopbackCluster()
    try:
        c.start()
        yield c
    finally:
        c.stop()
    assert not c.our_pids(), "a process of the test's Ray cluster outlived it"


def driver_pids_seen_by(cluster: LoopbackCluster) -> set[int]:
    """PIDs of the drivers that connected to the cluster (each leaves a core-driver log in its session)."""
    assert cluster.proc is not None
    # The head's session is named after the `ray start` process (session_latest may be a probe's).
    logs = cluster.root.glob(f"ray/session_*_{cluster.proc.pid}/logs/python-core-driver-*_*.log")
    return {int(p.stem.rsplit("_", 1)[1]) for p in logs}


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.server
@pytest.mark.timeout(600)
def test_ray_address_runs_the_study_on_that_cluster(cluster: LoopbackCluster, tmp_path: Path) -> None:
    spec = write_spec(tmp_path, "onenv", trials=2)  # no address in the spec
    proc = subprocess.Popen([sys.executable, "-m", "study", "run", str(spec)], cwd=tmp_path, text=True,
                            env=cluster.env(RAY_ADDRESS=cluster.address), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        _, err = proc.communicate(timeout=540)
    finally:
        stop_group(proc)
    assert proc.returncode == 0, err[-4000:]
    assert f"Ray: cluster at {cluster.address} (from RAY_ADDRESS), 1 node, 2 CPUs" in err, err[-4000:]
    assert proc.pid in driver_pids_seen_by(cluster), "the study's driver never connected to the cluster"
    records = json.loads((tmp_path / "results" / "onenv" / "trials.json").read_text())
    assert [r["status"] for r in records] == ["completed", "completed"], records


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.server
@pytest.mark.timeout(600)
def test_job_submit_runs_a_spec_without_address(cluster: LoopbackCluster, tmp_path: Path) -> None:
    """Inside ``ray job submit`` Ray sets RAY_ADDRESS for the driver: the spec needs no address."""
    spec = write_spec(tmp_path, "onjob", trials=2)
    proc = subprocess.run(
        [str(RAY), "job", "submit", f"--address={cluster.dashboard_url}", "--submission-id=rs-address-job",
         "--", str(VENV_BIN / "robust-study"), "run", str(spec)],
        cwd=tmp_path, env=cluster.env(), capture_output=True, text=True, timeout=540, check=False,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "succeeded" in output.lower(), output[-4000:]
    assert f"Ray: cluster at {cluster.address} (from RAY_ADDRESS), 1 node, 2 CPUs" in output, output[-4000:]
    records = json.loads((tmp_path / "results" / "onjob" / "trials.json").read_text())
    assert [r["status"] for r in records] == ["completed", "completed"], records


@pytest.mark.ray
@pytest.mark.server
@pytest.mark.timeout(300)
def test_a_cluster_found_only_through_rays_file_is_not_joined(cluster: LoopbackCluster, tmp_path: Path) -> None:
    """No address anywhere while `ray start` ran here: a bare ray.init() would join that cluster
    (and refuse num_cpus); a study starts its own local instance instead."""
    seen, _ = probe_local(tmp_path, cluster.env())
    assert seen["would_join"] == cluster.address, seen  # the cluster is there to be found
    assert seen["line"].startswith("Ray: new local instance on 127.0.0.1"), seen
    assert seen["gcs"] != cluster.address, seen
