"""Faults and bad input (issue 5): nothing lost, nothing counted twice, one clear line."""

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

from tests.test_study import cli, mlflow_runs, tiny_spec

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- bad input


def _spec(tmp_path: Path, **changes) -> Path:
    path = tiny_spec(tmp_path, name="bad")
    data = yaml.safe_load(path.read_text())
    for dotted, value in changes.items():
        target = data
        *parents, last = dotted.split(".")
        for key in parents:
            target = target.setdefault(key, {})
        target[last] = value
    path.write_text(yaml.safe_dump(data))
    return path


BAD_SPECS = {
    "unknown defense": ({"defenses": ["kap", "magic"]}, "magic"),
    "unknown backbone": ({"model.backbone": "resnet1000"}, "model.backbone"),
    "unknown dataset": ({"data.name": "imagenet22k"}, "data.name"),
    "unknown attack": ({"search_eval.attacks": [{"name": "ouija"}]}, "search_eval.attacks.0.name"),
    "unknown recipe": ({"training.recipe": "vibes"}, "training.recipe"),
    "unknown sampler": ({"sampler.name": "grid"}, "sampler.name"),
    "k larger than channels": ({"defenses": {"topkconv": {"k": 5000}}}, "k"),
    "gamma outside (0,1]": ({"defenses": {"kwta": {"gamma": 1.5}}}, "gamma"),
    "D < 2": ({"defenses": {"kaf": {"dictionary_size": 1}}}, "dictionary_size"),
    "eps <= 0": ({"search_eval.eps": 0}, "search_eval.eps"),
    "negative noise": ({"defenses": {"noise": {"sigma": -0.2}}}, "sigma"),
    "stride larger than kernel": ({"defenses": {"kap": {"kernel_size": 2, "stride": 3}}}, "stride"),
    "unknown key": ({"trainig": {}}, "trainig"),
    "missing dataset directory": ({"data.name": "cifar10", "data.data_dir": "/nonexistent/cifar"}, "/nonexistent/cifar"),
    "unreachable Ray address": ({"address": "127.0.0.1:9"}, "127.0.0.1:9"),
    "GPUs on a cluster without": ({"resources.gpu": 1}, "gpu"),
}


# Refused only once a local Ray instance has started and reported no GPU: not for the fast loop.
STARTS_RAY = {"GPUs on a cluster without"}


@pytest.mark.parametrize(
    "case", [pytest.param(c, marks=pytest.mark.ray) if c in STARTS_RAY else c for c in sorted(BAD_SPECS)]
)
@pytest.mark.timeout(300)
def test_bad_spec_is_one_line_exit_2_and_writes_nothing(tmp_path: Path, case: str) -> None:
    changes, needle = BAD_SPECS[case]
    spec = _spec(tmp_path, **changes)
    proc = cli("run", str(spec), cwd=tmp_path, timeout=240)
    assert proc.returncode == 2, (case, proc.stdout[-500:], proc.stderr[-2000:])
    lines = [line for line in proc.stderr.strip().splitlines() if line.startswith("robust-study")]
    assert len(lines) == 1 and needle in lines[0], proc.stderr[-2000:]
    assert not (tmp_path / "results").exists(), "a refused spec left files behind"


def test_malformed_yaml_spec(tmp_path: Path) -> None:
    spec = tmp_path / "broken.yaml"
    spec.write_text("name: x\ndefenses: [kap,\n")
    proc = cli("run", str(spec), cwd=tmp_path)
    assert proc.returncode == 2 and "malformed YAML" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_unknown_builtin_and_missing_study(tmp_path: Path) -> None:
    proc = cli("run", "no_such_spec", cwd=tmp_path)
    assert proc.returncode == 2 and "built-in" in proc.stderr
    for command in (["export", "ghost", "--out", str(tmp_path / "x.yaml")], ["pareto", "ghost"], ["resume", "ghost"]):
        proc = cli(*command, "--storage", str(tmp_path), cwd=tmp_path)
        assert proc.returncode == 2 and "ghost" in proc.stderr, command
        assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x.yaml").exists()


def test_model_dir_whose_weights_do_not_match(tmp_path: Path) -> None:
    import torch

    from study.config import dump_trial_config, parse_trial_config

    (tmp_path / "config.yaml").write_text(dump_trial_config(parse_trial_config({})))
    torch.save({"normalize.mean": torch.zeros(1)}, tmp_path / "model.pt")
    proc = cli("evaluate", str(tmp_path), "--attack", "pgd", cwd=tmp_path)
    assert proc.returncode == 2 and "do not match" in proc.stderr


# --------------------------------------------------------------------------- faults


