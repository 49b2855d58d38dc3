"""The attack table and run_attack: every attack on a tiny trained model, settings, invariants."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from study import config as config_module
from study.attacks import (
    ATTACKS,
    AttackContext,
    BoxDeepFool,
    Stage,
    attack_mode,
    cw_margin_loss,
    enforce_threat_model,
    predict,
    run_attack,
)
from study.config import AttackConfig

EPS = 0.2

# Small overrides so every attack runs in well under a second on 2 CPU cores.
FAST = {
    "fgsm": {},
    "pgd": {"steps": 10},
    "pgd_l2": {"steps": 10},
    "cw_linf": {"steps": 10},
    "deepfool": {"steps": 20},
    "square": {"queries": 200},
    "autoattack": {"steps": 5, "queries": 100},
    "autoattack_rand": {"steps": 5, "eot_samples": 2},
    "eot_pgd": {"steps": 5, "eot_samples": 2},
    "cas_adaptive": {"steps": 5},
}


def digits_tensors(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scikit-learn's bundled digits in [0, 1], (N, 1, 8, 8); a seeded 1300/497 split."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    tr, te = perm[:1300], perm[1300:]
    return x[tr], y[tr], x[te], y[te]


def train_mlp(x: torch.Tensor, y: torch.Tensor, steps: int = 150, seed: int = 0) -> nn.Module:
    """A 64-64-10 MLP trained full batch with Adam (~0.3 s, ~95% test accuracy)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def trained():
    xtr, ytr, xte, yte = digits_tensors()
    model = train_mlp(xtr, ytr)
    return model, xte[:64], yte[:64]


@pytest.fixture()
def ctx() -> AttackContext:
    return AttackContext(eps=EPS, eps_l2=1.0, num_classes=10, seed=0, batch_size=32)


def test_table_covers_config_names():
    assert set(ATTACKS) == set(config_module.ATTACKS)
    for name, spec in ATTACKS.items():
        assert spec.name == name
        assert spec.norm in ("Linf", "L2")


@pytest.mark.parametrize("name", [n for n in ATTACKS if n != "cas_adaptive"])
def test_each_attack_on_trained_model(trained, ctx, name):
    model, x, y = trained
    clean = float((predict(model, x) == y).float().mean())
    assert clean > 0.85
    outcome = run_attack(model, x, y, AttackConfig(name=name, **FAST[name]), ctx)
    # Every attack hurts a small undefended MLP at eps 0.2 (L2 1.0) substantially.
    assert outcome.accuracy <= clean - 0.3, (name, clean, outcome.accuracy)
    assert outcome.invariant_violations == 0
    assert outcome.correct.dtype == torch.bool and outcome.correct.shape == (x.shape[0],)
    delta = (outcome.x_adv - x).flatten(1)
    if ATTACKS[name].norm == "Linf":
        assert float(delta.abs().max()) <= EPS + 1e-6
    else:
        assert float(delta.norm(dim=1).max()) <= 1.0 + 1e-4
    assert float(outcome.x_adv.min()) >= 0.0 and float(outcome.x_adv.max()) <= 1.0
    s = outcome.settings
    for key in ("name", "norm", "eps", "steps", "step_size", "restarts", "queries", "eot_samples", "seed"):
        assert key in s
    assert s["name"] == name and s["norm"] == ATTACKS[name].norm
    assert s["eps"] == (1.0 if ATTACKS[name].norm == "L2" else EPS)
    # The evaluated point is what the record claims: re-scoring x_adv gives the same mask.
    assert torch.equal(predict(model, outcome.x_adv) == y, outcome.correct)


def test_default_autoattack_is_the_standard_protocol(trained):
    model, _, _ = trained
    for classes in (10, 100):
        ctx = AttackContext(eps=EPS, eps_l2=1.0, num_classes=classes)
        stages, s = ATTACKS["autoattack"].make(model, AttackConfig(name="autoattack"), ctx)
        assert s["steps"] == 100 and s["n_target_classes"] == 9 and s["queries"] == 5000
        assert s["components"] == ["apgd-ce", "apgd-t", "fab-t", "square"]
        by_name = {st.name: st.attack for st in stages}
        assert by_name["apgd-ce"].steps == 100 and by_name["apgd-ce"].loss == "ce"
        assert by_name["apgd-t"].steps == 100 and by_name["apgd-t"].n_target_classes == 9
        assert by_name["fab-t"].steps == 100 and by_name["fab-t"].n_target_classes == 9
        assert by_name["fab-t"].multi_targeted
        assert by_name["square"].n_queries == 5000 and by_name["square"].p_init == 0.8
        assert [st.white_box for st in stages] == [True, True, True, False]
    ctx = AttackContext(eps=EPS, eps_l2=1.0, num_classes=5)
    _, s = ATTACKS["autoattack"].make(model, AttackConfig(name="autoattack"), ctx)
    assert s["n_target_classes"] == 4
    with pytest.raises(ValueError, match="num_classes >= 4"):
        ATTACKS["autoattack"].settings(AttackConfig(name="autoattack"), AttackContext(eps=EPS, eps_l2=1, num_classes=3))


