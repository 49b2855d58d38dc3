"""Tests for the training recipes (study.training.recipes) and the one training loop (study.training.loop)."""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch import nn
from torch.utils.data import TensorDataset

from defenses import KWTAAnnealing
from defenses.build import build_model
from defenses.cas import cas_aux_loss, cas_labels
from defenses.kwta import KWinnersTakeAll
from study.config import TrainingConfig
from study.data import DataBundle, DatasetInfo
from study.training import loop as train_mod
from study.training.loop import EpochReport, fit, lr_factor
from study.training.recipes import (
    RECIPES,
    StepContext,
    linf_pgd,
    mart_objective,
    pgd_step_size,
    trades_objective,
)

CPU = torch.device("cpu")
ADVERSARIAL = ("fast_at", "pgd_at", "trades", "mart")


def _images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ten learnable classes of 1x8x8 images: a class-specific bright bar plus noise, in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 10
    x = 0.2 * torch.rand(n, 1, 8, 8, generator=g)
    for i, c in enumerate(y.tolist()):
        x[i, 0, c % 8, :] += 0.7
        x[i, 0, :, (c * 3) % 8] += 0.3 * (c >= 8)
    # Some pixels exactly at the box edges, where clipping matters.
    x[:, 0, 0, 0] = 0.0
    x[:, 0, 7, 7] = 1.0
    return x.clamp(0, 1), y


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Tiny models: thread start-up and contention cost more than they save (10x on a busy box).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def bundle() -> DataBundle:
    info = DatasetInfo("synthetic", 1, 10, 8, (0.5,), (0.25,))
    return DataBundle(
        TensorDataset(*_images(80, 0)), TensorDataset(*_images(30, 1)),
        TensorDataset(*_images(30, 2)), info,
    )


def _model(defense: str | None = None, params: dict | None = None, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(
        "small_cnn", num_classes=10, in_channels=1, defense=defense,
        defense_params=params or {}, mean=(0.5,), std=(0.25,), width=0.25,
    )


def _cfg(**kw) -> TrainingConfig:
    base = {"epochs": 2, "batch_size": 20, "lr": 0.05, "adv_eps": 0.2, "adv_steps": 3,
            "early_stopping": False}
    base.update(kw)
    return TrainingConfig(**base)


def _fit(model, bundle, cfg, **kw):
    kw.setdefault("defense", "none")
    kw.setdefault("defense_params", {})
    return fit(model, bundle, cfg, device=CPU, seed=kw.pop("seed", 0), **kw)


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# --- recipes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_each_recipe_gives_finite_loss_and_gradients(name: str, bundle: DataBundle) -> None:
    model = _model()
    model.train()
    x, y = bundle.train.tensors[0][:16], bundle.train.tensors[1][:16]
    ctx = StepContext.for_model(model, _cfg(recipe=name))
    for _ in range(2):
        model.zero_grad()
        loss, logits, x_in = RECIPES[name].batch_loss(ctx, x, y)
        assert loss.ndim == 0 and math.isfinite(loss.item())
        assert logits.shape == (16, 10) and x_in.shape == x.shape
        loss.backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)
        assert any(g.abs().sum() > 0 for g in grads)
    assert model.training


@pytest.mark.parametrize("name", ADVERSARIAL)
def test_adversarial_examples_stay_in_ball_and_box(name: str, bundle: DataBundle) -> None:
    model = _model()
    x, y = bundle.train.tensors[0][:20], bundle.train.tensors[1][:20]
    eps = 0.1
    ctx = StepContext.for_model(model, _cfg(recipe=name, adv_eps=eps, adv_steps=4))
    torch.manual_seed(0)
    x_adv = RECIPES[name].perturb(ctx, x, y)
    assert (x_adv - x).abs().max() <= eps + 1e-6
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    # It moved, and most coordinates moved a sizeable part of eps.
    assert ((x_adv - x).abs() > eps / 4).float().mean() > 0.5
    assert not x_adv.requires_grad


