"""Integrity checks, each tripped by a model (or a measurement) built to trip it."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from study.attacks import ATTACKS, AttackContext, AttackOutcome, Stage, run_attack
from study.config import AttackConfig, EvalConfig
from study.evaluation.checks import (
    Flag,
    check_batch_independence,
    check_black_box,
    check_black_box_any,
    check_eps_curve,
    check_fgsm_vs_pgd,
    check_gradients,
    check_harness,
    check_invariants,
    check_large_eps,
    check_logits,
    check_routing,
    check_stochastic,
    check_unbounded,
    probe_stochastic,
    run_checks,
    trusted,
)


def digits_mlp():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    tr, te = perm[:1300], perm[1300:]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        opt.zero_grad()
        F.cross_entropy(model(x[tr]), y[tr]).backward()
        opt.step()
    return model.eval(), x[te][:80], y[te][:80]


@pytest.fixture(scope="module")
def trained():
    return digits_mlp()


@pytest.fixture()
def ctx() -> AttackContext:
    return AttackContext(eps=0.2, eps_l2=1.0, num_classes=10, seed=0, batch_size=80)


class RandomOutput(nn.Module):
    """Ignores its input: logits are fresh noise on every call."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.randn(x.shape[0], 10, device=x.device) + self.w + 0.0 * x.flatten(1).sum(1, keepdim=True)


class MaskedGradient(nn.Module):
    """The trained model's decisions with an exactly zero input gradient (gradient masking)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x).detach() + 0.0 * x.flatten(1).sum(1, keepdim=True)


class Softmaxed(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.softmax(self.inner(x), dim=1)


class BatchCoupled(nn.Module):
    """Centres each batch on its own mean: a sample's output depends on its batch mates."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x - x.mean(dim=0, keepdim=True) + 0.5)


def outcome(name: str, correct: list[bool], *, white: list[bool] | None = None, violations: int = 0,
            acc_eps: float = 0.2) -> AttackOutcome:
    spec = ATTACKS[name]
    mask = torch.tensor(correct)
    return AttackOutcome(
        name=name, correct=mask, x_adv=None, settings={"eps": acc_eps, "steps": 10}, seconds=0.0,
        invariant_violations=violations,
        white_box_correct=(torch.tensor(white) if white is not None else (mask if spec.white_box else None)),
        white_box=spec.white_box, black_box=spec.black_box, eot=spec.eot,
    )


# --------------------------------------------------------------------------- R1


def test_r1_monotone_curve_passes():
    flag = check_eps_curve([(0.0, 0.95), (0.05, 0.7), (0.1, 0.71), (0.2, 0.1)], clean_accuracy=0.95)
    assert flag.passed and flag.gate and flag.id == "R1"


def test_r1_rising_curve_fails():
    flag = check_eps_curve([(0.0, 0.95), (0.1, 0.3), (0.2, 0.5)], clean_accuracy=0.95)
    assert not flag.passed and flag.values["rises"] == [[0.2, 0.5, 0.3]]


def test_r1_eps_zero_must_equal_clean():
    flag = check_eps_curve([(0.0, 0.8), (0.1, 0.3)], clean_accuracy=0.95)
    assert not flag.passed and "differs from clean" in flag.message


# --------------------------------------------------------------------------- R2, R4 and R11 on real models


def test_trained_model_passes_the_attack_checks(trained, ctx):
    model, x, y = trained
    assert check_large_eps(model, x, y, ctx, steps=10)[0].passed
    flag, out = check_unbounded(model, x, y, ctx)
    assert flag.passed and flag.values["accuracy"] <= 0.05 and out.settings["eps"] == 1.0
    assert out.settings["steps"] == 50
    assert check_gradients(model, x, y).passed
    assert check_logits(model, x).passed
    assert check_batch_independence(model, x, stochastic=False).passed
    stochastic, diff = probe_stochastic(model, x)
    assert not stochastic and diff == 0.0