def test_default_autoattack_rand_and_eot(trained):
    model, _, _ = trained
    ctx = AttackContext(eps=EPS, eps_l2=1.0, num_classes=10)
    stages, s = ATTACKS["autoattack_rand"].make(model, AttackConfig(name="autoattack_rand"), ctx)
    assert s["steps"] == 100 and s["eot_samples"] == 20
    got = [(st.attack.loss, st.attack.eot_iter, st.attack.steps) for st in stages]
    assert got == [("ce", 20, 100), ("dlr", 20, 100)]
    stages, s = ATTACKS["eot_pgd"].make(model, AttackConfig(name="eot_pgd"), ctx)
    assert stages[0].attack.eot_samples == 20 and s["eot_samples"] == 20
    assert ATTACKS["eot_pgd"].eot and ATTACKS["autoattack_rand"].eot and not ATTACKS["pgd"].eot


def test_pgd_family_defaults(trained):
    model, _, _ = trained
    ctx = AttackContext(eps=0.1, eps_l2=0.7, num_classes=10, seed=3)
    stages, s = ATTACKS["pgd"].make(model, AttackConfig(name="pgd"), ctx)
    atk = stages[0].attack
    assert (s["steps"], s["step_size"], s["random_start"]) == (20, 0.1 / 4, True)
    assert (atk.eps, atk.alpha, atk.steps, atk.random_start) == (0.1, 0.1 / 4, 20, True)
    _, s = ATTACKS["pgd_l2"].make(model, AttackConfig(name="pgd_l2"), ctx)
    assert s["eps"] == 0.7 and s["norm"] == "L2"
    _, s = ATTACKS["pgd_l2"].make(model, AttackConfig(name="pgd_l2", eps=2.0, step_size=0.3, steps=7), ctx)
    assert (s["eps"], s["step_size"], s["steps"]) == (2.0, 0.3, 7)
    _, s = ATTACKS["square"].make(model, AttackConfig(name="square"), ctx)
    assert (s["queries"], s["p_init"], s["eps"], s["seed"]) == (5000, 0.8, 0.1, 3)
    _, s = ATTACKS["cw_linf"].make(model, AttackConfig(name="cw_linf"), ctx)
    assert s["loss"] == "cw_margin" and s["kappa"] == 50.0
    _, s = ATTACKS["deepfool"].make(model, AttackConfig(name="deepfool"), ctx)
    assert (s["steps"], s["overshoot"], s["eps"], s["bounded"]) == (50, 0.02, 0.7, False)
    _, s = ATTACKS["cas_adaptive"].make(model, AttackConfig(name="cas_adaptive"), ctx)
    assert s["beta"] == 2.0
    ctx_beta = dataclasses.replace(ctx, defense_params={"beta": 5.0})
    assert ATTACKS["cas_adaptive"].settings(AttackConfig(name="cas_adaptive"), ctx_beta)["beta"] == 5.0


def test_restarts_take_the_per_sample_best(trained):
    model, x, y = trained
    ctx = AttackContext(eps=0.05, eps_l2=1.0, num_classes=10, seed=1, batch_size=64)
    one = run_attack(model, x, y, AttackConfig(name="pgd", steps=3, restarts=1), ctx)
    three = run_attack(model, x, y, AttackConfig(name="pgd", steps=3, restarts=3), ctx)
    assert three.settings["restarts"] == 3
    # The first restart is the same seeded run, later ones only attack what it missed.
    assert not bool((three.correct & ~one.correct).any())
    assert three.accuracy <= one.accuracy


def test_seeded_and_leaves_rng_alone(trained, ctx):
    model, x, y = trained
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = run_attack(model, x, y, AttackConfig(name="pgd", steps=3), ctx)
    after = torch.rand(3)
    assert torch.equal(after, expected)
    b = run_attack(model, x, y, AttackConfig(name="pgd", steps=3), ctx)
    assert torch.equal(a.correct, b.correct) and torch.equal(a.x_adv, b.x_adv)
    other = run_attack(model, x, y, AttackConfig(name="pgd", steps=3), dataclasses.replace(ctx, seed=7))
    assert not torch.equal(a.x_adv, other.x_adv)