@pytest.fixture(scope="module")
def trained_state(bundle: DataBundle) -> dict:
    model = _model()
    _fit(model, bundle, _cfg(epochs=10, lr=0.2))
    return model.state_dict()


@pytest.mark.parametrize("name", ADVERSARIAL)
def test_adversarial_examples_raise_the_loss(name: str, bundle: DataBundle, trained_state) -> None:
    model = _model()
    model.load_state_dict(trained_state)
    x, y = bundle.train.tensors[0][:20], bundle.train.tensors[1][:20]
    ctx = StepContext.for_model(model, _cfg(recipe=name, adv_eps=0.2, adv_steps=5))
    model.eval()
    with torch.no_grad():
        clean = F.cross_entropy(model(x), y).item()
    model.train()
    x_adv = RECIPES[name].perturb(ctx, x, y)
    model.eval()
    with torch.no_grad():
        adv = F.cross_entropy(model(x_adv), y).item()
    assert adv > clean + 0.5, (clean, adv)


def test_noise_recipe_adds_clamped_gaussian(bundle: DataBundle) -> None:
    model = _model()
    x = torch.full((200, 1, 8, 8), 0.5)
    ctx = StepContext.for_model(model, _cfg(recipe="noise", noise_sigma=0.1))
    torch.manual_seed(0)
    x_in = RECIPES["noise"].perturb(ctx, x, torch.zeros(200, dtype=torch.long))
    assert x_in.min() >= 0 and x_in.max() <= 1
    assert abs((x_in - x).std().item() - 0.1) < 0.005
    assert abs((x_in - x).mean().item()) < 0.005
    # Clamping at the box edge.
    ones = torch.ones(4, 1, 8, 8)
    assert RECIPES["noise"].perturb(ctx, ones, torch.zeros(4, dtype=torch.long)).max() <= 1.0


def test_linf_pgd_one_step_is_fgsm() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    x = torch.rand(5, 1, 3, 4)
    y = torch.tensor([0, 1, 2, 0, 1])
    xr = x.clone().requires_grad_(True)
    F.cross_entropy(model(xr), y, reduction="sum").backward()
    model.zero_grad(set_to_none=True)
    expected = (x + 0.05 * xr.grad.sign()).clamp(0, 1)
    got = linf_pgd(
        model, x, lambda z: F.cross_entropy(z, y, reduction="sum"),
        eps=0.05, step_size=0.05, steps=1, start=torch.zeros_like(x),
    )
    assert torch.allclose(got, expected)
    assert all(p.grad is None for p in model.parameters())  # attacks leave parameter grads alone


def test_fgsm_rs_step_is_one_and_a_quarter_eps() -> None:
    # A linear model's CE input gradient (y = 0, two classes) has the sign s of w1 - w0, so
    # Wong et al.'s FGSM-RS gives x + clip(u + 1.25 eps * s, -eps, eps), u ~ U(-eps, eps) the
    # random start (drawn first from the global RNG).
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
    with torch.no_grad():
        model[1].weight.copy_(torch.randn(2, 16))
    x = 0.3 + 0.4 * torch.rand(6, 1, 4, 4)
    y = torch.zeros(6, dtype=torch.long)
    s = (model[1].weight[1] - model[1].weight[0]).sign().view(1, 1, 4, 4)
    ctx = StepContext.for_model(model, _cfg(recipe="fast_at", adv_eps=0.1))
    torch.manual_seed(7)
    x_adv = RECIPES["fast_at"].perturb(ctx, x, y)
    torch.manual_seed(7)
    u = torch.empty_like(x).uniform_(-0.1, 0.1)
    assert torch.allclose(x_adv, x + (u + 0.125 * s).clamp(-0.1, 0.1), atol=1e-6)


