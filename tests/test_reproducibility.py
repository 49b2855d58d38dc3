"""Reproducible numbers: the trial config records what decides them and a re-run applies it."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from conftest import write_spec

from study.config import ConfigError, TrialConfig, load_trial_config, parse_trial_config
from study.reproducibility import applied, current_environment
from study.results.export import export_document, write_export
from study.spec import parse_spec
from study.trial import run_trial, save_trial


def tiny(**reproducibility: object) -> TrialConfig:
    return parse_trial_config(
        {
            "reproducibility": reproducibility,
            "data": {"train_subset": 200},
            "training": {"epochs": 1, "batch_size": 32},
            "eval": {"n_samples": 20, "attacks": [{"name": "pgd", "steps": 2}], "eps_curve": [], "checks": False},
        }
    )


@pytest.fixture
def ambient_threads() -> Iterator[int]:
    """Yields the thread count to restore; the test sets whatever it likes in between."""
    before = torch.get_num_threads()
    try:
        yield before
    finally:
        torch.set_num_threads(before)


def _threads_seen(config: TrialConfig, ambient: int) -> tuple[list[int], dict[str, torch.Tensor]]:
    """Run ``config`` with torch set to ``ambient`` threads; the thread counts its epochs saw."""
    torch.set_num_threads(ambient)
    seen: list[int] = []
    result = run_trial(config, on_epoch=lambda report: seen.append(torch.get_num_threads()))
    assert result.status == "completed"
    assert torch.get_num_threads() == ambient, "the trial did not restore the process's thread count"
    return seen, result.model_state or {}


@pytest.mark.slow
def test_recorded_threads_hold_whatever_the_process_was_set_to(ambient_threads: int) -> None:
    config = tiny(threads=1)
    seen_two, weights_two = _threads_seen(config, ambient=2)
    seen_one, weights_one = _threads_seen(config, ambient=1)
    assert seen_two == seen_one == [1]
    assert weights_two.keys() == weights_one.keys()
    for name in weights_one:
        assert torch.equal(weights_two[name], weights_one[name]), name


@pytest.mark.slow
def test_unset_threads_take_the_process_default_and_the_saved_config_records_it(
    ambient_threads: int, tmp_path: Path
) -> None:
    config = tiny()  # threads: null
    torch.set_num_threads(2)
    seen: list[int] = []
    result = run_trial(config, on_epoch=lambda report: seen.append(torch.get_num_threads()))
    assert seen == [2]
    save_trial(config, result, tmp_path)
    saved = load_trial_config(tmp_path / "config.yaml").reproducibility
    assert saved.threads == 2 and saved.deterministic is True
    assert saved.environment == current_environment("cpu")
    assert json.loads((tmp_path / "result.json").read_text())["reproducibility"]["threads"] == 2


def test_determinism_switches_hold_during_the_block_and_are_restored() -> None:
    settings = parse_trial_config({"reproducibility": {"deterministic": True}}).reproducibility
    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic)
    with applied(settings, device_type="cpu", seed=3):
        assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
        assert not torch.backends.cudnn.benchmark
    assert (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic) == before


# A fresh interpreter: whether torch's compiler is loaded depends on what ran before in a process.
COMPILER_PROBE = """
import os, sys, torch
from study.config import parse_trial_config
from study.reproducibility import applied
os.environ.pop("TORCHINDUCTOR_DETERMINISTIC", None)
on = parse_trial_config({"reproducibility": {"deterministic": True}}).reproducibility
with applied(on, device_type="cpu", seed=0):
    assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
    assert "torch._inductor.config" not in sys.modules and "torch._dynamo" not in sys.modules
    with applied(on, device_type="cpu", seed=0):  # nested: a second call changes nothing
        pass
    assert torch.are_deterministic_algorithms_enabled() and "torch._dynamo" not in sys.modules
    if sys.argv[1] == "load":  # as a trial's optimizer does: the compiler loads inside the block
        import torch._inductor.config as inductor
        assert inductor.deterministic is True
assert not torch.are_deterministic_algorithms_enabled()
assert "TORCHINDUCTOR_DETERMINISTIC" not in os.environ
if sys.argv[1] == "load":
    assert inductor.deterministic is False  # restored with torch's own flag
    with applied(on, device_type="cpu", seed=0):  # loaded now: both flags set at once
        assert torch.are_deterministic_algorithms_enabled() and inductor.deterministic is True
    assert not torch.are_deterministic_algorithms_enabled() and inductor.deterministic is False
else:
    assert "torch._inductor.config" not in sys.modules
