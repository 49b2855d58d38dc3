"""The trial: config validation, run_trial, save/load, and the CLI end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from study.config import ConfigError, TrialConfig, commented_default_yaml, parse_trial_config
from study.trial import TrialResult, load_model, run_trial, save_trial

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "study", *args], cwd=cwd, capture_output=True, text=True, timeout=600
    )


def small(**overrides) -> TrialConfig:
    data = {
        "data": {"train_subset": 400},
        "training": {"epochs": 2},
        "eval": {"n_samples": 40, "attacks": [{"name": "pgd", "steps": 3}], "eps_curve": [0.3], "check_samples": 20},
    }
    for key, value in overrides.items():
        data.setdefault(key, {}).update(value) if isinstance(value, dict) else data.__setitem__(key, value)
    return parse_trial_config(data)


# --------------------------------------------------------------------------- config


def test_default_config_is_the_documented_default() -> None:
    config = parse_trial_config({})
    assert (config.data.name, config.model.backbone, config.model.defense) == ("digits", "small_cnn", "none")
    assert config.training.recipe == "standard"
    assert [a.name for a in config.eval.attacks] == ["pgd"]
    printed = yaml.safe_load(commented_default_yaml())
    assert parse_trial_config(printed) == config
    assert "# Dataset name" in commented_default_yaml()


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"modle": {}}, "modle: unknown key"),
        ({"model": {"defense": "magic"}}, "model.defense: 'magic' is not allowed"),
        ({"model": {"backbone": "resnet99"}}, "model.backbone"),
        ({"data": {"name": "imagenet22k"}}, "data.name"),
        ({"training": {"recipe": "yolo"}}, "training.recipe"),
        ({"eval": {"attacks": [{"name": "magic"}]}}, "eval.attacks.0.name"),
        ({"eval": {"eps": 0}}, "eval.eps"),
        ({"eval": {"eps": -0.1}}, "eval.eps"),
        ({"model": {"defense": "kwta", "defense_params": {"gamma": 1.5}}}, "gamma"),
        ({"model": {"defense": "kaf", "defense_params": {"dictionary_size": 1}}}, "dictionary_size"),
        ({"model": {"defense": "kap", "defense_params": {"kernel_size": 2, "stride": 3}}}, "stride"),
        ({"model": {"defense": "kap", "defense_params": {"sigma": -0.1}}}, "sigma"),
        ({"model": {"defense": "topkconv", "defense_params": {"k": 1000}}}, "k"),
        ({"model": {"defense": "kap", "defense_params": {"gamma": 0.1}}}, "unknown parameter(s) gamma"),
        ({"device": "tpu"}, "device"),
    ],
)
def test_bad_configs_give_one_line_naming_the_field(data: dict, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_trial_config(data)
    message = str(info.value)
    assert needle in message
    assert "\n" not in message


def test_missing_dataset_directory_is_a_config_error(tmp_path: Path) -> None:
    from study.data import load_data

    config = parse_trial_config({"data": {"name": "cifar10", "data_dir": str(tmp_path / "nope")}})
    with pytest.raises(ConfigError) as info:
        load_data(config.data, seed=0)
    assert str(tmp_path / "nope") in str(info.value)


# --------------------------------------------------------------------------- run_trial


@pytest.mark.slow
def test_run_trial_is_deterministic_and_reports_everything() -> None:
    epochs: list[int] = []
    first = run_trial(small(), on_epoch=lambda report: epochs.append(report.epoch))
    second = run_trial(small())
    assert epochs == [1, 2]
    assert first.status == "completed" and first.epochs_run == 2
    assert first.clean_accuracy == second.clean_accuracy
    assert first.robust_accuracy == second.robust_accuracy
    assert first.eps_curve == second.eps_curve
    assert 0.0 <= first.robust_accuracy <= first.clean_accuracy <= 1.0
    assert first.eps_curve[0] == (0.0, first.clean_accuracy)
    assert [a["name"] for a in first.attacks] == ["pgd"]
    assert first.attacks[0]["settings"]["steps"] == 3
    assert {f["id"] for f in first.flags} >= {"R1", "R2", "R4", "R8", "R11", "R12", "R15", "R17", "R18"}
    assert set(first.objectives()) == {"clean_accuracy", "robust_accuracy"}
    for a, b in zip(first.model_state.values(), second.model_state.values()):
        assert torch.equal(a, b)


class _NanAfter(torch.nn.Module):
    """Wraps a model; from the given training forward on, the logits are NaN (as a deep KAF net's)."""

    def __init__(self, inner: torch.nn.Module, after: int) -> None:
        super().__init__()
        self.inner, self.after, self.calls = inner, after, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.inner(x)
        if self.training:
            self.calls += 1
            if self.calls > self.after:
                out = out * float("nan")
        return out


def test_divergence_ends_the_trial_with_status_and_epoch(monkeypatch: pytest.MonkeyPatch) -> None:
    import study.trial as trial_module

    real = trial_module.make_model
    monkeypatch.setattr(trial_module, "make_model", lambda config, info: _NanAfter(real(config, info), after=9))
    result = run_trial(small(training={"epochs": 3}))
    assert result.status == "diverged"
    assert result.reason and "epoch 2" in result.reason and "nan" in result.reason
    assert result.trusted is False and result.model_state is None and result.epochs_run == 1


@pytest.mark.slow
def test_save_and_load_model_round_trip(tmp_path: Path) -> None:
    config = small(model={"defense": "kwta", "defense_params": {"gamma": 0.1}})
    result = run_trial(config)
    save_trial(config, result, tmp_path)
    model = load_model(tmp_path)
    assert not model.training
    x = torch.rand(5, 1, 8, 8)
    from study.data import dataset_info
    from study.trial import make_model

    reference = make_model(config, dataset_info(config.data))
    reference.load_state_dict(result.model_state)
    reference.eval()
    assert torch.equal(model(x), reference(x))
    # the annealed γ the model was trained with comes back with the weights
    gammas = {m.gamma for m in model.modules() if hasattr(m, "gamma") and isinstance(m.gamma, float)}
    assert gammas == {result.history[-1]["gamma"]}


def test_load_model_rejects_weights_that_do_not_match(tmp_path: Path) -> None:
    config = small()
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config.model_dump(mode="json")))
    torch.save({"conv.weight": torch.zeros(3)}, tmp_path / "model.pt")
    with pytest.raises(ConfigError, match="do not match"):
        load_model(tmp_path)


