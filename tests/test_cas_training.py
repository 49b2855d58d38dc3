"""CAS training as Bai et al. publish it ("Improving adversarial robustness via channel-wise
activation suppressing", ICLR 2021): the losses of AT+CAS, TRADES+CAS and MART+CAS (Table 7) and
the training attack (Algorithm 1: eval mode, the CAS loss) against values computed here by hand
with numpy, on a tiny linear model with two CAS sites; placements per backbone; the β shared by
training and the adaptive attack; the reproduction specs."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from torch import nn

from defenses.build import build_model
from defenses.cas import CAS_PLACEMENTS, ChannelActivationSuppression, cas_modules
from search_spaces import SPACES
from study.attacks import ATTACKS, AttackContext
from study.config import AttackConfig, TrainingConfig, parse_trial_config
from study.spec import load_spec
from study.training import recipes as recipes_mod
from study.training.recipes import RECIPES, StepContext
from study.trial import runtime_defense_params

D, C, K, N = 6, 5, 4, 8  # input features, CAS channels, classes, batch
S = 2  # CAS sites


class _Tiny(nn.Module):
    """x -> Linear(D, C) -> CAS -> CAS -> Linear(C, K): small enough to write out by hand."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(D, C)
        self.cas1 = ChannelActivationSuppression(C, K)
        self.cas2 = ChannelActivationSuppression(C, K)
        self.fc2 = nn.Linear(C, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.cas2(self.cas1(self.fc1(x.flatten(1)))))


def _tiny(seed: int = 3) -> _Tiny:
    torch.manual_seed(seed)
    model = _Tiny().double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p))  # O(1) weights: the aux terms matter
    return model


def _batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = 0.2 + 0.6 * torch.rand(N, D, generator=g, dtype=torch.float64)
    x_adv = (x + 0.1 * (2 * torch.rand(N, D, generator=g, dtype=torch.float64) - 1)).clamp(0, 1)
    y = torch.arange(N) % K
    return x, x_adv, y


# --- the formulas, by hand ---------------------------------------------------------------------


def _np(model: _Tiny) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def _hand_forward(w: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray | None):
    """Main logits and the two aux logits; rows = y (train mode) or the aux argmax (eval)."""
    h = x @ w["fc1.weight"].T + w["fc1.bias"]
    aux = []
    for site in ("cas1", "cas2"):
        a_w, a_b = w[f"{site}.classifier.weight"], w[f"{site}.classifier.bias"]
        a = h @ a_w.T + a_b  # flat features: global average pooling is the identity
        aux.append(a)
        rows = y if y is not None else a.argmax(1)
        h = h * a_w[rows]
    return h @ w["fc2.weight"].T + w["fc2.bias"], aux


def _log_softmax(z: np.ndarray) -> np.ndarray:
    m = z.max(1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(1, keepdims=True))