def test_random_output_model_trips_r12(ctx):
    model = RandomOutput()
    x, y = torch.rand(60, 1, 8, 8), torch.randint(0, 10, (60,))
    stochastic, diff = probe_stochastic(model, x)
    assert stochastic and diff > 0.1
    assert not check_stochastic(stochastic, diff, []).passed
    assert check_stochastic(stochastic, diff, ["eot_pgd"]).passed
    assert check_stochastic(False, 0.0, []).passed
    # Accuracy of a coin flip under attack is itself random: votes over passes decide it.
    voted = dataclasses.replace(ctx, votes=10)
    out = run_attack(model, x, y, AttackConfig(name="pgd", steps=2), voted, keep_adv=False)
    assert out.settings["votes"] == 10 and out.accuracy <= 0.3
    assert not check_batch_independence(model, x, stochastic=False).passed
    assert check_batch_independence(model, x, stochastic=True).values["skipped"]


def test_zero_gradient_model_trips_r11_and_r8(trained, ctx):
    inner, x, y = trained
    model = MaskedGradient(inner)
    flag = check_gradients(model, x, y)
    assert not flag.passed and flag.values["zero"] == x.shape[0]
    pgd = run_attack(model, x, y, AttackConfig(name="pgd", steps=10), ctx, keep_adv=False)
    square = run_attack(model, x, y, AttackConfig(name="square", queries=300), ctx, keep_adv=False)
    # PGD is stuck at its random start; Square walks past the masked gradients.
    assert square.accuracy < pgd.accuracy - 0.2
    flag = check_black_box([pgd], square)
    assert not flag.passed and flag.gate and flag.values["count"] >= 2
    # On the unmasked model the same comparison is clean.
    pgd = run_attack(inner, x, y, AttackConfig(name="pgd", steps=10), ctx, keep_adv=False)
    square = run_attack(inner, x, y, AttackConfig(name="square", queries=300), ctx, keep_adv=False)
    assert check_black_box([pgd], square).passed


def test_softmax_output_trips_r15(trained):
    model, x, _ = trained
    flag = check_logits(Softmaxed(model), x)
    assert not flag.passed and flag.gate and flag.values["rows_sum_to_one"]


def test_batch_coupled_model_warns_r19(trained):
    model, x, _ = trained
    flag = check_batch_independence(BatchCoupled(model), x, stochastic=False)
    assert not flag.passed and not flag.gate


# --------------------------------------------------------------------------- pure checks


def test_r8_counts_only_points_every_white_box_attack_missed():
    n = 100
    base = [True] * n
    pgd = outcome("pgd", base)
    fgsm = outcome("fgsm", [i != 0 for i in range(n)])
    square = outcome("square", [i not in (0, 1) for i in range(n)])
    # sample 0 was also broken by FGSM: only sample 1 counts; one sample is recorded (AutoAttack
    # would warn) but the gate needs >= 2 samples and > 1 %
    flag = check_black_box([pgd, fgsm], square)
    assert flag.values["count"] == 1 and flag.passed
    # ... while the warning at AutoAttack's threshold (any sample) fires, without gating trust
    warn = check_black_box_any(flag)
    assert warn.id == "R8a" and not warn.passed and not warn.gate and "1/100" in warn.message
    assert trusted([flag, warn])
    flag = check_black_box([pgd, fgsm], outcome("square", [i not in (0, 1, 2) for i in range(n)]))
    assert flag.values["count"] == 2 and not flag.passed and "2/100" in flag.message
    assert not check_black_box_any(flag).passed
    flag = check_black_box([pgd, fgsm], outcome("square", [i != 0 for i in range(n)]))
    assert flag.values["count"] == 0 and flag.passed  # Square broke only what FGSM broke too
    assert check_black_box_any(flag).passed
    skipped = check_black_box([pgd], None)
    assert check_black_box_any(skipped).passed and "skipped" in check_black_box_any(skipped).values
    flag = check_black_box([outcome("pgd", [True] * 300)], outcome("square", [i > 1 for i in range(300)]))
    assert flag.values["count"] == 2 and flag.passed  # 2 of 300 is not more than 1 %
    square = outcome("square", [i >= 5 for i in range(n)])
    flag = check_black_box([pgd, fgsm], square)
    assert flag.values["count"] == 4 and not flag.passed
    # an AutoAttack-style record: only the Square stage's successes are black-box successes
    aa = outcome("autoattack", [i >= 4 for i in range(n)], white=[i >= 1 for i in range(n)])
    flag = check_black_box([aa])
    assert flag.values["count"] == 3 and not flag.passed
    assert check_black_box([outcome("autoattack", [i >= 1 for i in range(n)], white=[i >= 1 for i in range(n)])]).passed
    assert check_black_box([square]).values["skipped"] == "no white-box attack"


