"""Every flag can fire: for each rule a handcrafted model that trips it and one that passes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from study.attacks import AttackContext, run_attack
from study.config import AttackConfig, EvalConfig
from study.evaluation.checks import (
    check_eps_curve,
    check_fgsm_vs_pgd,
    check_large_eps,
    check_more_restarts,
    check_more_steps,
    check_unbounded,
    noise_tolerance,
    run_checks,
)
from study.evaluation.suite import eps_curve, evaluate


def digits_mlp():
    """tests/test_checks.py's trained digits MLP, on its first 40 test samples."""
    from test_checks import digits_mlp as checks_mlp

    model, x, y = checks_mlp()
    return model, x[:40], y[:40]


@pytest.fixture(scope="module")
def trained():
    return digits_mlp()


def ctx_for(classes: int = 10, eps: float = 0.2, **kw) -> AttackContext:
    return AttackContext(eps=eps, eps_l2=1.0, num_classes=classes, seed=0, batch_size=256, **kw)


def grey(n: int = 40, d: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """n flat-grey images of d pixels, label 0."""
    return torch.full((n, 1, 1, d), 0.5), torch.zeros(n, dtype=torch.long)


class Wearing(nn.Module):
    """Right (class 0) for its first calls, wrong for ever after: attacking it changes its answers,
    so a zero-budget attack scores lower than the clean pass that came first."""

    def __init__(self, fresh_calls: int = 1) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))
        self.calls, self.fresh = 0, fresh_calls

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        s = 5.0 if self.calls <= self.fresh else -5.0
        return torch.stack([torch.full_like(x.flatten(1)[:, 0], s), torch.zeros_like(x.flatten(1)[:, 0])], 1) + (
            self.w + 0.0 * x.flatten(1).sum(1, keepdim=True)
        )


class FarIsSafe(nn.Module):
    """Class 0 (right) near the grey point or once any pixel is more than 0.3 away; class 1 in
    between. Piecewise constant, so PGD stays at its random start: at eps 0.2 every start is in
    the wrong band, at eps 0.45 almost every start has a pixel beyond 0.3: accuracy rises."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dev = (x.flatten(1) - 0.5).abs().amax(dim=1)
        right = (dev <= 0.05) | (dev > 0.3)
        z = torch.where(right, 5.0, -5.0)
        return torch.stack([z, torch.zeros_like(z)], 1) + self.w + 0.0 * x.flatten(1).sum(1, keepdim=True)


class Threshold(nn.Module):
    """Linear: class 1 wins when the mean pixel exceeds 0.5 + t. PGD from a random start needs
    several steps of a small step size to cross, so a short attack has not converged."""

    def __init__(self, t: float) -> None:
        super().__init__()
        self.t = t
        self.w = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x.flatten(1).mean(dim=1) - 0.5 - self.t
        return torch.stack([torch.zeros_like(m), 200 * m], dim=1) + self.w


class CornerOnly(nn.Module):
    """Wrong only at the corner of the eps-ball (every pixel raised by >= 0.98 eps). The loss
    gradient (straight-through, from a smooth surrogate) points up at the clean point but back to
    eps/2 elsewhere: FGSM's one full step reaches the corner, PGD from a random start oscillates
    around eps/2 and never does. A masked loss surface: R7's signature."""

    def __init__(self, eps: float, d: int = 64) -> None:
        super().__init__()
        self.eps, self.d = eps, d
        self.w = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dev = x.flatten(1) - 0.5
        decision = 100 * (dev.amin(dim=1) - 0.98 * self.eps)
        a, b = 1.0, 1.0 / (self.eps * self.d)  # d/dx_j = a/d - 2b dev_j = 0 at dev_j = eps/2
        smooth = a * dev.mean(dim=1) - b * (dev**2).sum(dim=1)
        z1 = decision.detach() + smooth - smooth.detach()
        return torch.stack([torch.zeros_like(z1), z1], dim=1) + self.w