print("ok")
"""


@pytest.mark.parametrize("compiler", ["load", "never"])
def test_determinism_does_not_load_the_compiler_yet_compiled_code_follows_it(compiler: str) -> None:
    # torch.use_deterministic_algorithms imports torch._inductor and torch._dynamo (1.5 s) to set
    # inductor's flag; study.reproducibility.deterministic_algorithms leaves them unloaded until something
    # else loads them, and then inductor still follows the setting.
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root)}
    proc = subprocess.run([sys.executable, "-c", COMPILER_PROBE, compiler], capture_output=True, text=True,
                          env=env, cwd=root, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


def test_seeds_of_python_and_numpy_are_set_from_the_trial_seed() -> None:
    import random

    import numpy as np

    settings = TrialConfig().reproducibility
    draws = []
    for _ in range(2):
        random.seed(None)
        np.random.seed(None)
        with applied(settings, device_type="cpu", seed=11):
            draws.append((random.random(), float(np.random.random())))
    assert draws[0] == draws[1]


def test_a_version_mismatch_warns_in_one_line(caplog: pytest.LogCaptureFixture) -> None:
    here = current_environment("cpu")
    recorded = {**here, "torchattacks": "0.0.1", "device": "cuda Some GPU"}
    settings = parse_trial_config({"reproducibility": {"environment": recorded}}).reproducibility
    with caplog.at_level(logging.WARNING, logger="study.reproducibility"), applied(settings, device_type="cpu", seed=0):
        pass
    [record] = caplog.records
    message = record.getMessage()
    assert "\n" not in message
    assert (
        f"torchattacks 0.0.1 (here {here['torchattacks']})" in message
        and f"device cuda Some GPU (here {here['device']})" in message
    )
    assert "torch " not in message.replace("torchattacks", "")  # equal entries are not listed

    caplog.clear()
    same = parse_trial_config({"reproducibility": {"environment": here}}).reproducibility
    with caplog.at_level(logging.WARNING, logger="study.reproducibility"), applied(same, device_type="cpu", seed=0):
        pass
    assert caplog.records == []


@pytest.mark.parametrize(
    ("section", "needle"),
    [
        ({"threads": 0}, "reproducibility.threads"),
        ({"environment": {"pandas": "2.0"}}, "reproducibility.environment: unknown key(s) pandas"),
        ({"deterministic": "sometimes"}, "reproducibility.deterministic"),
        ({"seed": 1}, "reproducibility.seed: unknown key"),
    ],
)
def test_bad_reproducibility_section_is_one_line(section: dict, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_trial_config({"reproducibility": section})
    assert needle in str(info.value) and "\n" not in str(info.value)


# --------------------------------------------------------------------------- study -> export -> trial


def _cli(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "study", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
    )


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(900)
def test_an_exported_trial_rerun_from_the_command_line_reproduces_the_study(tmp_path: Path) -> None:
    spec = write_spec(
        tmp_path,
        "repro",
        trials=1,
        defenses=["kwta"],
        concurrency=1,
        verify=False,
        mlflow={"log_models": False},
        resources={"cpu": 1},
    )
    ran = _cli("run", str(spec), cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr[-3000:]
    results = tmp_path / "results"
    [record] = json.loads((results / "repro" / "trials.json").read_text())
    assert record["status"] == "completed"
    # Exported as `robust-study export` writes a front (this trial whether or not it is on it).
    state = json.loads((results / "repro" / "study.json").read_text())
    best = write_export(export_document(parse_spec(state["spec"], source="repro"), [record]), tmp_path / "best.yaml")
    document = yaml.safe_load(best.read_text())
    [entry] = document["trials"]
    recorded = entry["config"]["reproducibility"]
    assert recorded["threads"] == 1  # the study's one thread per reserved CPU
    assert recorded["environment"] == current_environment("cpu")

    # The command line would take 2 threads by default here; the recorded 1 must win.
    rerun = _cli("trial", str(best), "--out", str(tmp_path / "rerun"), cwd=tmp_path, env={"OMP_NUM_THREADS": "2"})
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "recorded with" not in rerun.stderr  # same libraries: no warning
    out = tmp_path / "rerun" / f"trial-{entry['number']}"
    result = json.loads((out / "result.json").read_text())
    assert result["reproducibility"]["threads"] == 1
    assert result["split"] == "val"  # scored where the study scored it
    for objective in ("clean_accuracy", "robust_accuracy"):
        assert result[objective] == entry["metrics"][f"val_{objective}"], objective
    # Bit for bit: the study's trained weights (its checkpoint) equal the re-run's.
    study_weights = torch.load(Path(record["checkpoint"]) / "model.pt", weights_only=True)
    rerun_weights = torch.load(out / "model.pt", weights_only=True)
    assert study_weights.keys() == rerun_weights.keys()
    assert all(torch.equal(study_weights[k], rerun_weights[k]) for k in study_weights)

    # The same export recorded with another numpy: the re-run says so in one line.
    entry["config"]["reproducibility"]["environment"]["numpy"] = "0.0.1"
    best.write_text(yaml.safe_dump(document, sort_keys=False))
    warned = _cli("trial", str(best), "--out", str(tmp_path / "rerun2"), cwd=tmp_path)
    assert warned.returncode == 0, warned.stderr[-2000:]
    lines = [line for line in warned.stderr.splitlines() if "recorded with" in line]
    assert len(lines) == 1 and "numpy 0.0.1 (here " in lines[0], warned.stderr[-2000:]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_without_cuda_is_still_one_config_error(ambient_threads: int) -> None:
    config = parse_trial_config({"device": "cuda", "reproducibility": {"threads": 1}})
    with pytest.raises(ConfigError, match="no CUDA device"):
        run_trial(config)
    assert torch.get_num_threads() == ambient_threads  # restored on the way out
