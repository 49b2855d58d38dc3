"""Shared fixtures: a real MLflow tracking server on 127.0.0.1, always stopped."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Under `pytest -n N` on N cores, torch's default (one intra-op thread per core) runs N*N threads
    # whose OpenMP barriers spin against each other: gradchecks ran 4x slower. One thread per worker,
    # set before torch is imported; the CLI subprocesses the tests start inherit it.
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    """Poll ``url`` until it answers 200; fail with the server's log when it dies or times out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text()[-2000:] if log and log.exists() else ""
            raise RuntimeError(f"server exited with {proc.returncode} before answering {url}:\n{tail}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:  # loopback only
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    tail = log.read_text()[-2000:] if log and log.exists() else ""
    raise TimeoutError(f"{url} did not answer within {timeout:.0f}s:\n{tail}")


def stop_group(proc: subprocess.Popen | None) -> None:
    """Stop a process started with ``start_new_session=True`` and all its children."""
    if proc is None or proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


class MlflowServer:
    """``mlflow server`` with a SQLite backend and a proxied artifact store, loopback only.

    ``stop()``/``start()`` keep the port and the stores, so a test can take the server away and
    bring the same one back.
    """

    def __init__(self, root: Path, host: str = "127.0.0.1") -> None:
        self.root = root
        self.host = host
        self.port = free_port()
        self.uri = f"http://{host}:{self.port}"
        self.db = root / "mlflow.db"
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self, timeout: float = 180) -> None:
        if self.running:
            return
        self.starts += 1
        log = self.root / f"server-{self.starts}.log"
        cmd = [
            str(BIN / "mlflow"), "server",
            "--backend-store-uri", f"sqlite:///{self.db}",
            "--artifacts-destination", str(self.root / "mlartifacts"),
            "--serve-artifacts",
            "--host", self.host, "--port", str(self.port),
            "--workers", "1",
        ]
        # The environment robust-study ui gives its server: no MLflow GenAI job runner and its seven
        # consumers, which the tests do not need and which tripled the server's start-up CPU.
        from study.cli import ui_environment

        env = ui_environment(os.environ)
        with log.open("w") as out:
            self.proc = subprocess.Popen(
                cmd, cwd=self.root, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env
            )
        try:
            wait_http(self.uri + "/health", timeout, self.proc, log)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        stop_group(self.proc)
        self.proc = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """One server for the session (it took ~30 s to start on 2 busy cores with MLflow's job
    execution on); tests that stop it call ``start()`` again, which is a no-op when it runs."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    try:
        server.start()
        yield server
    finally:
        server.stop()


# --------------------------------------------------------------------------- tiny studies


def write_spec(tmp_path: Path, name: str, trials: int = 4, *, models: bool = False, **extra: object) -> Path:
    """A tiny study (digits, small CNN, 2 epochs, PGD-10 on 60 samples).

    One k-WTA trial of it is 4.6 s of work at one thread here (8.7 s as a fresh ``robust-study
    trial`` process, imports included; 2026-12-05).

    PGD-10, not fewer steps: R8's Square check (the reference schedule) breaks points a 3-step
    PGD misses on these half-trained models, and no trial would be trusted.

    KAP is attacked as deployed only (``protocol_arms: deployed``): its other arm, activation noise
    on under EOT, is the evaluation's business (tests/test_evaluate.py, tests/test_randomized.py),
    and in a study test it cost a third of the study (a 6-trial MO-ASHA study with KAP: 85 -> 59
    CPU-seconds, 55 -> 36 s, the same numbers; 2026-12-05).

    No MLflow model per trial unless ``models``: exporting a tiny network with ``torch.export``
    and checking the export is about a third of such a trial's work (34 % of a ``bench load``
    trial worker's py-spy samples; the two early-stopping study tests 210 -> 155 CPU-seconds,
    2026-12-05), and only the tests of the logged models read them
    (tests/test_mlflow_conventions.py, tests/test_mlflow_server.py; the saving itself:
    tests/test_mlflow_model.py). With ``models`` the spec names no ``mlflow`` section unless
    ``extra`` does (the default, log_models on)."""
    import yaml

    if not models:
        extra["mlflow"] = {**dict(extra.get("mlflow") or {}), "log_models": False}  # type: ignore[arg-type]

    spec = {
        "name": name,
        "data": {"name": "digits", "train_subset": 600},
        "model": {"backbone": "small_cnn"},
        "defenses": ["kwta"],
        "include_baseline": True,
        "training": {"epochs": 2, "batch_size": 64},
        "search_eval": {"n_samples": 60, "attacks": [{"name": "pgd", "steps": 10}], "eps_curve": [0.1, 0.3],
                        "check_samples": 30, "protocol_arms": "deployed"},
        "final_eval": {"n_samples": 40, "attacks": [{"name": "pgd", "steps": 10, "restarts": 2}], "eps_curve": [],
                       "check_samples": 20, "protocol_arms": "deployed"},
        "num_trials": trials,
        "concurrency": 2,
        "storage": str(tmp_path / "results"),
        **extra,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


class Driver:
    """``robust-study ARGS`` in its own process group; output collected by a thread."""

    def __init__(self, *args: str, cwd: Path, env: dict[str, str] | None = None) -> None:
        import threading

        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "study", *args], cwd=cwd, text=True, start_new_session=True,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def trials_done(self) -> int:
        return sum(1 for line in self.lines if line.startswith("[") and "done" in line)

    def wait_until(self, predicate, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if self.proc.poll() is not None:
                raise AssertionError(f"driver exited ({self.proc.returncode}) before {what}:\n{self.output[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}:\n{self.output[-3000:]}")
            time.sleep(0.5)

    def wait(self, timeout: float) -> int:
        code = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=10)
        return code

    def stop(self) -> None:
        stop_group(self.proc)


@pytest.fixture
def driver_factory() -> Iterator:
    """Start study drivers; every one is killed (with its Ray processes) at teardown."""
    drivers: list[Driver] = []

    def start(*args: str, cwd: Path, env: dict[str, str] | None = None) -> Driver:
        drivers.append(Driver(*args, cwd=cwd, env=env))
        return drivers[-1]

    try:
        yield start
    finally:
        for driver in drivers:
            driver.stop()


@pytest.fixture(scope="session")
def logged_study(mlflow_server: MlflowServer, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A concurrent study (4 trials, 2 at a time) logged to the session's MLflow server."""
    tmp = tmp_path_factory.mktemp("logged-study")
    spec = write_spec(tmp, "served", trials=4, mlflow={"tracking_uri": mlflow_server.uri})
    mlflow_server.start()
    driver = Driver("run", str(spec), cwd=tmp)
    try:
        code = driver.wait(timeout=600)
    finally:
        driver.stop()
    return {"returncode": code, "output": driver.output, "study_dir": tmp / "results" / "served", "name": "served",
            "seconds": None}