def test_attack_mode_follows_the_papers_code(bundle: DataBundle) -> None:
    class Recorder(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner
            self.modes: list[bool] = []

        def forward(self, x):
            self.modes.append(self.training)
            return self.inner(x)

    x, y = bundle.train.tensors[0][:8], bundle.train.tensors[1][:8]
    expected_attack_mode = {"fast_at": True, "pgd_at": True, "trades": False, "mart": False}
    for name, mode in expected_attack_mode.items():
        model = Recorder(_model())
        model.train()
        ctx = StepContext.for_model(model, _cfg(recipe=name, adv_steps=3))
        RECIPES[name].batch_loss(ctx, x, y)
        n_loss = 2 if name in ("trades", "mart") else 1
        attack_modes, loss_modes = model.modes[:-n_loss], model.modes[-n_loss:]
        assert attack_modes and all(m is mode for m in attack_modes), name
        assert all(loss_modes), name  # the loss forwards run in train mode
        assert model.training


def test_pgd_step_size_default_and_override() -> None:
    assert pgd_step_size(_cfg(adv_eps=0.2, adv_steps=10)) == pytest.approx(0.05)
    assert pgd_step_size(_cfg(adv_eps=0.2, adv_steps=10, adv_step_size=0.01)) == 0.01


def test_trades_objective_matches_formula() -> None:
    torch.manual_seed(1)
    zc, za = torch.randn(4, 3), torch.randn(4, 3)
    y = torch.tensor([0, 2, 1, 2])
    p, q = zc.softmax(1), za.softmax(1)
    kl = (p * (p.log() - q.log())).sum(1).mean()
    ce = -p.log()[torch.arange(4), y].mean()
    expected = (ce + 6.0 * kl).item()
    assert trades_objective(zc, za, y, 6.0).item() == pytest.approx(expected, rel=1e-5)


def test_mart_objective_matches_formula() -> None:
    torch.manual_seed(2)
    zc, za = torch.randn(5, 4), torch.randn(5, 4)
    y = torch.tensor([0, 1, 2, 3, 0])
    za[1] = torch.tensor([0.0, 5.0, 1.0, 0.0])  # a sample whose top adversarial class is y
    p, q = zc.softmax(1), za.softmax(1)
    total = 0.0
    for i in range(5):
        wrong = max((k for k in range(4) if k != y[i]), key=lambda k: q[i, k].item())
        bce = -math.log(q[i, y[i]]) - math.log(1.0001 - q[i, wrong] + 1e-12)
        kl = sum(p[i, k] * (math.log(p[i, k]) - math.log(q[i, k] + 1e-12)) for k in range(4))
        total += float(bce + 6.0 * kl * (1.0000001 - p[i, y[i]]))
    assert mart_objective(zc, za, y, 6.0).item() == pytest.approx(total / 5, rel=1e-4)


# --- CAS ------------------------------------------------------------------------------------


def _cas_classifier_params(model: nn.Module) -> list[nn.Parameter]:
    from defenses.cas import ChannelActivationSuppression

    return [p for m in model.modules() if isinstance(m, ChannelActivationSuppression)
            for p in m.parameters()]


def test_cas_aux_loss_joins_the_loss(bundle: DataBundle) -> None:
    x, y = bundle.train.tensors[0][:16], bundle.train.tensors[1][:16]
    losses, grads = {}, {}
    for beta in (0.0, 5.0):
        model = _model("cas", {"placement": "last"})
        model.train()
        ctx = StepContext.for_model(model, _cfg(recipe="standard", cas_beta=beta))
        assert ctx.cas and ctx.cas_beta == beta
        loss, _, _ = RECIPES["standard"].batch_loss(ctx, x, y)
        loss.backward()
        losses[beta] = loss.item()
        params = _cas_classifier_params(model)
        assert params and all(p.grad is not None for p in params)
        grads[beta] = torch.cat([p.grad.flatten() for p in params])
        with cas_labels(model, y):
            ce = F.cross_entropy(model(x), y)
            aux = cas_aux_loss(model, y)
    # loss(beta) = CE + beta * aux on the same forward.
    assert losses[0.0] == pytest.approx(ce.item(), rel=1e-5)
    assert losses[5.0] - losses[0.0] == pytest.approx(5.0 * aux.item(), rel=1e-4)
    assert grads[5.0].abs().sum() > 0 and not torch.allclose(grads[0.0], grads[5.0])


def test_cas_beta_resolution_and_aux_per_used_forward(bundle: DataBundle) -> None:
    model = _model("cas", {"placement": "last"})
    assert StepContext.for_model(model, _cfg()).cas_beta == 2.0
    assert StepContext.for_model(model, _cfg(), {"beta": 3.0}).cas_beta == 3.0
    assert StepContext.for_model(model, _cfg(cas_beta=1.0), {"beta": 3.0}).cas_beta == 1.0
    assert not StepContext.for_model(_model(), _cfg()).cas
    x, y = bundle.train.tensors[0][:8], bundle.train.tensors[1][:8]
    # AT: one aux CE term for the one used forward; TRADES/MART fold their CAS terms into the
    # objective (Table 7 form, tests/test_cas_training.py) and record none.
    for name, n_used in (("pgd_at", 1), ("trades", 0), ("mart", 0)):
        ctx = StepContext.for_model(model, _cfg(recipe=name, adv_steps=2))
        loss, _, _ = RECIPES[name].batch_loss(ctx, x, y)
        assert len(ctx.aux_terms) == n_used, name  # attack forwards add no aux term
        assert math.isfinite(loss.item())


def test_fit_with_cas_and_trades(bundle: DataBundle) -> None:
    result = _fit(_model("cas", {"placement": "last"}), bundle, _cfg(recipe="trades", epochs=1),
                  defense="cas", defense_params={"beta": 2.0})
    assert result.status == "completed" and math.isfinite(result.history[0]["train_loss"])


# --- the loop -------------------------------------------------------------------------------


def test_fit_reports_every_epoch(bundle: DataBundle) -> None:
    reports: list[EpochReport] = []
    result = _fit(_model(), bundle, _cfg(epochs=2), on_epoch=reports.append)
    assert result.status == "completed" and result.epochs_run == 2
    assert [r.epoch for r in reports] == [1, 2]
    assert len(result.history) == 2 and result.history[1]["epoch"] == 2
    for key in ("train_loss", "train_accuracy", "val_accuracy", "lr", "seconds"):
        assert all(key in r.metrics and math.isfinite(r.metrics[key]) for r in reports), key
    assert "val_robust_accuracy" not in reports[0].metrics  # standard training
    assert result.best_epoch is None and result.reason is None and result.seconds > 0
    ck = reports[-1].checkpoint
    assert ck["epoch"] == 2 and all(t.device.type == "cpu" for t in ck["model"].values())


def test_standard_training_learns(bundle: DataBundle) -> None:
    model = _model()
    result = _fit(model, bundle, _cfg(epochs=10, schedule="onecycle", lr=0.2))
    assert result.history[-1]["val_accuracy"] > 0.9
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]


