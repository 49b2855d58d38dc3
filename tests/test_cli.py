"""Command-line conventions (issue 16): --version, -v anywhere, one-line usage errors, help for
users, exit status 1 when a study has no completed trial, and `ui` stopping all of its server."""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from types import SimpleNamespace

import pytest

from study import cli, cli_args

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}

#: The required arguments of each command, so that parsing succeeds.
REQUIRED = {
    "trial": [],
    "evaluate": ["some/trial", "--attack", "pgd"],
    "bench": ["layers"],
    "run": ["demo"],
    "demo": [],
    "resume": ["s"],
    "pareto": ["s"],
    "export": ["s", "--out", "best.yaml"],
    "sync": ["s"],
    "ui": [],
}


def program(*args: str, cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "study", *args], check=False, cwd=cwd or ROOT, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


def _pyproject_version() -> str:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


# --------------------------------------------------------------------------- --version, --help


def test_version_prints_the_program_and_its_installed_version() -> None:
    from importlib import metadata

    try:
        expected = metadata.version("robust-study")
    except metadata.PackageNotFoundError:
        expected = _pyproject_version()
    proc = program("--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"robust-study {expected}\n" and proc.stderr == ""


def test_version_falls_back_to_pyproject_when_not_installed(monkeypatch) -> None:
    from importlib import metadata

    def not_installed(name: str) -> str:
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", not_installed)
    assert cli_args.program_version() == _pyproject_version()


@pytest.mark.parametrize("args", [["--version"], ["--help"], ["run", "--help"], ["evaluate", "--help"],
                                  ["bench", "--help"]])
def test_version_and_help_import_nothing_heavy(args: list[str]) -> None:
    code = ("import sys\nfrom study.cli import main\n"
            f"try:\n    main({args!r})\nexcept SystemExit as exit:\n    code = exit.code\n"
            "heavy = [m for m in ('torch', 'ray', 'mlflow') if m in sys.modules]\n"
            "print(code, any(m in sys.modules for m in ('study.config', 'pydantic')), heavy, file=sys.stderr)\n")
    proc = subprocess.run([sys.executable, "-c", code], check=False, cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=120)
    exit_code, config_imported, heavy = proc.stderr.strip().splitlines()[-1].split(" ", 2)
    assert exit_code in ("0", "None") and heavy == "[]", proc.stderr
    # evaluate's and bench's --help list the attacks / recipes, which live with the configs;
    # nothing else needs them.
    assert config_imported == str(args in (["evaluate", "--help"], ["bench", "--help"])), proc.stderr


def _parsers() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    return {"robust-study": parser, **{f"robust-study {name}": p for name, p in parser.commands.items()}}


def test_every_command_is_covered_here() -> None:
    assert set(cli.build_parser().commands) == set(REQUIRED) == set(cli.COMMANDS)


@pytest.mark.parametrize("name", list(_parsers()))
def test_help_is_written_for_users_and_every_option_has_help(name: str) -> None:
    parser = _parsers()[name]
    text = parser.format_help()
    assert "``" not in text and ":func:" not in text and "table of small commands" not in text
    for action in parser._actions:
        assert action.help and action.help != argparse.SUPPRESS and action.help.strip(), (name, action.dest)
    for action in getattr(parser._subparsers, "_group_actions", []):
        for choice in getattr(action, "_choices_actions", []):
            assert choice.help and choice.help.strip(), choice.dest


def test_top_level_help_lists_every_command_with_a_one_line_description() -> None:
    parser = cli.build_parser()
    lines = parser.format_help().splitlines()
    for name in parser.commands:
        line = next((line for line in lines if line.split()[:1] == [name]), None)
        assert line is not None, f"{name} missing from --help"
        assert len(line.split()) > 2, f"{name} has no description: {line!r}"


# --------------------------------------------------------------------------- -v


@pytest.mark.parametrize("command", sorted(REQUIRED))
def test_verbose_before_and_after_the_command_mean_the_same(command: str) -> None:
    parser = cli.build_parser()
    required = REQUIRED[command]
    assert parser.parse_args([command, *required]).verbose is False
    assert parser.parse_args(["-v", command, *required]).verbose is True
    assert parser.parse_args([command, *required, "-v"]).verbose is True
    assert parser.parse_args([command, "--verbose", *required]).verbose is True
    assert parser.parse_args(["--verbose", command, *required, "-v"]).verbose is True


# --------------------------------------------------------------------------- usage errors


def test_unknown_attack_is_one_line_listing_the_attacks_exit_2(tmp_path: Path) -> None:
    from study.config import ATTACKS

    proc = program("evaluate", str(tmp_path), "--attack", "nonsense", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("robust-study evaluate: argument --attack: invalid choice: 'nonsense'")
    assert all(repr(name) in lines[0] for name in ATTACKS)
    assert lines[0].endswith("(see robust-study evaluate --help)")


def _bench_defenses_allowed() -> dict[str, list[str]]:
    from study.config import RECIPES
    from study.spec import load_spec

    return {"--defense": ["none", *load_spec("demo").defenses], "--recipe": list(RECIPES)}


@pytest.mark.parametrize("option", ["--defense", "--recipe"])
def test_bench_defenses_refuses_an_unknown_name_in_one_line_listing_the_names_exit_2(
    option: str, capsys, monkeypatch
) -> None:
    import study.bench.defenses

    def must_not_run(**kwargs):
        raise AssertionError(f"defense_rows ran with {kwargs}")

    monkeypatch.setattr(study.bench.defenses, "defense_rows", must_not_run)
    allowed = _bench_defenses_allowed()[option]
    # Some of today's names, by hand, so an empty list cannot pass.
    assert {"--defense": {"none", "kap", "cas"}, "--recipe": {"standard", "pgd_at"}}[option] <= set(allowed)
    with pytest.raises(SystemExit) as exit:
        cli.main(["bench", "defenses", option, "nope"])
    assert exit.value.code == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1, err
    assert err.startswith(f"robust-study bench: argument {option}: invalid choice: 'nope'"), err
    assert all(repr(name) in err for name in allowed), err
    assert err.rstrip().endswith("(see robust-study bench --help)")


def test_bench_defense_names_read_from_the_demo_specs_text_are_the_parsed_specs() -> None:
    from study.bench.defenses import defense_choices
    from study.spec import load_spec

    # defense_choices reads the spec's text (so that --help needs no torch); the parsed spec is
    # what a study runs.
    assert defense_choices() == load_spec("demo").conditional_space().defense_choices()
    assert cli._bench_defenses() is defense_choices()


def test_bench_help_lists_the_defenses_and_recipes() -> None:
    text = " ".join(cli.build_parser().commands["bench"].format_help().split())
    for option, allowed in _bench_defenses_allowed().items():
        entry = text.split(f"{option} {option[2:].upper()} defenses: ", 1)[1].split(" --", 1)[0]
        assert entry.endswith(": " + ", ".join(allowed)), (option, entry)


@pytest.mark.parametrize("args, needle", [
    (["pareto", "s", "--bogus"], "robust-study pareto: unrecognized arguments: --bogus"),
    (["--bogus", "pareto", "s"], "robust-study pareto: unrecognized arguments: --bogus"),
    (["run", "demo", "--trials", "0"], "robust-study run: argument --trials: expected a whole number of at least 1"),
    (["ui", "--port", "70000"], "robust-study ui: argument --port: expected a port number from 1 to 65535"),
    (["ui", "--workers", "0"], "robust-study ui: argument --workers: expected a whole number of at least 1"),
    (["evaluate", "d", "--attack", "pgd", "--n", "x"], "robust-study evaluate: argument --n:"),
    (["export", "s"], "robust-study export: the following arguments are required: --out"),
    (["frobnicate"], "robust-study: argument COMMAND: invalid choice: 'frobnicate'"),
    ([], "robust-study: the following arguments are required: COMMAND"),
])
def test_usage_errors_are_one_line_naming_the_command_exit_2(args: list[str], needle: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit:
        cli.main(args)
    assert exit.value.code == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1, err
    assert err.startswith(needle) and err.rstrip().endswith("--help)"), err


def test_ui_server_runs_without_mlflow_job_execution_unless_the_environment_asks() -> None:
    assert cli.ui_environment({"PATH": "/bin"}) == {"PATH": "/bin", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    asked = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "true"}
    assert cli.ui_environment(asked) == asked


def test_ui_passes_the_worker_count_and_environment_to_mlflow(tmp_path: Path, monkeypatch) -> None:
    import study.ui_server

    seen = {}
    monkeypatch.setattr(study.ui_server, "serve", lambda cmd, *, name, env: seen.update(cmd=cmd, env=env) or 0)
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "mlflow.db").touch()
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", raising=False)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["ui", "--port", "5123"]) == 0
    cmd = seen["cmd"]
    assert cmd[cmd.index("--workers") + 1] == "1" and cmd[cmd.index("--port") + 1] == "5123"
    assert seen["env"]["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    assert cli.main(["ui", "--workers", "3"]) == 0
    assert seen["cmd"][seen["cmd"].index("--workers") + 1] == "3"


# --------------------------------------------------------------------------- exit status of a study


def _tune_result(number: int, *, metrics: dict, error: Exception | None = None) -> SimpleNamespace:
    """What Ray Tune hands the runner for one trial (the fields collect_records reads)."""
    return SimpleNamespace(metrics=metrics, config={"defense": "kwta", "kwta.gamma": 0.1}, error=error,
                           path=f"/tmp/tune/trial_{number:05d}", checkpoint=None)


def _final(status: str, **extra) -> dict:
    return {"final": 1, "status": status, "trusted": status == "completed", "val_clean_accuracy": 0.9,
            "val_robust_accuracy": 0.4, "train_seconds": 1.0, "eval_seconds": 0.5, "num_parameters": 1000,
            "reason": "" if status == "completed" else "loss became nan", **extra}


def test_study_without_a_completed_trial_fails_and_one_completed_trial_is_enough() -> None:
    from study.orchestration.runner import collect_records
    from study.spec import load_spec

    spec = load_spec("demo")
    diverged = _tune_result(0, metrics=_final("diverged"))
    died = _tune_result(1, metrics={"epoch": 1, "train_loss": 2.0}, error=RuntimeError("worker died"))
    stopped = _tune_result(2, metrics={"epoch": 1, "train_loss": 2.0})  # early-stopped by the scheduler
    completed = _tune_result(3, metrics=_final("completed"))

    records = collect_records(spec, [diverged, died, stopped])
    assert sorted(r["status"] for r in records) == ["diverged", "failed", "stopped"]
    assert cli.study_failure(records) == "no trial completed (3 trial(s) failed, diverged or were stopped)"
    assert cli.study_failure(collect_records(spec, [diverged, died, stopped, completed])) is None
    assert cli.study_failure(collect_records(spec, [completed])) is None
    assert cli.study_failure([]) == "no trial ran"


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_run_whose_only_trial_diverges_exits_1_with_one_line(tmp_path: Path) -> None:
    from conftest import write_spec

    # A plug-in layer that turns training activations NaN (tests/plugins/toy_nan.py) diverges in
    # its first epoch (KAF_Free at Adam lr 10 used to, until its bandwidth was kept positive).
    plugin = Path(__file__).resolve().parent / "plugins" / "toy_nan.py"
    spec = write_spec(tmp_path, "diverge", trials=1, include_baseline=False, defenses={"toy_nan": {}},
                      plugins=[str(plugin)], training={"epochs": 1})
    proc = program("run", str(spec), "--quiet", cwd=tmp_path, timeout=800)
    records = json.loads((tmp_path / "results" / "diverge" / "trials.json").read_text())
    assert [r["status"] for r in records] == ["diverged"], proc.stderr[-2000:]
    assert proc.returncode == 1, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("robust-study")]
    assert errors == [f"robust-study run: {cli.study_failure(records)}"], proc.stderr[-2000:]
    assert "no trial completed (1 trial(s)" in errors[0]


# --------------------------------------------------------------------------- ui: stopping the server


def _stat(pid: int) -> tuple[str, int, int, int] | None:
    """(state, ppid, session, start time) of a process from /proc, or None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()
    return fields[0], int(fields[1]), int(fields[3]), int(fields[19])


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _processes() -> dict[int, tuple[str, int, int, int]]:
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _stat(int(entry.name))) is not None:
            found[int(entry.name)] = stat
    return found


def _tree(root: int) -> dict[int, int]:
    """Every descendant of ``root``: pid -> start time (to tell a reused pid from the process)."""
    procs = _processes()
    tree, frontier = {}, [root]
    while frontier:
        parent = frontier.pop()
        for pid, (_, ppid, _, start) in procs.items():
            if ppid == parent and pid not in tree:
                tree[pid] = start
                frontier.append(pid)
    return tree


def _running(pid: int, start: int) -> bool:
    stat = _stat(pid)
    return stat is not None and stat[3] == start and stat[0] not in ("Z", "X")


def _cleanup(proc: subprocess.Popen, recorded: dict[int, int]) -> None:
    """SIGKILL what a test started and may have left: ``proc``'s group while ``proc`` is unreaped
    (so its pid is still ours) and every recorded (pid, start time) that still runs; a pid that
    was freed and reused belongs to someone else and is left alone."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    for pid, start in recorded.items():
        if _running(pid, start):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    proc.wait(timeout=30)


@pytest.mark.server
@pytest.mark.timeout(400)
def test_ui_stops_the_server_and_all_its_workers_on_sigterm(tmp_path: Path) -> None:
    from conftest import free_port, wait_http

    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "mlflow.db").touch()  # an empty store: MLflow creates its tables
    port = free_port()
    log = tmp_path / "ui.log"  # the server's output too: a pipe nobody reads could block it
    tree: dict[int, int] = {}
    with log.open("w") as out:
        ui = subprocess.Popen([sys.executable, "-m", "study", "ui", "--storage", "results", "--port", str(port)],
                              cwd=tmp_path, env=ENV, stdout=out, stderr=out, start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", 240, ui, log)
        tree.update(_tree(ui.pid))
        servers = [pid for pid in tree if _stat(pid)[1] == ui.pid]
        assert len(servers) == 1, tree
        server_sid = _stat(servers[0])[2]
        assert server_sid == servers[0] != ui.pid, "the server must lead a session of its own"
        assert len(tree) > 1, "expected the server to have started workers"
        # MLflow's GenAI job runner and its task consumers are off (study.cli.ui_environment).
        commands = [_cmdline(pid) for pid in tree]
        assert not [c for c in commands if "huey" in c or "_job_runner" in c], commands

        os.kill(ui.pid, signal.SIGTERM)  # robust-study only, as a service manager would
        assert ui.wait(timeout=60) == 143
        assert "robust-study ui: stopped by SIGTERM" in log.read_text().splitlines()

        left = [pid for pid, start in tree.items() if _running(pid, start)]
        left += [pid for pid, (state, _, sid, _) in _processes().items() if sid == server_sid and state != "Z"]
        assert not left, f"left running: {sorted(set(left))}"
        with socket.socket() as sock, pytest.raises(ConnectionRefusedError):
            sock.connect(("127.0.0.1", port))
    finally:
        _cleanup(ui, tree)


# A stand-in server: ignores SIGTERM (so only SIGKILL stops it), starts a worker that ignores
# SIGTERM too and one that leaves the process group (still in the session), prints their pids.
STUBBORN = """
import signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
sleeper = [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"]
workers = [subprocess.Popen(sleeper), subprocess.Popen(sleeper, process_group=0)]
print(" ".join(str(p) for p in [__import__("os").getpid()] + [w.pid for w in workers]), flush=True)
time.sleep(float(sys.argv[1]))
sys.exit(3)
"""


def _serve(live_seconds: float, out: Path) -> tuple[subprocess.Popen, list[int]]:
    """serve() the stand-in in a process of its own; its output goes to files, not pipes, which
    a worker left running would keep open."""
    code = ("import sys\nfrom study.ui_server import serve\n"
            f"sys.exit(serve([sys.executable, '-c', {STUBBORN!r}, '{live_seconds}'], name='fake', grace=1.0))\n")
    with (out / "stdout").open("w") as stdout, (out / "stderr").open("w") as stderr:
        proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=ENV, stdout=stdout, stderr=stderr,
                                start_new_session=True)
    deadline = time.monotonic() + 60
    while not (out / "stdout").read_text().endswith("\n") and time.monotonic() < deadline:
        time.sleep(0.05)
    return proc, [int(p) for p in (out / "stdout").read_text().split()]


@pytest.mark.parametrize("sig, code, label", [(signal.SIGTERM, 143, "SIGTERM"), (signal.SIGINT, 130, "Ctrl-C"),
                                              (signal.SIGHUP, 129, "SIGHUP")])
def test_serve_kills_what_ignores_sigterm_and_ignores_repeated_signals(sig: int, code: int, label: str,
                                                                     tmp_path: Path) -> None:
    proc, pids = _serve(600, tmp_path)
    starts: dict[int, int] = {}
    try:
        assert len(pids) == 3, pids
        starts.update({pid: _stat(pid)[3] for pid in pids})
        os.kill(proc.pid, sig)
        time.sleep(0.3)  # within the 1 s grace: the server ignores SIGTERM
        os.kill(proc.pid, sig)
        assert proc.wait(timeout=60) == code
        assert (tmp_path / "stderr").read_text().splitlines() == [f"fake: stopped by {label}"]
        assert not [pid for pid in pids if _running(pid, starts[pid])]
    finally:
        _cleanup(proc, starts)


def test_serve_returns_the_servers_status_and_stops_the_workers_it_left(tmp_path: Path) -> None:
    proc, pids = _serve(2, tmp_path)
    starts: dict[int, int] = {}
    try:
        assert len(pids) == 3, pids
        starts.update({pid: _stat(pid)[3] for pid in pids})
        assert proc.wait(timeout=60) == 3
        assert (tmp_path / "stderr").read_text() == ""
        assert not [pid for pid, start in starts.items() if _running(pid, start)]
    finally:
        _cleanup(proc, starts)
