"""k-WTA as published (issue 14, item 1): the sparsity schedule, the fine-tune learning rate, the
gamma actually reached, NaN propagation, "channel" mode in VGG-16's dense head and the
reproduction specs.

Expected values are worked out by hand from the paper's schedule (Xiao et al., ICLR 2020: 50
epochs at gamma 0.2, then the authors' fine-tune lowering gamma by 0.005 every 2 epochs) and
from the scaled variant's definition (docs/defenses.md), and written out literally below.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from defenses import build_model
from defenses.kwta import KWinnersTakeAll, KWTAAnnealing
from study.config import ConfigError, TrainingConfig, parse_trial_config
from study.data import DataBundle, DatasetInfo
from study.results.records import reached_values
from study.spec import BUILTIN_SPECS, load_spec, trial_config_for
from study.training import loop as train_mod
from study.training.loop import fit

CPU = torch.device("cpu")

# The paper's 0.2 -> 0.1 anneal: 0.2 - 0.005 * i for i = 0..19, each held 2 epochs (written out).
_ANNEAL_PAIRS = [
    0.2,
    0.195,
    0.19,
    0.185,
    0.18,
    0.175,
    0.17,
    0.165,
    0.16,
    0.155,
    0.15,
    0.145,
    0.14,
    0.135,
    0.13,
    0.125,
    0.12,
    0.115,
    0.11,
    0.105,
]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Tiny models: thread start-up and contention cost more than they save on a busy machine.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _trajectory(hook: KWTAAnnealing, epochs: int) -> list[float]:
    return [hook.gamma_at(e) for e in range(epochs)]


# --------------------------------------------------------------------------- schedules


def test_paper_schedule_hold_50_then_anneal_every_2_epochs_to_the_target() -> None:
    hook = KWTAAnnealing(target=0.1, start=0.2, step=0.005, every=2, schedule="paper", hold=50, epochs=120)
    # 50 epochs at 0.2; fine-tune epoch j = e - 50 has 0.2 - 0.005 * floor(j / 2): 40 epochs
    # from 0.2 down to 0.105, then 0.1 from epoch 90 to 119 (30 epochs).
    expected = [0.2] * 50 + [g for g in _ANNEAL_PAIRS for _ in range(2)] + [0.1] * 30
    assert len(expected) == 120
    assert _trajectory(hook, 120) == pytest.approx(expected, abs=1e-12)
    assert hook.finetune() is None  # no fine-tune LR unless asked for


def test_paper_schedule_with_a_short_budget_ends_above_the_target() -> None:
    # 15 epochs of the paper schedule never leave the hold: gamma stays 0.2 (and is recorded so).
    hook = KWTAAnnealing(target=0.1, schedule="paper", hold=50, epochs=15)
    assert _trajectory(hook, 15) == [0.2] * 15


def test_scaled_default_reaches_the_target_in_15_epochs() -> None:
    # The trial default (15 epochs) used to end at 0.165. Scaled: H = floor(0.4 * 15) = 6 epochs at
    # 0.2, T = ceil(0.25 * 15) = 4 final epochs at 0.1, A = 15 - 6 - 4 = 5 annealing epochs with
    # a step of (0.2 - 0.1) / 5 = 0.02 per epoch, the first of them still at 0.2.
    hook = KWTAAnnealing.from_params({"gamma": 0.1}, epochs=15)
    assert hook.schedule == "scaled"
    expected = [0.2] * 6 + [0.2, 0.18, 0.16, 0.14, 0.12] + [0.1] * 4
    assert _trajectory(hook, 15) == pytest.approx(expected, abs=1e-12)


def test_scaled_twin_of_the_paper_proportions_in_12_epochs() -> None:
    # hold 0.4167 * 12 = 5.0004 -> 5, final ceil(0.25 * 12) = 3, anneal 4 epochs by 0.025.
    hook = KWTAAnnealing(
        target=0.1,
        start=0.2,
        schedule="scaled",
        hold_fraction=0.4167,
        final_fraction=0.25,
        finetune_lr=0.001,
        epochs=12,
    )
    expected = [0.2] * 5 + [0.2, 0.175, 0.15, 0.125] + [0.1] * 3
    assert _trajectory(hook, 12) == pytest.approx(expected, abs=1e-12)
    assert hook.finetune() == (5, 0.001)


@pytest.mark.parametrize(
    ("epochs", "expected"),
    [
        (1, [0.1]),  # H = 0, T = 1: the target from the start
        (2, [0.2, 0.1]),  # H = 0, T = 1, one annealing epoch (at 0.2)
        (3, [0.2, 0.2, 0.1]),  # H = 1, T = 1, A = 1
        (4, [0.2, 0.2, 0.15, 0.1]),  # H = 1, T = 1, A = 2: step 0.05
    ],
)
def test_scaled_small_budgets(epochs: int, expected: list[float]) -> None:
    hook = KWTAAnnealing.from_params({"gamma": 0.1}, epochs=epochs)
    assert _trajectory(hook, epochs) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(
    "params",
    [
        {"gamma": 0.1},
        {"gamma": 0.05, "gamma_start": 0.5, "gamma_hold_fraction": 0.6, "gamma_final_fraction": 0.4},
        {"gamma": 0.3, "gamma_start": 0.31, "gamma_hold_fraction": 0.0, "gamma_final_fraction": 0.0},
    ],
)
def test_scaled_schedule_always_ends_at_the_target_and_never_rises(params: dict) -> None:
    for epochs in range(1, 201):
        gammas = _trajectory(KWTAAnnealing.from_params(params, epochs=epochs), epochs)
        assert gammas[-1] == pytest.approx(params["gamma"], abs=1e-12), epochs
        assert all(a >= b - 1e-12 for a, b in zip(gammas, gammas[1:])), epochs
        assert max(gammas) <= params.get("gamma_start", 0.2) + 1e-12


def test_target_at_or_above_start_is_constant() -> None:
    assert _trajectory(KWTAAnnealing.from_params({"gamma": 0.3}, epochs=5), 5) == [0.3] * 5
    hook = KWTAAnnealing.from_params({"gamma": 0.3, "gamma_schedule": "paper"}, epochs=60)
    assert set(_trajectory(hook, 60)) == {0.3}


@pytest.mark.parametrize(
    ("params", "needle"),
    [
        ({"gamma_schedule": "fast"}, "gamma_schedule='fast' must be one of scaled, paper"),
        ({"gamma_hold": -1}, "gamma_hold=-1 must be an int >= 0"),
        ({"gamma_hold_fraction": 0.7, "gamma_final_fraction": 0.4}, "must be <= 1"),
        ({"gamma_final_fraction": 1.5}, "gamma_final_fraction=1.5"),
        ({"gamma_finetune_lr": 0}, "gamma_finetune_lr=0"),
        ({"gamma_step": -0.1}, "gamma_step=-0.1"),
    ],
)
def test_bad_schedule_is_a_one_line_config_error(params: dict, needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_trial_config({"model": {"defense": "kwta", "defense_params": {"gamma": 0.1, **params}}})
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_cli_refuses_a_bad_schedule_with_exit_2(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("model: {defense: kwta, defense_params: {gamma_schedule: fast}}\n")
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "study", "trial", str(config), "--out", str(out)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "gamma_schedule" in proc.stderr
    assert not out.exists()


# --------------------------------------------------------------------------- training loop


def _bundle() -> DataBundle:
    g = torch.Generator().manual_seed(0)
    y = torch.arange(60) % 10
    x = 0.2 * torch.rand(60, 1, 8, 8, generator=g)
    for i, c in enumerate(y.tolist()):
        x[i, 0, c % 8, :] += 0.7
    data = TensorDataset(x.clamp(0, 1), y)
    return DataBundle(data, data, data, DatasetInfo("synthetic", 1, 10, 8, (0.5,), (0.25,)))


def _kwta_model(params: dict) -> nn.Module:
    torch.manual_seed(0)
    return build_model(
        "small_cnn",
        num_classes=10,
        in_channels=1,
        defense="kwta",
        defense_params=params,
        mean=(0.5,),
        std=(0.25,),
        width=0.25,
    )


def test_fit_applies_the_schedule_the_finetune_lr_and_records_the_reached_gamma() -> None:
    params = {"gamma": 0.1, "gamma_finetune_lr": 0.001}
    cfg = TrainingConfig(epochs=4, batch_size=30, lr=0.05, schedule="constant", early_stopping=False)
    model = _kwta_model(params)
    result = fit(model, _bundle(), cfg, defense="kwta", defense_params=params, device=CPU, seed=0)
    # 4 epochs scaled: H = 1, T = 1, A = 2 -> 0.2, 0.2, 0.15, 0.1; the fine-tune phase starts at
    # the first annealing epoch (1) with the constant LR 0.001, before it the main LR 0.05.
    assert [h["gamma"] for h in result.history] == pytest.approx([0.2, 0.2, 0.15, 0.1])
    assert [h["lr"] for h in result.history] == pytest.approx([0.05, 0.001, 0.001, 0.001])
    assert result.reached == {"kwta_gamma_reached": pytest.approx(0.1)}


@pytest.mark.parametrize(
    ("hold", "expected_lr"),
    [
        # main phase = the 2 hold epochs: multistep's milestone 0.5 of 2 epochs falls at epoch
        # floor(0.5 * 2 + 0.5) = 1 -> 0.05, 0.005; then the fine-tune LR 0.001 for epochs 2, 3
        (2, [0.05, 0.005, 0.001, 0.001]),
        # a hold beyond the budget: no fine-tune phase, the main schedule spans all 4 epochs
        # (milestone at floor(0.5 * 4 + 0.5) = 2)
        (10, [0.05, 0.05, 0.005, 0.005]),
    ],
)
def test_main_lr_schedule_ends_where_the_finetune_phase_begins(hold: int, expected_lr: list[float]) -> None:
    params = {"gamma": 0.1, "gamma_schedule": "paper", "gamma_hold": hold, "gamma_finetune_lr": 0.001}
    cfg = TrainingConfig(epochs=4, batch_size=30, lr=0.05, schedule="multistep", milestones=[0.5], early_stopping=False)
    result = fit(_kwta_model(params), _bundle(), cfg, defense="kwta", defense_params=params, device=CPU, seed=0)
    assert [h["lr"] for h in result.history] == pytest.approx(expected_lr)


def test_reached_gamma_follows_the_epoch_early_stopping_restores(monkeypatch) -> None:
    scores = iter([0.3, 0.9, 0.5, 0.4])  # epoch 2 (1-based) is the best
    monkeypatch.setattr(train_mod, "_val_robust_accuracy", lambda *a, **k: next(scores))
    params = {"gamma": 0.1, "gamma_schedule": "paper", "gamma_hold": 0, "gamma_step": 0.05, "gamma_every": 1}
    cfg = TrainingConfig(recipe="pgd_at", epochs=4, batch_size=30, adv_steps=1, early_stopping=True)
    model = _kwta_model(params)
    result = fit(model, _bundle(), cfg, defense="kwta", defense_params=params, device=CPU, seed=0)
    # gamma per epoch 0.2, 0.15, 0.1, 0.1; the restored weights are epoch 2's, trained at 0.15.
    assert result.best_epoch == 2
    assert result.reached == {"kwta_gamma_reached": pytest.approx(0.15)}
    gammas = [m.gamma for m in model.modules() if isinstance(m, KWinnersTakeAll)]
    assert gammas and gammas == pytest.approx([0.15] * len(gammas))


def test_reached_value_reaches_records_and_mlflow_metrics() -> None:
    from study.orchestration.runner import collect_records
    from study.tracking.trial_files import result_metrics, result_params

    final = {
        "final": 1,
        "status": "completed",
        "trusted": 1,
        "clean_accuracy": 0.9,
        "robust_accuracy": 0.1,
        "kwta_gamma_reached": 0.165,
        "epoch": 15,
        "timestamp": 1,
        "flags_json": "[]",
    }
    assert reached_values(final) == {"kwta_gamma_reached": 0.165}
    metrics, _ = result_metrics(final)
    assert {m.key: m.value for m in metrics}["kwta_gamma_reached"] == 0.165
    assert [(p.key, p.value) for p in result_params(final)] == [("kwta_gamma_reached", "0.165")]
    assert result_params({**final, "final": 0}) == []  # per-epoch reports carry no reached value
    grid = [
        SimpleNamespace(
            metrics=final, config={"defense": "kwta", "kwta.gamma": 0.1}, error=None, path="/x/trial_a", checkpoint=None
        )
    ]
    record = collect_records(SimpleNamespace(), grid)[0]
    assert record["params"]["kwta.gamma"] == 0.1  # the target, as configured
    assert record["reached"] == {"kwta_gamma_reached": 0.165}  # what the model ended with


# --------------------------------------------------------------------------- NaN


def test_nan_input_propagates_instead_of_turning_into_zeros() -> None:
    x = torch.tensor([[1.0, math.nan, 3.0, -2.0], [1.0, 2.0, 3.0, 4.0]])
    y = KWinnersTakeAll(gamma=0.5)(x)
    assert torch.isnan(y[0, 1])
    # A sample without NaN is unaffected: k = floor(0.5 * 4) = 2 winners, 3 and 4.
    torch.testing.assert_close(y[1], torch.tensor([0.0, 0.0, 3.0, 4.0]))

    x = torch.randn(2, 3, 4, 4)
    x[0, 1, 2, 2] = math.nan
    y = KWinnersTakeAll(gamma=0.25, mode="channel")(x)
    assert torch.isnan(y[0, 1, 2, 2])
    assert int((y[1] != 0).sum()) == 3 * 4  # floor(0.25 * 16) = 4 per channel


def test_nan_reaches_the_logits_of_a_kwta_network() -> None:
    model = _kwta_model({"gamma": 0.2}).eval()
    x = torch.rand(2, 1, 8, 8)
    x[0, 0, 3, 3] = math.nan
    logits = model(x)
    assert torch.isnan(logits[0]).all() and torch.isfinite(logits[1]).all()


# --------------------------------------------------------------------------- channel mode, VGG-16


def test_channel_mode_builds_and_runs_with_the_vgg16_dense_head() -> None:
    config = parse_trial_config(
        {"model": {"backbone": "vgg16", "defense": "kwta", "defense_params": {"gamma": 0.25, "mode": "channel"}}}
    )
    torch.manual_seed(0)
    model = build_model(
        "vgg16", num_classes=10, in_channels=1, defense="kwta", defense_params=dict(config.model.defense_params)
    ).eval()
    kwtas = {name: m for name, m in model.named_modules() if isinstance(m, KWinnersTakeAll)}
    head = {n: m for n, m in kwtas.items() if ".head." in n}
    assert len(kwtas) == 13 + 1 and len(head) == 1
    assert all(m.mode == "channel" for n, m in kwtas.items() if n not in head)
    (head_act,) = head.values()
    assert head_act.mode == "volume"
    seen: list[torch.Tensor] = []
    head_act.register_forward_hook(lambda mod, inp, out: seen.append(out))
    logits = model(torch.rand(3, 1, 8, 8))
    assert logits.shape == (3, 10) and torch.isfinite(logits).all()
    # The head's 512 features are ranked together: k = floor(0.25 * 512) = 128 per sample.
    assert ((seen[0] != 0).sum(1) == 128).all()


# --------------------------------------------------------------------------- reproduction specs


def test_reproduce_kwta_spec_is_the_papers_setup() -> None:
    assert {"reproduce_kwta", "reproduce_kwta_digits"} <= set(BUILTIN_SPECS)
    spec = load_spec("reproduce_kwta")
    assert (spec.data.name, spec.model.backbone, spec.training.recipe) == ("cifar10", "resnet18", "standard")
    assert spec.training.epochs == 50 + 70 and spec.training.lr == 0.1
    assert spec.include_baseline and list(spec.defenses) == ["kwta"]
    assert {a.name for a in spec.search_eval.attacks} == {"fgsm", "pgd"}
    assert spec.search_eval.eps == 0.031 and spec.final_eval.attacks[0].name == "autoattack"
    points = spec.conditional_space().paper_default_configs()
    config = trial_config_for(spec, next(p for p in points if p["defense"] == "kwta"))
    hook = KWTAAnnealing.from_params(config.model.defense_params, epochs=config.training.epochs)
    expected = [0.2] * 50 + [g for g in _ANNEAL_PAIRS for _ in range(2)] + [0.1] * 30
    assert _trajectory(hook, 120) == pytest.approx(expected, abs=1e-12)
    assert hook.finetune() == (50, 0.001)


def test_reproduce_kwta_digits_twin_has_the_same_protocol_scaled_down() -> None:
    big, small = load_spec("reproduce_kwta"), load_spec("reproduce_kwta_digits")
    assert (small.data.name, small.resources.gpu) == ("digits", 0.0)
    assert small.training.recipe == big.training.recipe and small.include_baseline
    assert [a.name for a in small.search_eval.attacks] == [a.name for a in big.search_eval.attacks]
    assert [a.name for a in small.final_eval.attacks] == [a.name for a in big.final_eval.attacks]
    points = small.conditional_space().paper_default_configs()
    config = trial_config_for(small, next(p for p in points if p["defense"] == "kwta"))
    params = config.model.defense_params
    assert params["gamma"] == big.defenses["kwta"]["gamma"] == 0.1
    hook = KWTAAnnealing.from_params(params, epochs=config.training.epochs)
    assert _trajectory(hook, 12) == pytest.approx([0.2] * 6 + [0.175, 0.15, 0.125] + [0.1] * 3, abs=1e-12)
    assert hook.finetune() == (5, 0.001)


@pytest.mark.slow
def test_run_trial_reports_the_reached_gamma_beside_the_target(tmp_path: Path) -> None:
    import json

    from study.cli import format_trial_result
    from study.trial import run_trial, save_trial

    config = parse_trial_config(
        {
            "data": {"train_subset": 300},
            "model": {
                "defense": "kwta",
                "defense_params": {"gamma": 0.1, "gamma_schedule": "paper", "gamma_hold": 1, "gamma_every": 1},
            },
            "training": {"epochs": 3},
            "eval": {"n_samples": 20, "attacks": [{"name": "pgd", "steps": 2}], "eps_curve": [], "checks": False},
        }
    )
    result = run_trial(config)
    # paper schedule, hold 1, every 1: 0.2, then j = 0, 1 -> 0.2, 0.2 - 0.005 = 0.195: the target
    # 0.1 is not reached in 3 epochs, and the record says so
    assert [h["gamma"] for h in result.history] == pytest.approx([0.2, 0.2, 0.195])
    assert result.reached == {"kwta_gamma_reached": pytest.approx(0.195)}
    saved = json.loads((save_trial(config, result, tmp_path) / "result.json").read_text())
    assert saved["reached"] == {"kwta_gamma_reached": pytest.approx(0.195)}
    assert "kwta_gamma_reached = 0.195" in format_trial_result(result)


def test_reached_gamma_is_an_mlflow_param_and_metric_live_and_replayed(tmp_path: Path, monkeypatch) -> None:
    import json

    from mlflow.tracking import MlflowClient

    from study.tracking import MlflowTrialLogger, StudyRun
    from study.tracking.replay import _Runs, replay_trial
    from study.tracking.trial_files import trial_files_from_trial

    monkeypatch.setenv("ROBUST_STUDY_MLFLOW_RETRY_S", "0")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    study = StudyRun(uri, "reached", tmp_path / "mlartifacts")
    parent = study.start("reached", None, params={}, tags={})
    logger = MlflowTrialLogger(uri, study.experiment_id, parent, "reached")
    folder = tmp_path / "tune" / "_trainable_k1"
    folder.mkdir(parents=True)
    trial = SimpleNamespace(
        trial_id="kkkk0001",
        config={"defense": "kwta", "kwta.gamma": 0.1},
        status="RUNNING",
        local_path=str(folder),
        path=str(folder),
        last_result={},
        checkpoint=None,
        error_file=None,
    )

    def report(result: dict) -> dict:
        result = {**result, "trial_id": trial.trial_id, "timestamp": 1_800_000_000 + result["epoch"]}
        with (folder / "result.json").open("a") as out:
            out.write(json.dumps(result) + "\n")
        trial.last_result = result
        return result

    logger.on_trial_start(0, [trial], trial)
    logger.on_trial_result(0, [trial], trial, report({"epoch": 1, "final": 0, "epoch_gamma": 0.2}))
    final = report(
        {
            "epoch": 2,
            "final": 1,
            "status": "completed",
            "clean_accuracy": 0.9,
            "robust_accuracy": 0.1,
            "trusted": 1,
            "flags_json": "[]",
            "kwta_gamma_reached": 0.15,
        }
    )
    logger.on_trial_result(0, [trial], trial, final)
    logger.on_trial_complete(0, [trial], trial)
    # Replaying the same trial (sync after an outage) logs the same param again: accepted, unchanged.
    replay_trial(_Runs(logger.client, study.experiment_id, parent, "reached"), trial_files_from_trial(trial, True))
    study.finish()

    (run,) = [
        r
        for r in MlflowClient(tracking_uri=uri).search_runs([study.experiment_id])
        if r.data.tags.get("mlflow.parentRunId") == parent
    ]
    assert run.data.params["kwta.gamma"] == "0.1"  # the target, as configured
    assert run.data.params["kwta_gamma_reached"] == "0.15"  # what the model ended with
    assert run.data.metrics["kwta_gamma_reached"] == 0.15