@pytest.mark.parametrize("name", ADVERSARIAL)
def test_adversarial_recipes_record_val_robust_accuracy(name: str, bundle: DataBundle) -> None:
    result = _fit(_model(), bundle, _cfg(recipe=name, epochs=1, adv_steps=2))
    assert result.status == "completed"
    assert 0.0 <= result.history[0]["val_robust_accuracy"] <= 1.0


@pytest.mark.parametrize("recipe", ["standard", "fast_at"])
def test_val_eps_sets_the_epsilon_of_the_per_epoch_robust_accuracy(recipe: str, bundle: DataBundle,
                                                                     monkeypatch) -> None:
    # MO-ASHA compares trials on this number: with val_eps it is measured at that epsilon for every
    # recipe (standard training included), not at the trial's own adv_eps.
    import study.training.loop as train_mod

    seen: list[float] = []
    monkeypatch.setattr(train_mod, "_val_robust_accuracy", lambda model, data, eps, device: seen.append(eps) or 0.5)
    result = _fit(_model(), bundle, _cfg(recipe=recipe, epochs=2, adv_eps=0.05, val_eps=0.3))
    assert seen == [0.3, 0.3] and [h["val_robust_accuracy"] for h in result.history] == [0.5, 0.5]


def test_val_robust_epochs_measure_only_there_and_change_nothing_else(bundle: DataBundle) -> None:
    # A study measures the per-epoch robust accuracy only where it is read (MO-ASHA's rungs).
    # Skipping it elsewhere must leave training untouched: every epoch reseeds its randomness, and
    # the measurement runs in eval mode (no batch-norm statistics move).
    every_model, sparse_model = _model(), _model()
    every = _fit(every_model, bundle, _cfg(recipe="fast_at", epochs=3))
    sparse = _fit(sparse_model, bundle, _cfg(recipe="fast_at", epochs=3, val_robust_epochs=[2]))
    assert ["val_robust_accuracy" in h for h in every.history] == [True, True, True]
    assert ["val_robust_accuracy" in h for h in sparse.history] == [False, True, False]
    assert sparse.history[1]["val_robust_accuracy"] == every.history[1]["val_robust_accuracy"]
    for a, b in zip(every.history, sparse.history, strict=True):
        assert (a["train_loss"], a["val_accuracy"]) == (b["train_loss"], b["val_accuracy"])
    assert _same_weights(every_model, sparse_model)


