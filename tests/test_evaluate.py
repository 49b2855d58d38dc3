"""evaluate(): worst-case aggregation, eps curve, honest additions, KAP protocol, CAS."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from study import attacks as attacks_module
from study.attacks import ATTACKS, AttackContext, Stage
from study.config import EvalConfig
from study.evaluation.suite import eps_curve, evaluate, worst_case


def digits(seed: int = 0):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    return x[perm[:1300]], y[perm[:1300]], x[perm[1300:]], y[perm[1300:]]


def fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float = 1e-2,
        batch: int = 256) -> nn.Module:
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (batch,))
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def data():
    return digits()


@pytest.fixture(scope="module")
def mlp(data):
    xtr, ytr, _, _ = data
    torch.manual_seed(0)
    return fit(nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)), xtr, ytr, 200)


def quick_cfg(**kw) -> EvalConfig:
    base = dict(eps=0.2, n_samples=60, batch_size=64, check_samples=30, eps_curve=[0.05, 0.1, 0.2],
                attacks=[{"name": "fgsm"}, {"name": "pgd", "steps": 10}])
    base.update(kw)
    return EvalConfig(**base)


def run(model, x, y, cfg, **kw):
    args = dict(num_classes=10, defense="none", defense_params={}, recipe="standard", seed=0)
    args.update(kw)
    return evaluate(model, x, y, cfg, **args)


# --------------------------------------------------------------------------- worst case


def test_worst_case_is_per_sample_not_min_of_means():
    a = torch.tensor([True, True, False, False])
    b = torch.tensor([False, False, True, True])
    assert worst_case([a, b]).tolist() == [False] * 4
    min_of_means = min(float(a.float().mean()), float(b.float().mean()))
    assert min_of_means == 0.5 and float(worst_case([a, b]).float().mean()) == 0.0
    with pytest.raises(ValueError, match="at least one"):
        worst_case([])
    with pytest.raises(ValueError, match="must be"):
        worst_case([a, torch.tensor([True])])


class TwoDoors(nn.Module):
    """Class 1 iff pixel 0 or pixel 1 exceeds 0.55; every sample sits at 0.5 (class 0).

    Pixel 2 tags a sample's group, so a stub attack can break exactly one group.
    """

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(1)
        score = 50 * (torch.maximum(flat[:, 0], flat[:, 1]) - 0.55)
        return torch.stack([torch.zeros_like(score), score], dim=1) + self.w


class OpenDoor:
    def __init__(self, model: nn.Module, pixel: int, group: float) -> None:
        self.model, self.pixel, self.group = model, pixel, group

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        adv = x.clone().flatten(1)
        mine = adv[:, 2] == self.group
        adv[mine, self.pixel] += 0.1
        return adv.view_as(x)


def test_evaluate_aggregates_the_worst_case_per_sample(monkeypatch):
    door_a = dataclasses.replace(ATTACKS["fgsm"], build=lambda m, s: [Stage("a", OpenDoor(m, 0, 0.0))])
    door_b = dataclasses.replace(ATTACKS["pgd"], build=lambda m, s: [Stage("b", OpenDoor(m, 1, 1.0))])
    monkeypatch.setitem(attacks_module.ATTACKS, "fgsm", door_a)
    monkeypatch.setitem(attacks_module.ATTACKS, "pgd", door_b)
    x = torch.full((10, 1, 1, 3), 0.5)
    x[:, 0, 0, 2] = torch.tensor([0.0, 1.0] * 5)
    y = torch.zeros(10, dtype=torch.long)
    cfg = EvalConfig(eps=0.2, attacks=[{"name": "fgsm"}, {"name": "pgd"}], eps_curve=[], checks=False)
    result = run(TwoDoors(), x, y, cfg, num_classes=2)
    assert result.clean_accuracy == 1.0
    assert [a["accuracy"] for a in result.attacks] == [0.5, 0.5]
    assert result.robust_accuracy == 0.0  # the minimum of the means would say 0.5


# --------------------------------------------------------------------------- the undefended baseline


def test_evaluate_standard_model(data, mlp):
    _, _, xte, yte = data
    x, y = xte[:60], yte[:60]
    result = run(mlp, x, y, quick_cfg())
    assert result.clean_accuracy >= 0.9
    assert result.robust_accuracy <= min(a["accuracy"] for a in result.attacks) <= result.clean_accuracy
    assert result.eps_curve[0] == (0.0, result.clean_accuracy)
    assert [e for e, _ in result.eps_curve] == [0.0, 0.05, 0.1, 0.2]
    ids = {f["id"] for f in result.flags}
    assert {"R1", "R2", "R4", "R8", "R11", "R12", "R15", "R17", "R18"} <= ids
    r17 = next(f for f in result.flags if f["id"] == "R17")
    assert r17["passed"] and not r17["gate"] and r17["values"]["pgd_accuracy"] <= 0.1
    assert result.trusted, [f for f in result.flags if not f["passed"]]
    assert not result.stochastic and result.protocol == {}
    for record in result.attacks:
        assert record["settings"]["eps"] == 0.2 and record["added"] is None
    json.dumps(result.to_dict())


def test_train_mode_restored_and_same_numbers(data, mlp):
    _, _, xte, yte = data
    x, y = xte[:40], yte[:40]
    cfg = quick_cfg(checks=False, eps_curve=[0.1])
    mlp.train()
    first = run(mlp, x, y, cfg)
    assert mlp.training
    mlp.eval()
    second = run(mlp, x, y, cfg)
    assert first.robust_accuracy == second.robust_accuracy and first.eps_curve == second.eps_curve
    assert not first.trusted and any("checks disabled" in n for n in first.notes)


def test_bad_inputs(mlp):
    with pytest.raises(ValueError, match="same, non-zero"):
        run(mlp, torch.rand(4, 1, 8, 8), torch.zeros(3, dtype=torch.long), quick_cfg())
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        run(mlp, torch.rand(4, 1, 8, 8) * 3, torch.zeros(4, dtype=torch.long), quick_cfg())


def test_eps_curve_same_seed_starts_at_clean(data, mlp):
    _, _, xte, yte = data
    ctx = AttackContext(eps=0.2, eps_l2=1.0, num_classes=10, seed=0, batch_size=64)
    curve, outcomes = eps_curve(mlp, xte[:50], yte[:50], [0.3, 0.1, 0.1, 0.0], ctx, steps=5)
    assert [e for e, _ in curve] == [0.0, 0.1, 0.3]
    assert curve[1][1] >= curve[2][1]
    assert all(o.settings["steps"] == 5 and o.settings["seed"] == 0 for o in outcomes)


def test_eps_curve_reuses_the_suites_pgd_and_gets_the_same_numbers(data, mlp, monkeypatch):
    from study.attacks import run_attack
    from study.config import AttackConfig

    _, _, xte, yte = data
    x, y = xte[:50], yte[:50]
    ctx = AttackContext(eps=0.2, eps_l2=1.0, num_classes=10, seed=0, batch_size=64)
    suite_pgd = run_attack(mlp, x, y, AttackConfig(name="pgd", steps=5), ctx)  # eps from ctx: 0.2
    fresh, fresh_outcomes = eps_curve(mlp, x, y, [0.1, 0.2], ctx, steps=5)
    calls = []
    real = attacks_module.run_attack
    monkeypatch.setattr("study.evaluation.suite.run_attack", lambda *a, **k: calls.append(a[3].eps) or real(*a, **k))
    reused, reused_outcomes = eps_curve(mlp, x, y, [0.1, 0.2], ctx, steps=5, done=[suite_pgd])
    assert calls == [0.0, 0.1]  # the 0.2 point is the suite's PGD: not run again
    assert reused == fresh  # and rerunning it would have given the same numbers
    assert reused[2] == (0.2, suite_pgd.accuracy)
    assert len(fresh_outcomes) == 3 and len(reused_outcomes) == 2  # R18 counts each attack once
    # Different settings (steps) are not the same attack: run.
    calls.clear()
    eps_curve(mlp, x, y, [0.2], ctx, steps=7, done=[suite_pgd])
    assert calls == [0.0, 0.2]


# --------------------------------------------------------------------------- stochastic models


class NoisyLogits(nn.Module):
    """A trained model plus fresh Gaussian noise on the logits at every call (not a KAP layer)."""

    def __init__(self, inner: nn.Module, sigma: float) -> None:
        super().__init__()
        self.inner, self.sigma = inner, sigma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.inner(x)
        return out + self.sigma * torch.randn_like(out)


def test_stochastic_model_gets_eot_and_expected_scoring(data, mlp):
    _, _, xte, yte = data
    model = NoisyLogits(mlp, sigma=1.0)
    # checks=False still records the cheap flags R12 and R18
    cfg = quick_cfg(attacks=[{"name": "pgd", "steps": 5}], eps_curve=[0.1], checks=False)
    result = run(model, xte[:30], yte[:30], cfg)
    assert result.stochastic
    names = [a["name"] for a in result.attacks]
    assert names == ["pgd", "eot_pgd"]
    added = result.attacks[1]
    assert added["added"] and "R12" in added["added"] and added["settings"]["eot_samples"] == 20
    assert added["settings"]["steps"] == 5  # inherits the suite's PGD budget
    # scored as deployed: one pass per prediction, expected accuracy over 10 passes
    assert all(a["settings"]["votes"] == 1 and a["settings"]["passes"] == 10 for a in result.attacks)
    assert "expected accuracy over 10 passes" in result.attacks[0]["settings"]["scoring"]
    assert "single-pass" in result.protocol["scoring"] and result.protocol["passes"] == 10
    r12 = next(f for f in result.flags if f["id"] == "R12")
    assert r12["passed"] and r12["values"]["stochastic"] and r12["values"]["eot_attacks"] == ["eot_pgd"]
    assert any("eot_pgd" in n for n in result.notes)


def test_stochastic_next_to_autoattack_gets_autoattack_rand(data, mlp):
    _, _, xte, yte = data
    cfg = quick_cfg(attacks=[{"name": "autoattack", "steps": 2, "queries": 20}], eps_curve=[], checks=False)
    result = run(NoisyLogits(mlp, 1.0), xte[:20], yte[:20], cfg)
    assert [a["name"] for a in result.attacks] == ["autoattack", "autoattack_rand"]


# --------------------------------------------------------------------------- KAP protocol and CAS


def small_cnn(defense: str | None, params: dict):
    from defenses import build_model

    torch.manual_seed(0)
    # A quarter of the channels (8-16-32) keeps training and attacking to a fraction of a second.
    return build_model("small_cnn", num_classes=10, in_channels=1, defense=defense, defense_params=params,
                       width=0.25)


@pytest.mark.parametrize("noise_at_eval", [False, True])
def test_kap_protocol_reports_both_numbers(data, noise_at_eval):
    from defenses.noise import ActivationNoise

    xtr, ytr, xte, yte = data
    params = {"kernel_size": 2, "sigma": 0.1, "noise_at_eval": noise_at_eval}
    model = fit(small_cnn("kap", params), xtr, ytr, steps=15, batch=128)
    noise = [m for m in model.modules() if isinstance(m, ActivationNoise)]
    before = [(m.sigma, m.at_eval) for m in noise]
    assert noise and all(s == 0.1 for s, _ in before)
    cfg = quick_cfg(attacks=[{"name": "pgd", "steps": 2}, {"name": "eot_pgd", "steps": 2, "eot_samples": 2}],
                    eps_curve=[], checks=False, eps=0.1)
    result = run(model, xte[:20], yte[:20], cfg, defense="kap", defense_params=params)
    p = result.protocol
    deployed = "noise_eot" if noise_at_eval else "no_noise"
    assert p["deployed"] == deployed
    for key in ("no_noise", "noise_eot", "no_noise_clean", "noise_eot_clean"):
        assert 0.0 <= p[key] <= 1.0
    assert result.robust_accuracy == p[deployed]
    assert result.clean_accuracy == p[f"{deployed}_clean"]
    assert "eot_pgd" in p["noise_eot_attacks"]
    if noise_at_eval:  # the side arm drops EOT attacks: on a deterministic model they are plain PGD
        assert p["no_noise_attacks"] == ["pgd"] and p["noise_eot_attacks"] == ["pgd", "eot_pgd"]
    else:  # the side arm runs only the EOT attack on the noisy model
        assert p["no_noise_attacks"] == ["pgd", "eot_pgd"] and p["noise_eot_attacks"] == ["eot_pgd"]
        assert p["other_attacks"][0]["settings"]["passes"] == 10
    assert result.stochastic == noise_at_eval
    assert [(m.sigma, m.at_eval) for m in noise] == before  # the model's noise settings restored
    json.dumps(result.to_dict())


@pytest.mark.parametrize("noise_at_eval", [False, True])
def test_kap_protocol_deployed_only_skips_the_other_arm(data, noise_at_eval, monkeypatch):
    import study.evaluation.suite as suite

    xtr, ytr, xte, yte = data
    params = {"kernel_size": 2, "sigma": 0.1, "noise_at_eval": noise_at_eval}
    model = fit(small_cnn("kap", params), xtr, ytr, steps=15, batch=128)
    cfg = quick_cfg(attacks=[{"name": "pgd", "steps": 2}], eps_curve=[], checks=False, eps=0.1,
                    protocol_arms="deployed")
    called: list[str] = []
    monkeypatch.setattr(suite, "_evaluate_other", lambda *a, **k: called.append("other"))
    result = run(model, xte[:20], yte[:20], cfg, defense="kap", defense_params=params)
    deployed, other = ("noise_eot", "no_noise") if noise_at_eval else ("no_noise", "noise_eot")
    assert called == []  # the other configuration is never attacked
    p = result.protocol
    assert p["deployed"] == deployed and result.robust_accuracy == p[deployed]
    assert other not in p and f"{other}_clean" not in p and "other_attacks" not in p
    assert any(f"{other} not attacked (eval.protocol_arms: deployed)" in n for n in result.notes)
    assert result.stochastic == noise_at_eval  # the deployed arm is still scored as deployed
    json.dumps(result.to_dict())


def test_cas_model_gets_the_adaptive_attack(data):
    xtr, ytr, xte, yte = data
    params = {"beta": 2.0, "placement": "last"}
    model = fit(small_cnn("cas", params), xtr, ytr, steps=15, batch=128)
    cfg = quick_cfg(attacks=[{"name": "pgd", "steps": 3}], eps_curve=[], checks=False, eps=0.1)
    result = run(model, xte[:20], yte[:20], cfg, defense="cas", defense_params=params)
    names = [a["name"] for a in result.attacks]
    assert names == ["pgd", "cas_adaptive"]
    record = result.attacks[1]
    assert record["added"] and record["settings"]["beta"] == 2.0
    assert record["accuracy"] <= result.clean_accuracy
    assert any("cas_adaptive" in n for n in result.notes)


def test_cas_adaptive_loss_is_ce_plus_beta_aux(data):
    from defenses.cas import cas_aux_logits
    from study.attacks import CASAdaptivePGD

    _, _, xte, yte = data
    model = small_cnn("cas", {"placement": "last2"}).eval()
    x, y = xte[:8], yte[:8]
    attack = CASAdaptivePGD(model, eps=0.1, alpha=0.025, steps=1, beta=3.0)
    with torch.no_grad():
        logits = model(x)
        aux = cas_aux_logits(model)
        loss = attack._joint_loss(logits, y)
    assert len(aux) == 2
    expected = F.cross_entropy(logits, y, reduction="none") + 3.0 * torch.stack(
        [F.cross_entropy(a, y, reduction="none") for a in aux]).mean(dim=0)
    assert torch.allclose(loss, expected)