#: A sixth defense outside the package tree, registered through the public API only (issue 13).
TOY_PLUGIN = Path(__file__).resolve().parent / "plugins" / "toy_clip.py"


def pytest_configure(config) -> None:  # noqa: ANN001 - pytest's hook signature
    if getattr(config.option, "dist", "no") != "no" and not os.environ.get("PYTEST_XDIST_WORKER"):
        return  # the xdist controller collects nothing; only its workers need it (and torch, ~4 s)
    # Loaded before collection, so every registry-driven test (contract, build, bench) covers it.
    from study.plugins import load_plugins

    load_plugins([str(TOY_PLUGIN)])


#: Modules sharing the session's MLflow server, and two of them its ``logged_study``: under
#: ``--dist loadscope`` (make test's marked phase) they run on one worker, so the server starts
#: once and the 4-trial study runs once instead of once per worker that drew one of them
#: (measured 2026-12-05, setup of the first test of each: 83 s and 105 s on that day's slow VM).
SHARED_SERVER_MODULES = ("tests/test_browser.py", "tests/test_load.py", "tests/test_mlflow_server.py")


def pytest_xdist_make_scheduler(config, log):  # noqa: ANN001, ANN201 - pytest-xdist's hook signature
    if config.getvalue("dist") != "loadscope":
        return None  # xdist's own scheduler
    from xdist.scheduler import LoadScopeScheduling

    class SharedServerScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            scope = super()._split_scope(nodeid)
            return SHARED_SERVER_MODULES[0] if scope in SHARED_SERVER_MODULES else scope

    return SharedServerScheduling(config, log)
