"""Randomized models scored as deployed: expected accuracy of the single-pass classifier, every
sample some pass gets right attacked, the vote only as a labelled smoothed classifier."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torchattacks
from torch import nn

from study.attacks import ATTACKS, AttackContext, EveryAPGD, Stage, clean_score, run_attack
from study.config import AttackConfig, EvalConfig
from study.evaluation.suite import evaluate


class Flicker(nn.Module):
    """Input-independent and exactly periodic: on its k-th call, sample i (tagged by pixel 0 = i)
    is classified correctly (class 0) unless (i + k) % 4 == 0. So over any 4 consecutive passes
    every sample is right in exactly 3 of them: expected accuracy 3/4 by construction, while a vote
    over those passes (mean softmax: 3 passes favour class 0) is right on every sample."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tag = x.flatten(1)[:, 0].mul(1000).round().long()
        wrong = (tag + self.calls) % 4 == 0
        self.calls += 1
        score = torch.where(wrong, -2.0, 2.0).to(x.dtype)
        # A gradient path that changes nothing: attacks run, and cannot move the prediction.
        return torch.stack([score, -score], dim=1) + self.w + 0.0 * x.flatten(1).sum(1, keepdim=True)


def flicker_data(n: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.full((n, 1, 2, 2), 0.5)
    x[:, 0, 0, 0] = torch.arange(n) / 1000.0
    return x, torch.zeros(n, dtype=torch.long)


def run(model, x, y, cfg, **kw):
    args = dict(num_classes=2, defense="none", defense_params={}, recipe="standard", seed=0)
    args.update(kw)
    return evaluate(model, x, y, cfg, **args)


def test_expected_accuracy_of_a_flickering_model_is_three_quarters_and_the_vote_says_one():
    x, y = flicker_data()
    # 8 passes = two full periods; by hand: each sample right in 6 of 8 passes -> 0.75 exactly.
    cfg = EvalConfig(eps=0.1, passes=8, attacks=[{"name": "pgd", "steps": 2}], eps_curve=[], checks=False)
    result = run(Flicker(), x, y, cfg)
    assert result.stochastic
    assert result.clean_accuracy == 0.75 and result.robust_accuracy == 0.75
    assert "single-pass" in result.protocol["scoring"]
    # The vote is another classifier (mean softmax over 8 passes: 6 of them favour class 0).
    smoothed = run(Flicker(), x, y, cfg.model_copy(update={"randomized": "smoothed"}))
    assert smoothed.clean_accuracy == 1.0 and smoothed.robust_accuracy == 1.0
    assert "smoothed classifier" in smoothed.protocol["scoring"]
    assert all("smoothed" in a["settings"]["scoring"] for a in smoothed.attacks)
    assert any("smoothed classifier" in n for n in smoothed.notes)


class GaussianMargin(nn.Module):
    """Two classes; logit of class 1 minus class 0 is mu_i + N(0, 1), mu_i = pixel 0 of sample i.
    A pass classifies sample i correctly (class 0) with probability Phi(-mu_i)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mu = x.flatten(1)[:, 0] * 4.0 - 2.0  # pixels in [0, 1] -> mu in [-2, 2]
        z = mu + torch.randn_like(mu)
        return torch.stack([torch.zeros_like(z), z], dim=1) + self.w


def test_expected_accuracy_of_a_gaussian_model_matches_the_normal_cdf():
    n, passes = 40, 400
    x = torch.zeros(n, 1, 1, 2)
    x[:, 0, 0, 0] = torch.linspace(0.1, 0.9, n)
    y = torch.zeros(n, dtype=torch.long)
    ctx = AttackContext(eps=0.1, eps_l2=1.0, num_classes=2, passes=passes)
    mu = x[:, 0, 0, 0] * 4.0 - 2.0
    by_hand = [0.5 * (1 + math.erf(-float(m) / math.sqrt(2))) for m in mu]  # Phi(-mu)
    got = clean_score(GaussianMargin(), x, y, ctx)
    # Each per-sample estimate has standard error <= sqrt(1/4 / 400) = 0.025; the mean over 40
    # samples <= 0.004. Five standard errors:
    assert abs(float(got.mean()) - sum(by_hand) / n) <= 0.02
    assert float((got - torch.tensor(by_hand)).abs().max()) <= 0.125


def test_every_sample_some_pass_gets_right_is_attacked():
    x, y = flicker_data(12)
    seen: list[int] = []

    class Spy:
        def __call__(self, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
            seen.extend(xb.flatten(1)[:, 0].mul(1000).round().long().tolist())
            return xb

    spec = dataclasses.replace(ATTACKS["pgd"], build=lambda m, s: [Stage("spy", Spy())])
    ctx = AttackContext(eps=0.1, eps_l2=1.0, num_classes=2, passes=4)
    out = run_attack(Flicker(), x, y, AttackConfig(name="pgd"), ctx, spec=spec)
    # One pass gets a quarter of the samples wrong; all of them count 3/4 and must be attacked.
    assert sorted(seen) == list(range(12))
    assert out.score is not None and out.accuracy == 0.75


class FirstPassWrong(nn.Module):
    """Class 0 while the pixel sum is positive, except on the first call, which says class 2: the
    one noisy pass torchattacks' APGD uses to choose whom to attack."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.flatten(1).sum(1)
        bias = 100.0 if self.calls == 0 else 0.0
        self.calls += 1
        return torch.stack([s, -s, torch.full_like(s, bias)], dim=1) + self.w


def test_every_apgd_attacks_samples_one_pass_got_wrong():
    x = torch.full((6, 1, 2, 2), 0.5)
    y = torch.zeros(6, dtype=torch.long)
    kw = dict(norm="Linf", eps=0.1, steps=5, n_restarts=1, seed=0, loss="ce")
    plain = torchattacks.APGD(FirstPassWrong(), **kw)(x, y)
    assert torch.equal(plain, x)  # one wrong pass: nothing attacked
    every = EveryAPGD(FirstPassWrong(), **kw)(x, y)
    assert float((every - x).abs().max()) == pytest.approx(0.1, abs=1e-6)  # attacked to the budget


def test_autoattack_rand_is_apgd_ce_and_dlr_with_eot_20_on_every_sample():
    ctx = AttackContext(eps=0.1, eps_l2=1.0, num_classes=10)
    stages, s = ATTACKS["autoattack_rand"].make(nn.Linear(4, 10), AttackConfig(name="autoattack_rand"), ctx)
    assert [st.name for st in stages] == ["apgd-ce", "apgd-dlr"] and s["version"] == "rand"
    assert all(isinstance(st.attack, EveryAPGD) and st.attack.eot_iter == 20 for st in stages)
    assert [st.attack.loss for st in stages] == ["ce", "dlr"]


def _square_p(p_init: float, it: int) -> float:
    """Andriushchenko et al.'s piecewise-constant schedule, from the paper's code: p_init halves
    after iterations 10, 50, 200, 500, 1000, 2000, 4000, 6000 and 8000."""
    halvings = sum(it > bound for bound in (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000))
    return p_init / 2**halvings


def test_square_follows_the_reference_schedule():
    model = nn.Linear(4, 10)
    ctx = AttackContext(eps=0.1, eps_l2=1.0, num_classes=10)
    # AutoAttack's Square: p_init 0.8 on the raw query count (the reference sets resc_schedule=False).
    stages, s = ATTACKS["autoattack"].make(model, AttackConfig(name="autoattack"), ctx)
    square = stages[-1].attack
    assert s["p_init"] == 0.8 and square.p_init == 0.8 and square.n_queries == 5000
    for it in (1, 10, 11, 50, 51, 200, 201, 999, 1001, 2500, 4999):
        assert square.p_selection(it) == pytest.approx(_square_p(0.8, it)), it
    # A standalone Square with 1000 queries walks the same schedule scaled to 10000 iterations.
    stages, s = ATTACKS["square"].make(model, AttackConfig(name="square", queries=1000), ctx)
    square = stages[0].attack
    for it in (1, 2, 5, 6, 20, 21, 100, 101, 999):
        assert square.p_selection(it) == pytest.approx(_square_p(0.8, int(it / 1000 * 10000))), it
    assert (
        "rescaled" in s["p_schedule"]
        and "rescaled" not in ATTACKS["autoattack"].settings(AttackConfig(name="autoattack"), ctx)["p_schedule"]
    )


class NoisyLinear(nn.Module):
    """A fixed linear classifier on 4 pixels plus fresh Gaussian noise on its logits."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)
        with torch.no_grad():
            self.lin.weight.copy_(torch.tensor([[4.0, 0, 0, 0], [0, 4.0, 0, 0], [0, 0, 4.0, 0]]))
            self.lin.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.lin(x.flatten(1))
        return out + 0.5 * torch.randn_like(out)


def test_checks_on_a_stochastic_model_use_eot_and_noise_slack():
    n = 24
    y = torch.arange(n) % 3
    x = torch.zeros(n, 1, 2, 2)
    x.view(n, 4)[torch.arange(n), y] = 0.8
    cfg = EvalConfig(
        eps=0.1, n_samples=n, check_samples=12, passes=4, eps_curve=[0.1],
        attacks=[{"name": "eot_pgd", "steps": 2, "eot_samples": 2}],
    )  # fmt: skip
    result = run(NoisyLinear(), x, y, cfg, num_classes=3)
    flags = {f["id"]: f for f in result.flags}
    assert result.stochastic and {"R1", "R5", "R6", "R7", "R8", "R12"} <= set(flags)
    assert flags["R5"]["values"]["attack"] == "eot_pgd" and flags["R7"]["values"]["pgd_attack"] == "eot_pgd"
    assert flags["R12"]["passed"]
    # Two 4-pass estimates on 12 samples differ by noise: three standard errors on top of 1 point.
    assert flags["R5"]["values"]["tol"] == pytest.approx(0.01 + 3 * (2 * 0.25 / (12 * 4)) ** 0.5)