class Masked(nn.Module):
    """The trained model's answers with no input gradient at all (gradient masking)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x).detach() + 0.0 * x.flatten(1).sum(1, keepdim=True)


class NoisyLogits(nn.Module):
    def __init__(self, inner: nn.Module, sigma: float) -> None:
        super().__init__()
        self.inner, self.sigma = inner, sigma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.inner(x)
        return out + self.sigma * torch.randn_like(out)


# --------------------------------------------------------------------------- R1


def test_r1_eps_zero_runs_the_attack_and_catches_a_model_that_changes_when_attacked(trained):
    ctx = ctx_for(2)
    x, y = grey(20)
    model = Wearing()
    curve, outcomes = eps_curve(model, x, y, [0.1], ctx, steps=3)
    assert outcomes[0].settings["eps"] == 0.0 and curve[0] == (0.0, 0.0)
    flag = check_eps_curve(curve, clean_accuracy=1.0)  # the clean pass (the model's first call) was right
    assert not flag.passed and "differs from clean" in flag.message
    # A stateless model: the zero-budget attack reproduces the clean accuracy.
    mlp, xt, yt = trained
    curve, _ = eps_curve(mlp, xt, yt, [0.1], ctx_for())
    clean = float((mlp(xt).argmax(1) == yt).float().mean())
    assert curve[0] == (0.0, clean) and check_eps_curve(curve, clean).passed


def test_r1_catches_accuracy_rising_with_eps(trained):
    x, y = grey(40)
    curve, _ = eps_curve(FarIsSafe(), x, y, [0.2, 0.45], ctx_for(2), steps=3)
    acc = dict(curve)
    assert acc[0.2] == 0.0 and acc[0.45] >= 0.9
    flag = check_eps_curve(curve, clean_accuracy=1.0)
    assert not flag.passed and flag.values["rises"][0][0] == 0.45
    mlp, xt, yt = trained
    curve, _ = eps_curve(mlp, xt, yt, [0.05, 0.2, 0.45], ctx_for(), steps=10)
    assert check_eps_curve(curve, float((mlp(xt).argmax(1) == yt).float().mean())).passed


def test_r1_is_skipped_only_without_a_curve_and_runs_in_the_default_final_suite():
    from study.spec import StudySpec

    flag = check_eps_curve([], 0.9)
    assert flag.passed and flag.values["skipped"]
    final = StudySpec.model_validate({"name": "s"}).final_eval
    assert final.eps_curve == [final.eps / 2, final.eps, 2 * final.eps]
    assert EvalConfig(eps=0.03137).eps_curve == [0.015685, 0.03137, 0.06274]


# --------------------------------------------------------------------------- R2, R4, R17


def test_r2_r4_fire_on_masked_gradients_and_pass_on_a_plain_model(trained):
    mlp, x, y = trained
    assert not check_large_eps(Masked(mlp), x, y, ctx_for(), steps=10)[0].passed
    assert not check_unbounded(Masked(mlp), x, y, ctx_for())[0].passed
    assert check_large_eps(mlp, x, y, ctx_for(), steps=10)[0].passed
    assert check_unbounded(mlp, x, y, ctx_for())[0].passed


# --------------------------------------------------------------------------- R5, R6


def test_r5_fires_when_twice_the_steps_break_more(trained):
    x, y = grey(60)
    ctx = ctx_for(2)
    base_cfg = AttackConfig(name="pgd", steps=2, step_size=0.01)
    model = Threshold(0.03)
    base = run_attack(model, x, y, base_cfg, ctx, keep_adv=False)
    longer = run_attack(model, x, y, base_cfg.model_copy(update={"steps": 4}), ctx, keep_adv=False)
    flag = check_more_steps(base, longer)
    assert not flag.passed and not flag.gate and flag.values["steps"] == [2, 4]
    assert flag.values["drop"] > 0.2
    mlp, xt, yt = trained  # PGD-10 at eps 0.2 breaks the plain model already: nothing left to find
    cfg = AttackConfig(name="pgd", steps=10)
    base = run_attack(mlp, xt, yt, cfg, ctx_for(), keep_adv=False)
    assert check_more_steps(
        base, run_attack(mlp, xt, yt, cfg.model_copy(update={"steps": 20}), ctx_for(), keep_adv=False)
    ).passed


def test_r6_fires_when_twice_the_restarts_break_more(trained):
    x, y = grey(60)
    ctx = ctx_for(2)
    base_cfg = AttackConfig(name="pgd", steps=2, step_size=0.01)
    model = Threshold(0.03)
    base = run_attack(model, x, y, base_cfg, ctx, keep_adv=False)
    more = run_attack(model, x, y, base_cfg.model_copy(update={"restarts": 2}), ctx, keep_adv=False)
    flag = check_more_restarts(base, more)
    assert not flag.passed and not flag.gate and flag.values["restarts"] == [1, 2]
    mlp, xt, yt = trained
    cfg = AttackConfig(name="pgd", steps=10)
    base = run_attack(mlp, xt, yt, cfg, ctx_for(), keep_adv=False)
    more = run_attack(mlp, xt, yt, cfg.model_copy(update={"restarts": 2}), ctx_for(), keep_adv=False)
    assert check_more_restarts(base, more).passed


# --------------------------------------------------------------------------- R7


def test_r7_fires_when_fgsm_beats_pgd(trained):
    eps = 0.2
    x, y = grey(30)
    model = CornerOnly(eps)
    fgsm = run_attack(model, x, y, AttackConfig(name="fgsm"), ctx_for(2, eps), keep_adv=False)
    pgd = run_attack(model, x, y, AttackConfig(name="pgd", steps=10), ctx_for(2, eps), keep_adv=False)
    assert fgsm.accuracy == 0.0 and pgd.accuracy == 1.0
    flag = check_fgsm_vs_pgd([fgsm, pgd])
    assert not flag.passed and not flag.gate
    mlp, xt, yt = trained
    fgsm = run_attack(mlp, xt, yt, AttackConfig(name="fgsm"), ctx_for(), keep_adv=False)
    pgd = run_attack(mlp, xt, yt, AttackConfig(name="pgd", steps=10), ctx_for(), keep_adv=False)
    assert check_fgsm_vs_pgd([fgsm, pgd]).passed


def test_run_checks_brings_its_own_fgsm_and_convergence_attacks(trained):
    """A suite with PGD alone still gets R5, R6 and R7 (the checks run FGSM themselves)."""
    eps = 0.2
    x, y = grey(30)
    # The suite's PGD has its own eps (not the eval eps 0.3): the check's FGSM must use the same.
    cfg = EvalConfig(eps=0.3, check_samples=30, attacks=[{"name": "pgd", "steps": 10, "eps": eps}], eps_curve=[])
    ctx = ctx_for(2, 0.3)
    model = CornerOnly(eps)
    outcomes = [run_attack(model, x, y, a, ctx, keep_adv=False) for a in cfg.attacks]
    flags = {
        f.id: f
        for f in run_checks(
            model,
            x,
            y,
            cfg=cfg,
            ctx=ctx,
            outcomes=outcomes,
            clean_accuracy=1.0,
            eps_curve=[],
            stochastic=False,
            max_abs_diff=0.0,
            defense="kap",
            recipe="standard",
        )
    }
    assert not flags["R7"].passed and flags["R7"].values["pgd_attack"] == "pgd" and flags["R7"].values["eps"] == eps
    assert {"R5", "R6", "R7"} <= set(flags)
    mlp, xt, yt = trained
    outcomes = [run_attack(mlp, xt, yt, a, ctx_for(), keep_adv=False) for a in cfg.attacks]
    flags = {
        f.id: f
        for f in run_checks(
            mlp,
            xt,
            yt,
            cfg=cfg.model_copy(update={"check_samples": 40}),
            ctx=ctx_for(),
            outcomes=outcomes,
            clean_accuracy=1.0,
            eps_curve=[],
            stochastic=False,
            max_abs_diff=0.0,
            defense="kap",
            recipe="standard",
        )
    }
    assert flags["R5"].passed and flags["R6"].passed and flags["R7"].passed


def test_noise_tolerance_is_three_standard_errors_of_a_difference():
    # Two estimates over n samples x passes, each with variance <= 1/4 / (n * passes).
    assert noise_tolerance(100, 10) == pytest.approx(3 * (2 * 0.25 / 1000) ** 0.5)
    assert noise_tolerance(100, 1) == 0.0


# --------------------------------------------------------------------------- R12


def test_r12_fires_for_a_noisy_model_evaluated_without_eot(trained):
    mlp, x, y = trained
    args = dict(num_classes=10, defense="none", defense_params={}, recipe="standard", seed=0)
    base = dict(eps=0.2, passes=4, attacks=[{"name": "pgd", "steps": 2}], eps_curve=[], checks=False)
    result = evaluate(NoisyLogits(mlp, 1.0), x[:20], y[:20], EvalConfig(**base, add_eot=False), **args)
    r12 = next(f for f in result.flags if f["id"] == "R12")
    assert not r12["passed"] and r12["gate"] and r12["values"]["eot_attacks"] == []
    assert [a["name"] for a in result.attacks] == ["pgd"] and any("add_eot" in n for n in result.notes)
    result = evaluate(NoisyLogits(mlp, 1.0), x[:20], y[:20], EvalConfig(**base), **args)
    assert next(f for f in result.flags if f["id"] == "R12")["passed"]
    result = evaluate(mlp, x[:20], y[:20], EvalConfig(**base, add_eot=False), **args)
    assert next(f for f in result.flags if f["id"] == "R12")["passed"]  # deterministic: nothing to average