def _ce(z: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-sample cross-entropy -log softmax(z)_y."""
    return -_log_softmax(z)[np.arange(len(y)), y]


def _kl(z_clean: np.ndarray, z_adv: np.ndarray, guard: float = 0.0) -> np.ndarray:
    """Per-sample KL(p(x) || p(x_adv)) = sum_k p_k (log p_k - log q_k); MART's code logs q + 1e-12."""
    p = np.exp(_log_softmax(z_clean))
    log_q = _log_softmax(z_adv) if guard == 0.0 else np.log(np.exp(_log_softmax(z_adv)) + guard)
    return (p * (np.log(p) - log_q)).sum(1)


def _mart_bce(z_adv: np.ndarray, y: np.ndarray) -> np.ndarray:
    """MART's boosted CE: -log p_y - log(1.0001 - max_{k != y} p_k + 1e-12) (the code's guards)."""
    p = np.exp(_log_softmax(z_adv))
    others = p.copy()
    others[np.arange(len(y)), y] = -1.0
    return _ce(z_adv, y) - np.log(1.0001 - others.max(1) + 1e-12)


BETA, LAM = 1.5, 3.0  # CAS beta, TRADES/MART regularisation weight


def _hand_loss(recipe: str, w, x, x_adv, y, beta: float = BETA, lam: float = LAM) -> float:
    zc, ac = _hand_forward(w, x, y)  # training forwards: true-label rows
    za, aa = _hand_forward(w, x_adv, y)
    if recipe in ("pgd_at", "fast_at"):  # AT+CAS: CE(x_adv) + beta/S sum_s CE_s(x_adv)
        return float(_ce(za, y).mean() + beta / S * sum(_ce(a, y).mean() for a in aa))
    if recipe == "trades":  # natural CE (main + aux) + lam * KL (main + aux), Table 7
        natural = _ce(zc, y).mean() + beta / S * sum(_ce(a, y).mean() for a in ac)
        robust = _kl(zc, za).mean() + beta / S * sum(_kl(c, a).mean() for c, a in zip(ac, aa))
        return float(natural + lam * robust)
    if recipe == "mart":  # boosted CE (main + aux) + lam * weighted KL (main + aux)
        weight = 1.0000001 - np.exp(_log_softmax(zc))[np.arange(N), y]  # main head's p_y(x)
        bce = _mart_bce(za, y).mean() + beta / S * sum(_mart_bce(a, y).mean() for a in aa)
        kl = (_kl(zc, za, 1e-12) * weight).mean() + beta / S * sum(
            (_kl(c, a, 1e-12) * weight).mean() for c, a in zip(ac, aa)
        )
        return float(bce + lam * kl)
    raise AssertionError(recipe)


def _hand_attack_loss(recipe: str, w, x, x_probe, y, beta: float = BETA) -> float:
    """Summed over the batch; eval mode: every site reweights by its own argmax row."""
    zp, ap = _hand_forward(w, x_probe, None)
    if recipe == "trades":
        zc, acl = _hand_forward(w, x, None)
        return float(_kl(zc, zp).sum() + beta / S * sum(_kl(c, a).sum() for c, a in zip(acl, ap)))
    return float(_ce(zp, y).sum() + beta / S * sum(_ce(a, y).sum() for a in ap))


def _cfg(recipe: str, **kw) -> TrainingConfig:
    base = {"adv_eps": 0.1, "adv_steps": 2, "trades_beta": LAM, "cas_beta": BETA, "early_stopping": False}
    return TrainingConfig(recipe=recipe, **(base | kw))


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_the_fixture_discriminates() -> None:
    """The hand formulas can tell the candidate mistakes apart on this batch."""
    w, (x, x_adv, y) = _np(_tiny()), _batch()
    x, x_adv, y = x.numpy(), x_adv.numpy(), y.numpy()
    _, aux_eval = _hand_forward(w, x, None)
    assert any((a.argmax(1) != y).any() for a in aux_eval)  # eval rows differ from label rows
    assert not np.allclose(_hand_forward(w, x, None)[0], _hand_forward(w, x, y)[0])
    for recipe in ("trades", "mart"):
        assert abs(_hand_loss(recipe, w, x, x_adv, y) - _hand_loss(recipe, w, x, x_adv, y, beta=0)) > 0.1
    # Today's old form (aux CE on x and x_adv, no aux KL) gives another number.
    zc, ac = _hand_forward(w, x, y)
    za, aa = _hand_forward(w, x_adv, y)
    old = _ce(zc, y).mean() + LAM * _kl(zc, za).mean() + BETA / S * sum(_ce(a, y).mean() for a in ac + aa)
    assert abs(old - _hand_loss("trades", w, x, x_adv, y)) > 0.1


# --- the losses --------------------------------------------------------------------------------


@pytest.mark.parametrize("recipe", ["pgd_at", "fast_at", "trades", "mart"])
def test_batch_loss_matches_the_papers_formula(recipe: str) -> None:
    model = _tiny().train()
    x, x_adv, y = _batch()
    ctx = StepContext.for_model(model, _cfg(recipe))
    fixed = dataclasses.replace(RECIPES[recipe], perturb=lambda c, xx, yy: x_adv)
    loss, logits, x_in = fixed.batch_loss(ctx, x, y)
    expected = _hand_loss(recipe, _np(model), x.numpy(), x_adv.numpy(), y.numpy())
    assert loss.item() == pytest.approx(expected, rel=1e-10)
    assert torch.equal(x_in, x_adv)
    zc_adv, _ = _hand_forward(_np(model), x_adv.numpy(), y.numpy())
    np.testing.assert_allclose(logits.detach().numpy(), zc_adv, rtol=1e-10)
    loss.backward()  # gradients reach every auxiliary classifier
    assert all(
        m.classifier.weight.grad is not None and m.classifier.weight.grad.abs().sum() > 0 for m in cas_modules(model)
    )


# --- the training attack -----------------------------------------------------------------------


@pytest.mark.parametrize("recipe", ["pgd_at", "fast_at", "trades", "mart"])
def test_training_attack_ascends_the_cas_loss_in_eval_mode(recipe: str, monkeypatch) -> None:
    model = _tiny().train()
    x, x_probe, y = _batch()
    modes: list[bool] = []
    hook = model.register_forward_pre_hook(lambda m, args: modes.append(m.training))
    seen: dict[str, float] = {}
    real = recipes_mod.linf_pgd

    def spy(m, xx, objective, **kw):
        with torch.no_grad():  # the objective PGD ascends, evaluated at a probe point
            seen["value"] = float(objective(m(x_probe)))
        return real(m, xx, objective, **kw)

    monkeypatch.setattr(recipes_mod, "linf_pgd", spy)
    ctx = StepContext.for_model(model, _cfg(recipe))
    with ctx.labels(y):
        x_adv = RECIPES[recipe].perturb(ctx, x, y)
    hook.remove()
    assert modes and not any(modes)  # every attack forward in eval mode (argmax rows)
    assert model.training  # and back to train mode for the loss
    expected = _hand_attack_loss(recipe, _np(model), x.numpy(), x_probe.numpy(), y.numpy())
    assert seen["value"] == pytest.approx(expected, rel=1e-10)
    assert (x_adv - x).abs().max() <= 0.1 + 1e-12


def test_the_attack_raises_the_cas_loss() -> None:
    model = _tiny().train()
    x, _, y = _batch()
    ctx = StepContext.for_model(model, _cfg("pgd_at", adv_step_size=0.025, adv_steps=8))
    torch.manual_seed(0)
    with ctx.labels(y):
        x_adv = RECIPES["pgd_at"].perturb(ctx, x, y)
    w = _np(model)
    before = _hand_attack_loss("pgd_at", w, x.numpy(), x.numpy(), y.numpy())
    after = _hand_attack_loss("pgd_at", w, x.numpy(), x_adv.numpy(), y.numpy())
    assert after > before + 1.0


def test_without_cas_pgd_at_still_attacks_in_train_mode() -> None:
    model = nn.Sequential(nn.Linear(D, C), nn.BatchNorm1d(C), nn.Linear(C, K)).double().train()
    modes: list[bool] = []
    model.register_forward_pre_hook(lambda m, args: modes.append(m.training))
    x, _, y = _batch()
    ctx = StepContext.for_model(model, _cfg("pgd_at"))
    with ctx.labels(y):
        RECIPES["pgd_at"].perturb(ctx, x, y)
    assert modes and all(modes)


# --- one beta ----------------------------------------------------------------------------------


@pytest.mark.parametrize("recipe", ["pgd_at", "trades", "mart"])
@pytest.mark.parametrize(("defense_beta", "training_beta"), [(3.0, None), (3.0, 0.5)])
def test_the_beta_that_trains_is_the_adaptive_attacks(recipe, defense_beta, training_beta) -> None:
    training = {"recipe": recipe, "trades_beta": LAM} | (
        {"cas_beta": training_beta} if training_beta is not None else {}
    )
    config = parse_trial_config(
        {"model": {"defense": "cas", "defense_params": {"beta": defense_beta}}, "training": training}
    )
    resolved = runtime_defense_params(config)
    actx = AttackContext(eps=0.1, eps_l2=1.0, num_classes=K, defense_params=resolved)
    attack_beta = ATTACKS["cas_adaptive"].resolve(AttackConfig(name="cas_adaptive"), actx)["beta"]
    assert attack_beta == (training_beta if training_beta is not None else defense_beta)
    model = _tiny().train()
    x, x_adv, y = _batch()
    ctx = StepContext.for_model(model, config.training, resolved)
    fixed = dataclasses.replace(RECIPES[recipe], perturb=lambda c, xx, yy: x_adv)
    loss, _, _ = fixed.batch_loss(ctx, x, y)
    expected = _hand_loss(recipe, _np(model), x.numpy(), x_adv.numpy(), y.numpy(), beta=attack_beta)
    assert loss.item() == pytest.approx(expected, rel=1e-10)


# --- placements --------------------------------------------------------------------------------


def _sites(backbone: str, placement: str, in_channels: int = 3) -> list[tuple[str, int]]:
    model = build_model(
        backbone, num_classes=10, in_channels=in_channels, defense="cas", defense_params={"placement": placement}
    )
    return [
        (name.removeprefix("net."), m.channels)
        for name, m in model.named_modules()
        if isinstance(m, ChannelActivationSuppression)
    ]


@pytest.mark.parametrize(
    ("backbone", "placement", "expected"),
    [
        # ResNet-18 (BasicBlocks 2-2-2-2, 64-128-256-512): Bai et al.'s best, both blocks of layer4 ...
        ("resnet18", "last2", [("layer4.0.post_block", 512), ("layer4.1.post_block", 512)]),
        # ... and their Block3 + Block4 ablation: every block of layer3 and layer4.
        (
            "resnet18",
            "last4",
            [
                ("layer3.0.post_block", 256),
                ("layer3.1.post_block", 256),
                ("layer4.0.post_block", 512),
                ("layer4.1.post_block", 512),
            ],
        ),
        # VGG-16 config D: convs 11-13 (512 channels) sit at features.14/15/16 after four max-pools.
        (
            "vgg16",
            "last3",
            [("features.14.post_block", 512), ("features.15.post_block", 512), ("features.16.post_block", 512)],
        ),
        (
            "small_cnn",
            "last3",
            [("features.0.post_block", 32), ("features.1.post_block", 64), ("features.3.post_block", 128)],
        ),
    ],
)
def test_placements_per_backbone(backbone, placement, expected) -> None:
    assert _sites(backbone, placement, in_channels=1 if backbone == "small_cnn" else 3) == expected


def test_a_placement_beyond_the_backbone_is_refused_in_one_line() -> None:
    with pytest.raises(ValueError, match=r"n_block_out=4 must be in \[0, 3\] for small_cnn"):
        _sites("small_cnn", "last4", in_channels=1)
    with pytest.raises(ValueError, match="placement='block4' must be one of 'last', 'last2', 'last3', 'last4'"):
        _sites("resnet18", "block4")


def test_search_space_offers_vgg_last3_but_not_last4() -> None:
    placement = next(p for p in SPACES["cas"].params if p.name == "placement")
    assert placement.choices == ("last", "last2", "last3")
    assert set(placement.choices) < set(CAS_PLACEMENTS)


# --- reproduction specs ------------------------------------------------------------------------


def test_reproduce_cas_specs_validate_with_the_papers_protocol() -> None:
    paper = load_spec("reproduce_cas")
    assert (paper.data.name, paper.model.backbone) == ("cifar10", "resnet18")
    assert paper.defenses == {"cas": {"beta": 2.0, "placement": "last2", "recipe": "pgd_at"}}
    t = paper.training
    # Bai et al.: PGD-10 AT, eps 8/255, step 2/255, SGD 0.1 momentum 0.9, 200 epochs / 10 at 75, 90.
    assert (t.recipe, t.adv_steps, t.epochs, t.lr, t.momentum, t.schedule) == ("pgd_at", 10, 200, 0.1, 0.9, "multistep")
    assert t.adv_eps == pytest.approx(8 / 255, abs=1e-5) and t.adv_step_size == pytest.approx(2 / 255, abs=1e-5)
    assert [round(m * 200) for m in t.milestones] == [75, 90]
    names = {a.name for a in paper.final_eval.attacks}
    assert {"fgsm", "pgd", "cw_linf", "cas_adaptive"} <= names
    twin = load_spec("reproduce_cas_digits")
    assert (twin.data.name, twin.model.backbone) == ("digits", "small_cnn")
    assert twin.defenses == paper.defenses and twin.include_baseline == paper.include_baseline
    assert twin.training.recipe == "pgd_at" and twin.training.schedule == "multistep"
    assert {a.name for a in twin.final_eval.attacks} == names
    assert math.isclose(twin.training.adv_step_size / twin.training.adv_eps, 0.25, rel_tol=1e-3)
