"""Two test "hosts" as Linux network namespaces joined by a veth pair, with a Ray cluster on them.

Why namespaces: Ray refuses 127.0.0.1 as a node address when clustering, and a test may send
traffic only to loopback or to addresses that exist inside namespaces it made itself
(docs/architecture.md, "Tests that cross a network"). Each namespace has only ``lo`` and its end of the veth pair, with an address
from a private test range that is configured nowhere else and no default route, so nothing
started inside can reach any other address. The namespaces also give each "host" its own ports
(both run the default Ray ports) and let a test cut one host off by taking its link down.

Both hosts share the filesystem, which models the shared storage a real cluster needs.

Ray's token authentication stays on (the default in Ray 2.60, and what the README tells users):
one random token per cluster reaches the head, the worker, the job submitter and every driver as
``RAY_AUTH_TOKEN`` in their environment.

Teardown never uses ``ray stop``: it matches Ray processes by name across the whole machine and
would kill every other Ray instance running here (other tests, CI). Instead every process left
in each namespace (``ip netns pids``) is killed, which is exactly that host's Ray node.
Set ``RS_KEEP_CLUSTER_LOGS=1`` to keep the nodes' Ray logs (under /tmp/rs-cluster-*) for debugging.
"""

from __future__ import annotations

import logging
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

VENV_BIN = Path(sys.executable).parent
RAY = VENV_BIN / "ray"
GCS_PORT = 6379
DASHBOARD_PORT = 8265

# Ray notices a lost node after period × threshold (+ timeout) instead of the ~30 s default, so the
# node-loss fault test finishes quickly. Names checked in the installed gcs_server binary.
FAST_HEALTH_CHECK = {
    "RAY_health_check_initial_delay_ms": "1000",
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "3",
}


def unavailable_reason() -> str | None:
    """Why two-host namespace tests cannot run here, or None when they can."""
    if sys.platform != "linux":
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed"
    if not RAY.exists():
        return f"no ray CLI at {RAY}"
    probe = f"rs-probe-{os.getpid()}-{random.randrange(10**6)}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "delete", probe], capture_output=True)
    return None


def _ip(*args: str) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {proc.stderr.strip()}")