def test_r18_invariant_violations_fail_the_gate(trained, ctx):
    model, x, y = trained

    class Stub:
        def __init__(self, model: nn.Module) -> None:
            self.model = model

        def __call__(self, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
            return (xb + 2 * ctx.eps * torch.sign(torch.randn_like(xb))).clamp(0, 1)

    spec = dataclasses.replace(ATTACKS["pgd"], build=lambda m, s: [Stage("stub", Stub(m))])
    bad = run_attack(model, x, y, AttackConfig(name="pgd"), ctx, spec=spec)
    good = run_attack(model, x, y, AttackConfig(name="fgsm"), ctx)
    flag = check_invariants([good, bad])
    assert not flag.passed and flag.gate and flag.values["violations"] == bad.invariant_violations > 0
    assert check_invariants([good]).passed


def test_r7_r13_r17_warn_only():
    flag = check_fgsm_vs_pgd([outcome("fgsm", [True, False, False, False, False]),
                              outcome("pgd", [True, True, True, False, False])])
    assert not flag.passed and not flag.gate
    assert check_fgsm_vs_pgd([outcome("pgd", [True])]) is None
    assert not check_routing("kwta", ["pgd"]).passed
    assert check_routing("topkconv", ["pgd", "autoattack"]).passed
    assert check_routing("kap", ["pgd"]) is None
    flag = check_harness("none", "standard", 0.5, 0.2)
    assert not flag.passed and not flag.gate and flag.values["pgd_accuracy"] == 0.5
    assert check_harness("none", "standard", 0.0, 0.2).passed
    assert check_harness("kap", "standard", 0.5, 0.2) is None
    assert check_harness("none", "pgd_at", 0.5, 0.2) is None


def test_trusted_means_every_gate_passed():
    ok = Flag("R1", "a", True, True)
    warn = Flag("R7", "b", False, False)
    bad = Flag("R2", "c", False, True)
    assert trusted([ok, warn]) and not trusted([ok, bad]) and trusted([])
    assert not trusted([bad.as_dict()])


def test_run_checks_on_trained_model(trained, ctx):
    model, x, y = trained
    cfg = EvalConfig(eps=0.2, check_samples=40, attacks=[{"name": "fgsm"}, {"name": "pgd", "steps": 10}])
    outcomes = [run_attack(model, x, y, a, ctx, keep_adv=False) for a in cfg.attacks]
    flags = run_checks(model, x, y, cfg=cfg, ctx=ctx, outcomes=outcomes, clean_accuracy=0.95,
                       eps_curve=[(0.0, 0.95), (0.2, outcomes[1].accuracy)], stochastic=False, max_abs_diff=0.0,
                       defense="none", recipe="standard")
    ids = [f.id for f in flags]
    for rule in ("R1", "R2", "R4", "R7", "R8", "R8a", "R11", "R12", "R15", "R17", "R18", "R19"):
        assert rule in ids
    by_id = {f.id: f for f in flags}
    assert by_id["R8"].values["black_box"] == ["square"] and by_id["R8"].values["n"] == 40
    assert trusted(flags), [f for f in flags if not f.passed]
    assert by_id["R17"].passed and not by_id["R17"].gate