def test_early_stopping_measures_every_epoch_whatever_val_robust_epochs_says(bundle: DataBundle) -> None:
    # pgd_at keeps its best epoch by this number (Rice et al.): it needs it after every epoch.
    result = _fit(_model(), bundle, _cfg(recipe="pgd_at", epochs=2, early_stopping=True, val_robust_epochs=[]))
    assert ["val_robust_accuracy" in h for h in result.history] == [True, True]


def test_val_robust_epochs_are_counted_from_one() -> None:
    assert TrainingConfig(val_robust_epochs=[3, 1, 3]).val_robust_epochs == [1, 3]
    with pytest.raises(ValidationError, match="epoch 0 must be >= 1"):
        TrainingConfig(val_robust_epochs=[0, 2])


def test_same_seed_same_weights(bundle: DataBundle) -> None:
    cfg = _cfg(recipe="pgd_at", epochs=2, adv_steps=2)
    a, b, c = _model(), _model(), _model()
    _fit(a, bundle, cfg, seed=3)
    _fit(b, bundle, cfg, seed=3)
    _fit(c, bundle, cfg, seed=4)
    assert _same_weights(a, b)
    assert not _same_weights(a, c)


@pytest.mark.parametrize(
    "kw",
    [
        {"recipe": "standard", "optimizer": "sgd", "schedule": "onecycle"},
        {"recipe": "pgd_at", "optimizer": "adam", "schedule": "cosine", "lr": 0.01,
         "early_stopping": True},
        {"recipe": "noise", "optimizer": "sgd", "schedule": "multistep", "milestones": [0.4, 0.7]},
    ],
)
def test_resume_equals_uninterrupted(kw: dict, bundle: DataBundle) -> None:
    cfg = _cfg(epochs=3, adv_steps=2, **kw)
    full = _model()
    reports: list[EpochReport] = []
    full_result = _fit(full, bundle, cfg, on_epoch=reports.append)

    # Round-trip the epoch-1 checkpoint through torch.save/load(weights_only=True), as on disk.
    buf = io.BytesIO()
    torch.save(reports[0].checkpoint, buf)
    buf.seek(0)
    checkpoint = torch.load(buf, weights_only=True)
    # Disturb the global RNG and use a differently initialised model: resume must not care.
    torch.manual_seed(12345)
    resumed = _model(seed=99)
    later: list[EpochReport] = []
    result = _fit(resumed, bundle, cfg, resume=checkpoint, on_epoch=later.append)
    assert result.status == "completed" and result.epochs_run == 3
    assert [r.epoch for r in later] == [2, 3]
    assert _same_weights(full, resumed)
    assert result.best_epoch == full_result.best_epoch
    assert [h["train_loss"] for h in result.history] == [
        h["train_loss"] for h in full_result.history
    ]