@dataclass
class TwoHostCluster:
    """A head and a worker host (namespaces) with one Ray node each; call :meth:`teardown` always."""

    tag: str = field(default_factory=lambda: f"{os.getpid() % 10000}{random.randrange(1000):03d}")
    subnet: int = field(default_factory=lambda: random.randrange(10, 250))
    token: str = field(default_factory=lambda: secrets.token_hex(32))
    cpus_per_node: int = 1
    temp_root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="rs-cluster-", dir="/tmp")))

    def __post_init__(self) -> None:
        self.head_ns = f"rs-head-{self.tag}"
        self.worker_ns = f"rs-worker-{self.tag}"
        # Interface names are limited to 15 characters.
        self.head_if = f"rsh{self.tag}"
        self.worker_if = f"rsw{self.tag}"
        # 10.231.0.0/16: a private test range configured only inside these two namespaces.
        self.head_ip = f"10.231.{self.subnet}.1"
        self.worker_ip = f"10.231.{self.subnet}.2"
        self._made: list[str] = []
        self._logs: list[Path] = []

    # ------------------------------------------------------------------ addresses

    @property
    def gcs_address(self) -> str:
        return f"{self.head_ip}:{GCS_PORT}"

    @property
    def dashboard_url(self) -> str:
        return f"http://{self.head_ip}:{DASHBOARD_PORT}"

    def env(self, **extra: str) -> dict[str, str]:
        """Environment for every process in the cluster: the token, no usage stats, fast health checks."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env.update(
            PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
            PYTHONUNBUFFERED="1",
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN=self.token,
            RAY_USAGE_STATS_ENABLED="0",
            **FAST_HEALTH_CHECK,
        )
        env.update(extra)
        return env

    # ------------------------------------------------------------------ lifecycle

    def create_hosts(self) -> None:
        """Two namespaces, a veth pair between them, one test address on each end, ``lo`` up."""
        for ns in (self.head_ns, self.worker_ns):
            _ip("netns", "add", ns)
            self._made.append(ns)
        _ip("link", "add", self.head_if, "type", "veth", "peer", "name", self.worker_if)
        # Move each end into its namespace straight away: no test address ever exists outside them.
        _ip("link", "set", self.head_if, "netns", self.head_ns)
        _ip("link", "set", self.worker_if, "netns", self.worker_ns)
        for ns, dev, addr in ((self.head_ns, self.head_if, self.head_ip),
                              (self.worker_ns, self.worker_if, self.worker_ip)):
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "link", "set", dev, "up")

    def start(self, timeout: float = 120.0) -> None:
        """Create the hosts, start the head and the worker node, wait until both are alive."""
        self.create_hosts()
        # Socket paths must stay under 107 characters: short temp dirs, one per node.
        head_tmp, worker_tmp = self.temp_root / "h", self.temp_root / "w"
        common = [f"--num-cpus={self.cpus_per_node}", "--num-gpus=0", "--disable-usage-stats",
                  "--object-store-memory=100000000"]
        self.run_in(self.head_ns, [str(RAY), "start", "--head", f"--node-ip-address={self.head_ip}",
                                   f"--port={GCS_PORT}", f"--dashboard-host={self.head_ip}",
                                   f"--dashboard-port={DASHBOARD_PORT}", f"--temp-dir={head_tmp}", *common],
                    timeout=timeout, name="head-start")
        self.run_in(self.worker_ns, [str(RAY), "start", f"--address={self.gcs_address}",
                                     f"--node-ip-address={self.worker_ip}", f"--temp-dir={worker_tmp}", *common],
                    timeout=timeout, name="worker-start")
        self.wait_for_nodes(2, timeout=timeout)

    def alive_nodes(self) -> list[str]:
        """IPs of the nodes the head considers alive (asked from inside the head namespace)."""
        code = ("import ray, json; ray.init(address='auto', logging_level='ERROR'); "
                "print(json.dumps([n['NodeManagerAddress'] for n in ray.nodes() if n['Alive']]))")
        proc = self.run_in(self.head_ns, [sys.executable, "-c", code], timeout=60, check=False,
                           extra_env={"RAY_ADDRESS": self.gcs_address})
        if proc.returncode != 0:
            return []
        import json

        return json.loads(proc.stdout.strip().splitlines()[-1])

    def wait_for_nodes(self, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(self.alive_nodes()) == count:
                return
            time.sleep(1)
        raise RuntimeError(f"the cluster did not reach {count} alive node(s) in {timeout:.0f}s; logs: {self.temp_root}")

    def run_in(self, ns: str, argv: list[str], *, timeout: float, check: bool = True, cwd: Path | None = None,
               extra_env: dict[str, str] | None = None, name: str | None = None) -> subprocess.CompletedProcess:
        """Run a command inside a namespace (a process on that host) and wait for it."""
        proc = subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True, text=True, timeout=timeout,
                              cwd=cwd, env=self.env(**(extra_env or {})))
        if name:
            path = self.temp_root / f"{name}.log"
            path.write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(argv[:3])} in {ns} failed ({proc.returncode}): {proc.stderr[-2000:]}")
        return proc

    def popen_in(self, ns: str, argv: list[str], *, log: Path, cwd: Path | None = None,
                 extra_env: dict[str, str] | None = None) -> subprocess.Popen:
        """Start a command inside a namespace, stdout and stderr to ``log``; the caller waits for it."""
        with open(log, "w") as out:
            return subprocess.Popen(["ip", "netns", "exec", ns, *argv], cwd=cwd, env=self.env(**(extra_env or {})),
                                    stdout=out, stderr=subprocess.STDOUT, text=True)

    # ------------------------------------------------------------------ faults

    def cut_worker_link(self) -> None:
        """Network partition: the worker host's only link goes down; its node keeps running, unreachable."""
        _ip("-n", self.worker_ns, "link", "set", self.worker_if, "down")

    def kill_worker_node(self) -> None:
        """The worker's Ray node stops abruptly (what ``ray stop --force`` on that host does)."""
        self._kill_namespace(self.worker_ns)

    # ------------------------------------------------------------------ teardown

    def _kill_namespace(self, ns: str) -> None:
        for _ in range(5):
            proc = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
            pids = [int(p) for p in proc.stdout.split()]
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.5)

    def teardown(self) -> None:
        """Kill every process on both hosts, delete the namespaces (the veth pair goes with them)."""
        for ns in reversed(self._made):
            try:
                self._kill_namespace(ns)
            finally:
                subprocess.run(["ip", "netns", "delete", ns], capture_output=True)
        self._made.clear()
        # Only if creation failed between making the veth pair and moving it: remove it here.
        subprocess.run(["ip", "link", "delete", self.head_if], capture_output=True)
        if not os.environ.get("RS_KEEP_CLUSTER_LOGS"):
            shutil.rmtree(self.temp_root, ignore_errors=True)
