"""Additive Gaussian activation noise, as placed after every KAP layer.

Reference:
    P. Bashivan, A. Ibrahim, A. Dehghani, Y. Ren, "Learning robust kernel ensembles with kernel
    average pooling": Gaussian noise N(0, sigma^2), sigma in {0, 0.1, 0.2}, after each KAP.

The authors' code keeps the noise on at evaluation, which makes the deployed model stochastic; the
paper's main tables attack the model with the noise switched off and its appendix attacks the noisy
model with EOT. ``at_eval`` selects the deployed behaviour; :func:`noise_disabled` and
:func:`set_noise_at_eval` let the evaluation switch it for a whole model without rebuilding it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from defenses._placement import pick
from defenses._registry import Example, register_defense
from defenses.backbones import LayerSet

__all__ = ["ActivationNoise", "noise_disabled", "set_noise_at_eval"]


def _check_sigma(sigma: object) -> float:
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not math.isfinite(sigma) or sigma < 0:
        raise ValueError(f"sigma={sigma!r} must be a finite number >= 0")
    return float(sigma)


class ActivationNoise(nn.Module):
    """Adds N(0, sigma^2) noise to the activations (Bashivan et al., KAP paper).

    Noise is added in training mode, and in eval mode only when ``at_eval`` is True (the authors'
    code: a stochastic deployed model, to be attacked with EOT). sigma == 0 is the identity.
    ``sigma`` and ``at_eval`` are plain attributes, changed in place by :func:`noise_disabled` and
    :func:`set_noise_at_eval`.

    Args:
        sigma: standard deviation of the noise, >= 0 (paper: 0, 0.1, 0.2).
        at_eval: also add noise in eval mode.

    Shape:
        Input: any shape. Output: same shape, dtype and device.

    Examples::

        >>> noise = ActivationNoise(sigma=0.1, at_eval=True)
        >>> y = noise(torch.randn(8, 64, 32, 32))
    """

    def __init__(self, sigma: float = 0.1, at_eval: bool = False) -> None:
        super().__init__()
        self.sigma = _check_sigma(sigma)
        self.at_eval = bool(at_eval)

    @property
    def active(self) -> bool:
        """Whether the next forward call adds noise (depends on mode, sigma and at_eval)."""
        return self.sigma > 0 and (self.training or self.at_eval)

    def forward(self, x: Tensor) -> Tensor:
        if not self.active:
            return x
        # Draw N(0, sigma^2) directly and add x into it in place: on a memory-bound CPU every
        # full pass over the activations counts (x + sigma * randn_like(x) makes three).
        return torch.empty_like(x, memory_format=torch.contiguous_format).normal_(0.0, self.sigma).add_(x)

    def extra_repr(self) -> str:
        return f"sigma={self.sigma}, at_eval={self.at_eval}"


def _noise_modules(model: nn.Module) -> list[ActivationNoise]:
    return [m for m in model.modules() if isinstance(m, ActivationNoise)]


def set_noise_at_eval(model: nn.Module, enabled: bool) -> int:
    """Set ``at_eval`` on every :class:`ActivationNoise` in ``model``.

    Args:
        model: any module (the module itself counts if it is an ActivationNoise).
        enabled: True for a stochastic deployed model (authors' code), False for the
            deterministic model the paper's main tables attack.

    Returns:
        How many ActivationNoise modules were set (0: the model has no activation noise).
    """
    modules = _noise_modules(model)
    for module in modules:
        module.at_eval = bool(enabled)
    return len(modules)


@contextmanager
def noise_disabled(model: nn.Module) -> Iterator[int]:
    """Temporarily set sigma = 0 on every :class:`ActivationNoise` in ``model``.

    Works in training and eval mode alike (e.g. attacking the noise-free model, paper main
    tables); the previous sigmas are restored on exit, also after an exception.

    Yields:
        How many ActivationNoise modules were silenced.
    """
    modules = _noise_modules(model)
    saved = [m.sigma for m in modules]
    for module in modules:
        module.sigma = 0.0
    try:
        yield len(modules)
    finally:
        for module, sigma in zip(modules, saved, strict=True):
            module.sigma = sigma


# --------------------------------------------------------------------------- registration


def _place_noise(params: Mapping[str, Any], num_classes: int) -> LayerSet:
    """The Gaussian-noise baseline at KAP's sites, without KAP."""
    kwargs = pick(params, ("sigma", "at_eval"))
    ActivationNoise(**kwargs)
    return LayerSet(post_conv=lambda channels: ActivationNoise(**kwargs))


register_defense(
    "noise", ActivationNoise, place=_place_noise, params=("sigma", "at_eval"),
    color="#e377c2",
    # A control for KAP (how much of its robustness is the noise alone), not a published defense:
    # searched only when a spec names it.
    in_default_study=False,
    example=Example(lambda: ActivationNoise(sigma=0.1), (2, 8, 3, 3), (2, 8, 3, 3),
                    stochastic_train=True, mode_dependent=True),
)