def _descendants(pid: int) -> list[int]:
    """All processes below pid (Ray's workers are started by the driver's raylet)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _trial_workers(driver_pid: int) -> list[int]:
    return [p for p in _descendants(driver_pid) if "ImplicitFunc" in _cmdline(p)]


def _run_and_kill_a_trial(tmp_path: Path, name: str, max_failures: int) -> tuple[int, Path]:
    spec = tiny_spec(tmp_path, name=name, trials=3, training={"epochs": 6, "batch_size": 64},
                     max_failures=max_failures, concurrency=1, checkpoint_every_seconds=0)
    study_dir = tmp_path / "results" / name
    driver = subprocess.Popen(
        [sys.executable, "-m", "study", "run", str(spec)], cwd=tmp_path, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    killed = False
    deadline = time.monotonic() + 300
    try:
        while not killed and time.monotonic() < deadline and driver.poll() is None:
            # Kill a worker once its trial has written at least two epoch checkpoints.
            checkpoints = list((study_dir / "tune").glob("*/checkpoint_00000[1-9]"))
            workers = _trial_workers(driver.pid)
            if checkpoints and workers:
                os.kill(workers[0], signal.SIGKILL)
                killed = True
            time.sleep(0.2)
        output, _ = driver.communicate(timeout=600)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    assert killed, "no trial worker was found to kill"
    return driver.returncode, study_dir


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_killed_trial_is_retried_from_its_checkpoint_and_logged_once(tmp_path: Path) -> None:
    code, study_dir = _run_and_kill_a_trial(tmp_path, "killed", max_failures=2)
    assert code == 0
    records = json.loads((study_dir / "trials.json").read_text())
    assert len(records) == 3 and all(r["status"] == "completed" for r in records)
    resumed = [r for r in records if r["resumed_from_epoch"] > 0]
    assert len(resumed) == 1, [(r["trial_id"], r["resumed_from_epoch"]) for r in records]
    parents, children = mlflow_runs(f"sqlite:///{tmp_path / 'results' / 'mlflow.db'}", "killed")
    assert len(children) == 3
    assert len({c.data.tags["robust_study.trial_id"] for c in children}) == 3
    assert all(c.info.status == "FINISHED" for c in children)


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_trial_that_dies_without_retries_is_failed_with_reason_and_study_finishes(tmp_path: Path) -> None:
    code, study_dir = _run_and_kill_a_trial(tmp_path, "dies", max_failures=0)
    assert code == 0
    records = json.loads((study_dir / "trials.json").read_text())
    assert len(records) == 3
    failed = [r for r in records if r["status"] == "failed"]
    assert len(failed) == 1 and failed[0]["reason"]
    assert not failed[0]["on_front"]
    # the front is computed from the rest: exactly the shared rule applied to the other trials
    from study.results.pareto import front_of_records

    rest = [r for r in records if r["status"] == "completed"]
    expected = {rest[i]["trial_id"] for i in front_of_records(rest, ["clean_accuracy", "robust_accuracy"], ["max", "max"])}
    assert {r["trial_id"] for r in records if r["on_front"]} == expected
    _, children = mlflow_runs(f"sqlite:///{tmp_path / 'results' / 'mlflow.db'}", "dies")
    assert len(children) == 3
    failed_runs = [c for c in children if c.info.status == "FAILED"]
    assert len(failed_runs) == 1 and failed_runs[0].data.tags.get("reason")


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_diverging_trial_is_failed_and_the_front_uses_the_rest(tmp_path: Path) -> None:
    # A plug-in layer that turns training activations NaN stands in for a diverging network (the
    # thesis' deep KAF networks diverged; KAF_Free used to, through a bandwidth stepped below 0,
    # until the bandwidth was kept positive). The baseline trains normally.
    plugin = Path(__file__).resolve().parent / "plugins" / "toy_nan.py"
    spec = tiny_spec(tmp_path, name="diverge", trials=2, defenses={"toy_nan": {}}, plugins=[str(plugin)])
    proc = cli("run", str(spec), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = json.loads((tmp_path / "results" / "diverge" / "trials.json").read_text())
    by_defense = {r["defense"]: r for r in records}
    assert by_defense["toy_nan"]["status"] == "diverged" and "nan" in by_defense["toy_nan"]["reason"]
    assert not by_defense["toy_nan"]["on_front"]
    _, children = mlflow_runs(f"sqlite:///{tmp_path / 'results' / 'mlflow.db'}", "diverge")
    nan_run = [c for c in children if c.data.params.get("defense") == "toy_nan"][0]
    assert nan_run.info.status == "FAILED" and "nan" in nan_run.data.tags["reason"]
    import optuna

    study = optuna.load_study(study_name="diverge", storage=f"sqlite:///{tmp_path / 'results' / 'diverge' / 'optuna.db'}")
    states = {t.params.get("defense", "none"): t.state.name for t in study.trials}
    assert len(study.trials) == 2 and states["toy_nan"] == "FAIL"
    # The survivor reaches Optuna as a result only if its evaluation was trusted.
    assert states["none"] == ("COMPLETE" if by_defense["none"]["trusted"] else "FAIL")