def test_batches_cover_all_samples(trained):
    model, x, y = trained
    small = AttackContext(eps=EPS, eps_l2=1.0, num_classes=10, batch_size=5)
    outcome = run_attack(model, x[:23], y[:23], AttackConfig(name="fgsm"), small)
    assert outcome.correct.shape == (23,) and outcome.x_adv.shape == x[:23].shape


class ModeRecorder(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.modes: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.modes.append(self.training)
        return self.inner(x)


def test_eval_mode_during_attack_and_restored(trained, ctx):
    model, x, y = trained
    wrapped = ModeRecorder(model).train()
    wrapped.zero_grad(set_to_none=True)
    run_attack(wrapped, x[:8], y[:8], AttackConfig(name="pgd", steps=2), ctx)
    run_attack(wrapped, x[:8], y[:8], AttackConfig(name="deepfool", steps=2), ctx)  # calls backward()
    assert wrapped.modes and not any(wrapped.modes)
    assert wrapped.training
    assert all(p.requires_grad for p in wrapped.parameters())
    assert all(p.grad is None for p in wrapped.parameters())  # attacks leave no weight gradients
    wrapped.eval()


def test_misclassified_clean_is_never_robust(trained, ctx):
    model, x, y = trained
    wrong = (predict(model, x) + 1) % 10  # labels the model gets wrong on every sample
    outcome = run_attack(model, x, wrong, AttackConfig(name="fgsm"), ctx)
    assert not bool(outcome.correct.any())




class BallBreaker:
    """An attack stub that ignores the budget and the box."""

    def __init__(self, model: nn.Module, eps: float) -> None:
        self.model, self.eps = model, eps

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return x + 3 * self.eps * torch.ones_like(x)


def test_invariant_violations_are_counted_and_projected(trained, ctx):
    model, x, y = trained
    spec = dataclasses.replace(ATTACKS["pgd"], build=lambda m, s: [Stage("stub", BallBreaker(m, s["eps"]))])
    outcome = run_attack(model, x, y, AttackConfig(name="pgd"), ctx, spec=spec)
    attacked = int((predict(model, x) == y).sum())
    assert outcome.invariant_violations == attacked > 0
    assert float((outcome.x_adv - x).abs().max()) <= EPS + 1e-6
    assert float(outcome.x_adv.max()) <= 1.0


def test_enforce_threat_model_linf_and_l2():
    x = torch.full((3, 1, 2, 2), 0.5)
    adv = x.clone()
    adv[0] += 0.05  # inside
    adv[1, 0, 0, 0] = 0.9  # outside the L-inf ball
    adv[2, 0, 0, 0] = float("nan")
    bad, proj = enforce_threat_model(adv, x, "Linf", 0.1)
    assert bad.tolist() == [False, True, True]
    assert float((proj - x).abs().max()) <= 0.1 + 1e-7 and torch.isfinite(proj).all()
    adv = x + torch.tensor([0.1, 0.3, 0.0]).view(3, 1, 1, 1)  # L2 norms 0.2, 0.6, 0
    bad, proj = enforce_threat_model(adv, x, "L2", 0.5)
    assert bad.tolist() == [False, True, False]
    assert float((proj - x).flatten(1).norm(dim=1).max()) <= 0.5 + 1e-6
    bad, _ = enforce_threat_model(adv, x, "L2", 0.5, bounded=False)
    assert not bool(bad.any())
    bad, _ = enforce_threat_model(x + 0.6, x, "Linf", 1.0)  # outside [0, 1]
    assert bool(bad.all())


def test_cw_margin_loss_formula():
    logits = torch.tensor([[1.0, 3.0, 2.0], [5.0, 1.0, -100.0]])
    y = torch.tensor([0, 0])
    # max_{j != y} z_j - z_y, capped at kappa
    assert torch.allclose(cw_margin_loss(logits, y, kappa=50.0), torch.tensor([2.0, -4.0]))
    assert torch.allclose(cw_margin_loss(logits, y, kappa=1.0), torch.tensor([1.0, -4.0]))


def test_deepfool_matches_the_linear_closed_form():
    # For an affine classifier DeepFool's step is exact (Moosavi-Dezfooli et al., eq. 8):
    # r = |f_l - f_y| / ||w_l - w_y||^2 (w_l - w_y) for the closest boundary l.
    torch.manual_seed(0)
    lin = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    x = 0.4 + 0.2 * torch.rand(6, 1, 2, 2)
    with torch.no_grad():
        z = lin(x)
    y = z.argmax(dim=1)
    w = lin[1].weight.detach()
    expected = []
    for i in range(6):
        d = [abs(float(z[i, k] - z[i, y[i]])) / float((w[k] - w[y[i]]).norm()) for k in range(3) if k != y[i]]
        expected.append(min(d))
    with attack_mode(lin):
        adv = BoxDeepFool(lin, steps=5, overshoot=0.02)(x, y)
    norms = (adv - x).flatten(1).norm(dim=1)
    # one step of (1 + overshoot) * (dist + 1e-4); the point is far from the box bounds
    assert torch.allclose(norms, 1.02 * (torch.tensor(expected) + 1e-4), rtol=1e-4, atol=1e-5)
    assert bool((lin(adv).argmax(dim=1) != y).all())


def test_stochastic_prediction_uses_mean_softmax():
    class Noisy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.zeros(()))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            base = torch.tensor([2.0, 0.0], device=x.device).expand(x.shape[0], 2)
            return base + 3.0 * torch.randn(x.shape[0], 2) + self.w

    torch.manual_seed(0)
    x = torch.zeros(400, 1, 2, 2)
    single = (predict(Noisy(), x, votes=1) == 0).float().mean()
    voted = (predict(Noisy(), x, votes=25) == 0).float().mean()
    assert voted > single and voted > 0.9