def test_resume_from_final_checkpoint_and_mismatch(bundle: DataBundle) -> None:
    cfg = _cfg(epochs=1)
    reports: list[EpochReport] = []
    model = _model()
    _fit(model, bundle, cfg, on_epoch=reports.append)
    other = _model(seed=5)
    result = _fit(other, bundle, cfg, resume=reports[0].checkpoint)
    assert result.status == "completed" and result.epochs_run == 1 and _same_weights(model, other)
    with pytest.raises(ValueError, match="training.lr"):
        _fit(_model(), bundle, _cfg(epochs=1, lr=0.2), resume=reports[0].checkpoint)
    with pytest.raises(ValueError, match="seed"):
        _fit(_model(), bundle, cfg, resume=reports[0].checkpoint, seed=7)


def test_resume_with_other_val_robust_epochs_equals_uninterrupted(bundle: DataBundle) -> None:
    # When the robust accuracy is measured does not shape training: a checkpoint resumes under
    # another list (a study resumed after an upgrade, whose old checkpoints never had the field).
    cfg = _cfg(recipe="fast_at", epochs=2)
    full, reports = _model(), []
    _fit(full, bundle, cfg, on_epoch=reports.append)
    old_style = {**reports[0].checkpoint, "training": {k: v for k, v in reports[0].checkpoint["training"].items()
                                                       if k != "val_robust_epochs"}}
    resumed = _model(seed=99)
    result = _fit(resumed, bundle, _cfg(recipe="fast_at", epochs=2, val_robust_epochs=[]), resume=old_style)
    assert result.status == "completed" and _same_weights(full, resumed)
    assert "val_robust_accuracy" not in result.history[-1]


class _NaNAfter(nn.Module):
    """Outputs NaN logits from the ``n``-th training forward on."""

    def __init__(self, inner: nn.Module, n: int) -> None:
        super().__init__()
        self.inner, self.n, self.calls = inner, n, 0

    def forward(self, x):
        out = self.inner(x)
        if self.training:
            self.calls += 1
            if self.calls >= self.n:
                return out * float("nan")
        return out


def test_nan_loss_ends_training_as_diverged(bundle: DataBundle) -> None:
    reports: list[EpochReport] = []
    # 80 samples / batch 20 = 4 steps per epoch: the 6th forward is epoch 2, step 2.
    result = _fit(_NaNAfter(_model(), 6), bundle, _cfg(epochs=3), on_epoch=reports.append)
    assert result.status == "diverged"
    assert result.diverged_epoch == 2 and result.epochs_run == 1
    assert result.reason == "loss became nan at epoch 2, step 2"
    assert [r.epoch for r in reports] == [1] and len(result.history) == 1


def test_exploding_training_is_diverged_not_raised(bundle: DataBundle) -> None:
    # No normalisation to tame it: a deep linear net with lr 10 and large inputs overflows
    # (weights grow multiplicatively across layers) within the first epoch.
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Flatten(), nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 10)
    )
    big = DataBundle(
        TensorDataset(bundle.train.tensors[0] * 1e3, bundle.train.tensors[1]),
        None, bundle.test, bundle.info,
    )
    result = _fit(model, big, _cfg(epochs=5, lr=10.0, schedule="constant", momentum=0.0))
    assert result.status == "diverged" and result.diverged_epoch == 1
    assert result.epochs_run == 0 and result.history == []
    assert result.reason.startswith("loss became ") and "at epoch 1, step" in result.reason