# --------------------------------------------------------------------------- CLI


def test_cli_bad_config_exits_2_with_one_line_and_writes_nothing(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {defense: kwta, defense_params: {gamma: 0}}\n")
    out = tmp_path / "out"
    proc = cli("trial", str(bad), "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "gamma" in proc.stderr
    assert not out.exists()

    malformed = tmp_path / "malformed.yaml"
    malformed.write_text("training: {epochs: [1,\n")
    proc = cli("trial", str(malformed), "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 2 and "malformed YAML" in proc.stderr and not out.exists()


def test_program_exit_freezes_gc_only_in_the_program(tmp_path: Path) -> None:
    """The program (entry) returns main's exit code with the objects frozen for a quick exit;
    main itself, which callers may run repeatedly in one process, leaves the collector alone."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {defense: kwta, defense_params: {gamma: 0}}\n")
    # Registered before the program imports anything, so it runs after every other exit handler.
    code = ("import atexit, gc, sys\n"
            "atexit.register(lambda: print('frozen', gc.get_freeze_count(), file=sys.stderr))\n"
            "from study.cli import entry\n"
            f"sys.argv = ['robust-study', 'trial', {str(bad)!r}, '--out', 'out']\n"
            "sys.exit(entry())\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    error, frozen = proc.stderr.strip().splitlines()
    assert "gamma" in error
    assert int(frozen.split()[1]) > 1000  # the imports' objects, not a handful

    import gc

    from study.cli import main

    before = gc.get_freeze_count()
    assert main(["trial", str(bad), "--out", str(tmp_path / "out")]) == 2
    assert gc.get_freeze_count() == before


@pytest.mark.ray
def test_program_shuts_down_the_ray_its_command_started(tmp_path: Path) -> None:
    """entry stops Ray itself (without the exit hook's wait) and still returns main's code."""
    code = ("import sys, ray, study.cli as cli\n"
            "def command(argv=None):\n"
            "    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)\n"
            "    return 3\n"
            "cli.main = command\n"
            "returned = cli.entry()\n"
            "print('initialized', ray.is_initialized(), 'returned', returned)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["initialized", "False", "returned", "3"]


@pytest.mark.slow
def test_cli_trial_and_evaluate_end_to_end(tmp_path: Path) -> None:
    printed = cli("trial", "--print-default", cwd=tmp_path)
    assert printed.returncode == 0
    config = yaml.safe_load(printed.stdout)
    config["data"]["train_subset"] = 400
    config["training"]["epochs"] = 2
    config["eval"].update(n_samples=40, check_samples=20, eps_curve=[0.3], attacks=[{"name": "fgsm"}])
    path = tmp_path / "trial.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = cli("trial", str(path), "--out", str(tmp_path / "run"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "robust" in proc.stdout and "trusted" in proc.stdout
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["attacks"][0]["settings"]["name"] == "fgsm"
    assert result["attacks"][0]["settings"]["eps"] == config["eval"]["eps"]
    rerun_config = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    saved, given = parse_trial_config(rerun_config).model_dump(), parse_trial_config(config).model_dump()
    # The saved config is the given one plus what the run used (docs/reproducibility.md).
    used = saved.pop("reproducibility")
    given.pop("reproducibility")
    assert saved == given
    assert used["threads"] >= 1 and used["environment"]["torch"]

    again = cli("evaluate", str(tmp_path / "run"), "--attack", "pgd", "--eps", "0.3", "--n", "30", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "pgd" in again.stdout and "robust" in again.stdout
    bad = cli("evaluate", str(tmp_path / "run"), "--attack", "nonsense", cwd=tmp_path)
    assert bad.returncode == 2 and "nonsense" in bad.stderr


@pytest.mark.slow
def test_digits_harness_sanity_and_adversarial_training_helps() -> None:
    """docs/evaluation.md R17 and issue 3: standard training ≥ 95% clean and broken by PGD at the
    default ε; fast_at and pgd_at clearly raise robust accuracy."""
    evaluation = {"n_samples": 300, "attacks": [{"name": "pgd", "steps": 20}], "eps_curve": [], "checks": False}
    standard = run_trial(parse_trial_config({"eval": evaluation}))
    assert standard.clean_accuracy >= 0.95
    assert standard.robust_accuracy <= 0.05
    for recipe in ("fast_at", "pgd_at"):
        robust = run_trial(parse_trial_config({"training": {"recipe": recipe}, "eval": evaluation}))
        assert robust.clean_accuracy >= 0.85, recipe
        assert robust.robust_accuracy >= standard.robust_accuracy + 0.25, (recipe, robust.robust_accuracy)


def test_trial_result_dict_is_json_and_names_failed_gates() -> None:
    result = TrialResult(
        status="completed", clean_accuracy=0.9, robust_accuracy=0.1, trusted=False,
        flags=[{"id": "R8", "gate": True, "passed": False}, {"id": "R7", "gate": False, "passed": False}],
    )
    data = json.loads(json.dumps(result.to_dict()))
    assert data["failed_gates"] == ["R8"] and "model_state" not in data