def test_bad_inputs_raise(trained, ctx):
    model, x, y = trained
    with pytest.raises(ValueError, match="not in the table"):
        run_attack(model, x, y, AttackConfig.model_construct(name="nope"), ctx)
    with pytest.raises(ValueError, match="same number of samples"):
        run_attack(model, x, y[:3], AttackConfig(name="fgsm"), ctx)
    with pytest.raises(ValueError, match="eps=0"):
        AttackContext(eps=0, eps_l2=1.0, num_classes=10)
    with pytest.raises(ValueError, match="votes=0"):
        AttackContext(eps=0.1, eps_l2=1.0, num_classes=10, votes=0)


def test_outcome_record_is_plain_data(trained, ctx):
    import json

    model, x, y = trained
    outcome = run_attack(model, x[:16], y[:16], AttackConfig(name="autoattack", steps=2, queries=20), ctx)
    record = outcome.as_dict()
    json.dumps(record)
    assert record["name"] == "autoattack" and set(record["stages"]) == {"apgd-ce", "apgd-t", "fab-t", "square"}
    # stages are cumulative (worst case so far), so they never increase
    values = list(record["stages"].values())
    assert values == sorted(values, reverse=True) and values[-1] == record["accuracy"]


def test_batched_eot_equals_plain_pgd_on_a_deterministic_model_and_samples_per_copy(trained):
    import torch.nn.functional as F

    from defenses import ActivationNoise
    from study.attacks import LossPGD

    model, x, y = trained
    model.eval()
    xb, yb = x[:12], y[:12]

    def ce(z, t):
        return F.cross_entropy(z, t, reduction="none")

    # Deterministic model: the EOT sum is eot_samples x one gradient, so the signs and the
    # attack are those of plain PGD from the same random start, however the copies are chunked.
    torch.manual_seed(7)
    plain = LossPGD(model, ce, 0.2, 0.05, 5)(xb, yb)
    for max_batch in (12, 24, 1024):  # 1, 2 and all 5 copies per pass (5 = 2 + 2 + 1 with 24)
        torch.manual_seed(7)
        eot = LossPGD(model, ce, 0.2, 0.05, 5, eot_samples=5, max_batch=max_batch)(xb, yb)
        torch.testing.assert_close(eot, plain)

    # A stochastic model: every copy in a pass draws its own noise.
    noisy = torch.nn.Sequential(ActivationNoise(sigma=0.5, at_eval=True), torch.nn.Flatten(), torch.nn.Linear(64, 10))
    noisy.eval()
    seen = []
    noisy[2].register_forward_hook(lambda m, i, o: seen.append(i[0].detach()))
    atk = LossPGD(noisy, ce, 0.2, 0.05, 1, eot_samples=3, max_batch=1024)
    atk._gradient(xb.clone().requires_grad_(True), yb)
    (batch,) = seen
    assert batch.shape[0] == 36
    copies = batch.view(3, 12, -1)
    assert not torch.allclose(copies[0], copies[1]) and not torch.allclose(copies[1], copies[2])
