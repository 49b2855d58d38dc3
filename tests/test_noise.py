"""Activation noise after KAP (Bashivan et al.): train/eval behaviour and the evaluation switches."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from defenses.noise import ActivationNoise, noise_disabled, set_noise_at_eval


def test_train_mode_adds_noise_with_sigma():
    torch.manual_seed(0)
    noise = ActivationNoise(sigma=0.2).train()
    x = torch.zeros(200, 50)
    delta = noise(x) - x
    assert abs(delta.std().item() - 0.2) < 0.01
    assert abs(delta.mean().item()) < 0.01


def test_eval_mode_depends_on_at_eval():
    torch.manual_seed(0)
    x = torch.randn(4, 8)
    assert torch.equal(ActivationNoise(sigma=0.1).eval()(x), x)
    noisy = ActivationNoise(sigma=0.1, at_eval=True).eval()
    assert not torch.equal(noisy(x), x)
    assert not torch.equal(noisy(x), noisy(x))  # stochastic deployed model


def test_zero_sigma_is_identity():
    x = torch.randn(3, 4, 5, 5)
    assert ActivationNoise(sigma=0.0, at_eval=True).train()(x) is x


def test_gradient_passes_unchanged_and_dtype_kept():
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    y = ActivationNoise(sigma=0.3).train()(x)
    assert y.dtype == torch.float64
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.ones_like(x))


def _model() -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(4, 4), ActivationNoise(0.1), nn.Sequential(nn.ReLU(), ActivationNoise(0.2, at_eval=True))
    )


def test_set_noise_at_eval_sets_every_module():
    model = _model()
    assert set_noise_at_eval(model, True) == 2
    assert all(m.at_eval for m in model.modules() if isinstance(m, ActivationNoise))
    assert set_noise_at_eval(model, False) == 2
    assert not any(m.at_eval for m in model.modules() if isinstance(m, ActivationNoise))
    assert set_noise_at_eval(nn.Linear(2, 2), True) == 0


def test_noise_disabled_silences_and_restores():
    torch.manual_seed(0)
    model = _model().train()
    x = torch.randn(5, 4)
    with noise_disabled(model) as count:
        assert count == 2
        assert torch.equal(model(x), model(x))  # deterministic while disabled
    sigmas = [m.sigma for m in model.modules() if isinstance(m, ActivationNoise)]
    assert sigmas == [0.1, 0.2]
    assert not torch.equal(model(x), model(x))


def test_noise_disabled_restores_after_exception():
    model = _model()
    with pytest.raises(RuntimeError, match="boom"), noise_disabled(model):
        raise RuntimeError("boom")
    assert [m.sigma for m in model.modules() if isinstance(m, ActivationNoise)] == [0.1, 0.2]


@pytest.mark.parametrize("sigma", [-0.1, float("nan"), float("inf"), "0.1"])
def test_bad_sigma_raises(sigma):
    with pytest.raises(ValueError, match="sigma="):
        ActivationNoise(sigma=sigma)


def test_repr_shows_settings():
    assert "sigma=0.2, at_eval=True" in repr(ActivationNoise(0.2, at_eval=True))