def test_kwta_gamma_schedule_is_applied_and_recorded(bundle: DataBundle) -> None:
    params = {"gamma": 0.1, "gamma_start": 0.2, "gamma_step": 0.05, "gamma_every": 1,
              "gamma_schedule": "paper", "gamma_hold": 0}
    model = _model("kwta", params)
    result = _fit(model, bundle, _cfg(epochs=4, batch_size=40), defense="kwta",
                  defense_params=params)
    assert [h["gamma"] for h in result.history] == pytest.approx([0.2, 0.15, 0.1, 0.1])
    kwtas = [m for m in model.modules() if isinstance(m, KWinnersTakeAll)]
    assert kwtas and all(m.gamma == pytest.approx(0.1) for m in kwtas)

    fixed = {"gamma": 0.3, "gamma_start": 0.2}
    result = _fit(_model("kwta", fixed), bundle, _cfg(epochs=2, batch_size=40), defense="kwta",
                  defense_params=fixed)
    assert [h["gamma"] for h in result.history] == pytest.approx([0.3, 0.3])
    assert "gamma" not in _fit(_model(), bundle, _cfg(epochs=1)).history[0]


def test_kwta_annealing_formula() -> None:
    hook = KWTAAnnealing(target=0.1, start=0.2, step=0.005, every=2, schedule="paper", hold=0)
    model = _model("kwta", {"gamma": 0.1})
    gammas = [hook.start_epoch(model, e)["gamma"] for e in range(0, 50, 10)]
    assert gammas == pytest.approx([0.2, 0.175, 0.15, 0.125, 0.1])
    with pytest.raises(ValueError, match="gamma_every=0"):
        KWTAAnnealing.from_params({"gamma_every": 0})
    with pytest.raises(ValueError, match="gamma_start=1.5"):
        KWTAAnnealing.from_params({"gamma_start": 1.5})


def test_early_stopping_restores_best_epoch(bundle: DataBundle, monkeypatch) -> None:
    scores = iter([0.3, 0.7, 0.5])
    monkeypatch.setattr(train_mod, "_val_robust_accuracy", lambda *a, **k: next(scores))
    reports: list[EpochReport] = []
    model = _model()
    cfg = _cfg(recipe="pgd_at", epochs=3, adv_steps=1, early_stopping=True)
    result = _fit(model, bundle, cfg, on_epoch=reports.append)
    assert result.best_epoch == 2
    best = reports[1].checkpoint["model"]
    assert all(torch.equal(v, best[k]) for k, v in model.state_dict().items())
    assert not all(torch.equal(v, reports[2].checkpoint["model"][k])
                   for k, v in model.state_dict().items())

    # Switched off: the last epoch's weights stay.
    scores = iter([0.3, 0.7, 0.5])
    reports.clear()
    model = _model()
    result = _fit(model, bundle, cfg.model_copy(update={"early_stopping": False}),
                  on_epoch=reports.append)
    assert result.best_epoch is None
    last = reports[-1].checkpoint["model"]
    assert all(torch.equal(v, last[k]) for k, v in model.state_dict().items())


def test_lr_schedules() -> None:
    # Wong et al.'s triangle over 10 steps: peak at 2/5, zero at the end.
    tri = [lr_factor("onecycle", s, epochs=2, steps_per_epoch=5) for s in range(10)]
    assert tri[3] == pytest.approx(1.0) and tri[-1] == pytest.approx(0.0)
    assert tri[0] == pytest.approx(0.25) and tri[:4] == sorted(tri[:4])
    assert tri[3:] == sorted(tri[3:], reverse=True)
    ms = [lr_factor("multistep", s, 4, 2, (0.5, 0.75)) for s in range(8)]
    assert ms == pytest.approx([1, 1, 1, 1, 0.1, 0.1, 0.01, 0.01])
    cos = [lr_factor("cosine", s, 1, 4) for s in range(4)]
    assert cos[0] == 1.0 and cos[2] == pytest.approx(0.5)
    assert lr_factor("constant", 7, 2, 4) == 1.0
    with pytest.raises(ValueError, match="schedule"):
        lr_factor("step", 0, 1, 1)


def test_recorded_lr_follows_schedule(bundle: DataBundle) -> None:
    result = _fit(_model(), bundle, _cfg(epochs=2, schedule="multistep", milestones=[0.5]))
    assert [h["lr"] for h in result.history] == pytest.approx([0.05, 0.005])
