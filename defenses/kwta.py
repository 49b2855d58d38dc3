"""k-Winners-Take-All activation and its sparsity annealing schedule.

Reference:
    C. Xiao, P. Zhong, C. Zheng, "Enhancing adversarial defense by k-winners-take-all", ICLR 2020;
    seed reproduction "Reproducing ... k-WTA". phi_k(y)_j = y_j if y_j is among the k largest
    entries of y, else 0, with k = floor(gamma * N).

Caution: k-WTA's robustness under standard PGD is largely gradient masking (Tramer et al., "On
adaptive attacks to adversarial example defenses", 2020); evaluate it with adaptive attacks.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from defenses._placement import pick
from defenses._registry import Example, register_defense
from defenses.backbones import LayerSet

log = logging.getLogger(__name__)

__all__ = ["KWTAAnnealing", "KWTA_MODES", "KWinnersTakeAll", "annealed_gamma", "kwta_k", "set_gamma"]

KWTA_MODES: tuple[str, ...] = ("volume", "channel")

# floor(gamma * n) in floating point can land just below an integer (0.29 * 100 = 28.999...);
# this slack makes k the mathematically intended value without affecting any non-integer product.
_FLOOR_SLACK = 1e-9


def _check_gamma(gamma: object) -> float:
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not (0.0 < gamma <= 1.0):
        raise ValueError(f"gamma={gamma!r} must be in (0, 1]")
    return float(gamma)


def kwta_k(gamma: float, n: int) -> int:
    """Number of winners k = max(1, floor(gamma * n)) out of n activations."""
    return max(1, math.floor(gamma * n + _FLOOR_SLACK))


class KWinnersTakeAll(nn.Module):
    """k-Winners-Take-All activation (Xiao et al., "Enhancing adversarial defense by k-WTA").

    Keeps, per sample, the k largest activations and zeroes the rest; replaces ReLU (no ReLU
    inside: negative winners survive). Values equal to the k-th largest are all kept, so ties may
    keep more than k, as in the reference code. The threshold is found without autograd and the
    output is ``where(x >= threshold, x, 0)``, so backward stores only a bool mask and the gradient
    flows through the winners only.

    Args:
        gamma: sparsity ratio in (0, 1]; a plain attribute that an annealing schedule changes
            between epochs (see :func:`set_gamma`, :func:`annealed_gamma`).
        mode: "volume" ranks all C*H*W activations of a sample, k = max(1, floor(gamma*C*H*W))
            (the paper's choice; an (N, F) input ranks its F features); "channel" ranks the H*W
            activations of each channel separately, k = max(1, floor(gamma*H*W)), and needs an
            input with spatial axes.

    Shape:
        Input: (N, C, H, W) or (N, F) (any (N, *) in "volume" mode, (N, C, *spatial) in "channel"
        mode). Output: same shape.

    Examples::

        >>> act = KWinnersTakeAll(gamma=0.2)
        >>> y = act(torch.randn(8, 64, 16, 16))
    """

    def __init__(self, gamma: float = 0.2, mode: str = "volume") -> None:
        super().__init__()
        if mode not in KWTA_MODES:
            raise ValueError(f"mode={mode!r} must be one of {list(KWTA_MODES)}")
        self.gamma = _check_gamma(gamma)
        self.mode = mode

    def forward(self, x: Tensor) -> Tensor:
        if self.mode == "volume":
            if x.dim() < 2:
                raise ValueError(f"input shape {tuple(x.shape)} must be (N, *) with a batch axis 0")
            ranked = x.reshape(x.shape[0], math.prod(x.shape[1:]))
        else:
            if x.dim() < 3:
                raise ValueError(
                    f"input shape {tuple(x.shape)} must be (N, C, H, W) (spatial axes) for "
                    f"mode='channel'; use mode='volume' for (N, F) inputs"
                )
            ranked = x.reshape(x.shape[0], x.shape[1], math.prod(x.shape[2:]))
        k = kwta_k(self.gamma, ranked.shape[-1])
        with torch.no_grad():
            # unsorted topk + min was faster than kthvalue on CPU in our benchmark.
            threshold = ranked.topk(k, dim=-1, sorted=False).values.amin(dim=-1, keepdim=True)
        winners = (ranked >= threshold).view(x.shape)
        return torch.where(winners, x, torch.zeros((), dtype=x.dtype, device=x.device))

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}, mode={self.mode!r}"

    # γ is annealed during training, so the value the weights were trained with may differ from
    # the constructor's target: it travels in the state_dict (a plain float, weights_only-safe).
    def get_extra_state(self) -> dict[str, float]:
        return {"gamma": float(self.gamma)}

    def set_extra_state(self, state: dict[str, float]) -> None:
        self.gamma = _check_gamma(float(state["gamma"]))


def set_gamma(model: nn.Module, gamma: float) -> int:
    """Set the sparsity ratio of every :class:`KWinnersTakeAll` in ``model``.

    Args:
        model: any module (the module itself counts if it is a KWinnersTakeAll).
        gamma: new ratio in (0, 1], validated once before anything changes.

    Returns:
        How many KWinnersTakeAll modules were set.
    """
    gamma = _check_gamma(gamma)
    count = 0
    for module in model.modules():
        if isinstance(module, KWinnersTakeAll):
            module.gamma = gamma
            count += 1
    return count


def annealed_gamma(epoch: int, target: float, start: float = 0.2, step: float = 0.005, every: int = 2) -> float:
    """Sparsity ratio of k-WTA at ``epoch`` under the authors' fine-tuning anneal.

    gamma(e) = max(target, start - step * floor(e / every)): start at 0.2 and lower by 0.005 every
    2 epochs until the target (Xiao et al.'s fine-tune config; the loop applying it was never
    published). A target >= start gives the constant target. The result is rounded to 12 decimals
    so logged values read 0.185, not 0.18500000000000003.

    Args:
        epoch: epoch index >= 0.
        target: final ratio in (0, 1].
        start: initial ratio in (0, 1].
        step: decrease per stage, >= 0.
        every: epochs per stage, >= 1.

    Returns:
        The ratio for this epoch, in [target, max(target, start)].
    """
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
        raise ValueError(f"epoch={epoch!r} must be an integer >= 0")
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not (0.0 < target <= 1.0):
        raise ValueError(f"target={target!r} must be in (0, 1]")
    if isinstance(start, bool) or not isinstance(start, (int, float)) or not (0.0 < start <= 1.0):
        raise ValueError(f"start={start!r} must be in (0, 1]")
    if isinstance(step, bool) or not isinstance(step, (int, float)) or not (math.isfinite(step) and step >= 0):
        raise ValueError(f"step={step!r} must be a finite number >= 0")
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"every={every!r} must be an integer >= 1")
    return round(max(float(target), start - step * (epoch // every)), 12)


# --------------------------------------------------------------------------- registration


@dataclass(frozen=True)
class KWTAAnnealing:
    """k-WTA sparsity annealing (Xiao et al., "Enhancing adversarial defense by k-winners-take-all";
    the authors' fine-tune config): gamma(e) = max(target, start - step * floor(e / every)).

    With ``start <= target`` gamma is fixed at ``target``. The training loop calls
    :meth:`start_epoch` at the start of every epoch (the registry's ``epoch_hook``).
    """

    target: float = 0.2
    start: float = 0.2
    step: float = 0.005
    every: int = 2

    def __post_init__(self) -> None:
        # Checked here, before the first epoch, so a bad schedule fails before any training.
        for name, value in (("gamma", self.target), ("gamma_start", self.start)):
            if not 0.0 < value <= 1.0:
                raise ValueError(f"{name}={value} must be in (0, 1]")
        if self.step < 0.0:
            raise ValueError(f"gamma_step={self.step} must be >= 0")
        if self.every < 1:
            raise ValueError(f"gamma_every={self.every} must be an int >= 1")

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> KWTAAnnealing:
        """Read gamma / gamma_start / gamma_step / gamma_every from the defense parameters."""
        return cls(
            target=float(params.get("gamma", 0.2)),
            start=float(params.get("gamma_start", 0.2)),
            step=float(params.get("gamma_step", 0.005)),
            every=int(params.get("gamma_every", 2)),
        )

    def start_epoch(self, model: nn.Module, epoch: int) -> dict[str, float]:
        gamma = float(annealed_gamma(
            epoch, target=self.target, start=self.start, step=self.step, every=self.every
        ))
        if set_gamma(model, gamma) == 0:
            log.warning("k-WTA annealing: the model has no k-WTA module to anneal")
        return {"gamma": gamma}


def _place_kwta(params: Mapping[str, Any], num_classes: int) -> LayerSet:
    """k-WTA in place of every activation (one module per site, so set_gamma reaches all)."""
    kwargs = pick(params, ("gamma", "mode"))
    KWinnersTakeAll(**kwargs)
    return LayerSet(act=lambda channels: KWinnersTakeAll(**kwargs))


register_defense(
    "kwta", KWinnersTakeAll, place=_place_kwta,
    # gamma = target sparsity; gamma_start/step/every are the training loop's annealing schedule.
    params=("gamma", "mode", "gamma_start", "gamma_step", "gamma_every"),
    epoch_hook=KWTAAnnealing.from_params,
    routing=True,
    color="#ff7f0e",
    cost_budget=(1.5, None),  # issue 2's layer-cost targets (time, memory)
    paper="Xiao, Zhong, Zheng: Enhancing Adversarial Defense by k-Winners-Take-All (ICLR 2020)",
    example=Example(lambda: KWinnersTakeAll(gamma=0.25), (2, 8, 3, 3), (2, 8, 3, 3)),
)
