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

__all__ = [
    "GAMMA_SCHEDULES",
    "KWTAAnnealing",
    "KWTA_MODES", "KWinnersTakeAll", "annealed_gamma", "kwta_k", "set_gamma"]

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
        # "x < threshold" rather than "x >= threshold": a NaN compares False either way, so this
        # form keeps NaN (topk ranks NaN first, the threshold becomes NaN and nothing is zeroed)
        # and a diverging run shows up as a NaN loss instead of silently turning into zeros.
        losers = (ranked < threshold).view(x.shape)
        return torch.where(losers, torch.zeros((), dtype=x.dtype, device=x.device), x)

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


#: k-WTA sparsity schedules: "scaled" fits the paper's shape into any epoch budget and always
#: ends at the target; "paper" is the published schedule with absolute epoch counts.
GAMMA_SCHEDULES: tuple[str, ...] = ("scaled", "paper")
#: The paper's schedule: 50 epochs at gamma = 0.2, then the authors' 70-epoch fine-tune.
PAPER_HOLD_EPOCHS = 50
PAPER_FINETUNE_EPOCHS = 70
PAPER_FINETUNE_LR = 0.001
# Scaled defaults: the paper's proportions of 50 + 40 + 30 = 120 epochs (hold at 0.2, anneal to
# 0.1 at 0.005 per 2 epochs, train at 0.1), rounded to 0.4 and 0.25.
SCALED_HOLD_FRACTION = 0.4
SCALED_FINAL_FRACTION = 0.25


def _fraction(name: str, value: object, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= high:
        raise ValueError(f"{name}={value!r} must be a number in [0, {high}]")
    return float(value)


@dataclass(frozen=True)
class KWTAAnnealing:
    """k-WTA sparsity schedule (Xiao et al., "Enhancing adversarial defense by k-winners-take-all").

    ``schedule="paper"``: gamma = ``start`` for the first ``hold`` epochs (the paper: 50), then the
    authors' fine-tune anneal counted from the end of the hold, j = e - hold:
    gamma = max(target, start - step * floor(j / every)) (0.2 lowered by 0.005 every 2 epochs).
    Whether the target is reached depends on the epoch budget: 50 + 40 epochs for 0.2 -> 0.1.

    ``schedule="scaled"`` (default): the same shape fitted to ``epochs``. H = floor(hold_fraction
    * E) epochs at ``start``, the last T = max(1, ceil(final_fraction * E)) epochs at ``target``,
    and in between (A = E - H - T epochs) gamma falls linearly from ``start`` by
    (start - target) / A per epoch, so gamma = target from epoch E - T on: always reached.

    ``finetune_lr`` (optional): from the first annealing epoch (``hold`` resp. H) on, training
    uses this constant learning rate (the authors' fine-tune: 0.001), and the main LR schedule
    spans only the epochs before it. ``start <= target`` gives a constant gamma = ``target``.
    The training loop calls :meth:`start_epoch` at the start of every epoch.
    """

    target: float = 0.2
    start: float = 0.2
    step: float = 0.005
    every: int = 2
    schedule: str = "scaled"
    hold: int = PAPER_HOLD_EPOCHS
    hold_fraction: float = SCALED_HOLD_FRACTION
    final_fraction: float = SCALED_FINAL_FRACTION
    finetune_lr: float | None = None
    epochs: int | None = None
    """The trial's epoch budget; the scaled schedule needs it."""

    def __post_init__(self) -> None:
        # Checked here, before the first epoch, so a bad schedule fails before any training
        # (the placement builds one at config load for the same reason).
        for name, value in (("gamma", self.target), ("gamma_start", self.start)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
                raise ValueError(f"{name}={value!r} must be in (0, 1]")
        if isinstance(self.step, bool) or not isinstance(self.step, (int, float)) or not (
            math.isfinite(self.step) and self.step >= 0.0
        ):
            raise ValueError(f"gamma_step={self.step!r} must be a finite number >= 0")
        for name, count in (("gamma_every", self.every), ("gamma_hold", self.hold)):
            if isinstance(count, bool) or not isinstance(count, int) or count < (1 if name == "gamma_every" else 0):
                raise ValueError(f"{name}={count!r} must be an int >= {1 if name == 'gamma_every' else 0}")
        if self.schedule not in GAMMA_SCHEDULES:
            raise ValueError(f"gamma_schedule={self.schedule!r} must be one of {', '.join(GAMMA_SCHEDULES)}")
        hold = _fraction("gamma_hold_fraction", self.hold_fraction, 1.0)
        final = _fraction("gamma_final_fraction", self.final_fraction, 1.0)
        if hold + final > 1.0:
            raise ValueError(
                f"gamma_hold_fraction + gamma_final_fraction = {hold + final:g} must be <= 1"
            )
        lr = self.finetune_lr
        if lr is not None and (isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0.0 < lr <= 10.0):
            raise ValueError(f"gamma_finetune_lr={lr!r} must be None or a learning rate in (0, 10]")
        if self.epochs is not None and (isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 1):
            raise ValueError(f"epochs={self.epochs!r} must be an int >= 1")

    @classmethod
    def from_params(cls, params: Mapping[str, Any], epochs: int | None = None) -> KWTAAnnealing:
        """The schedule from the defense parameters (gamma, gamma_start, ... gamma_finetune_lr)."""
        return cls(
            target=params.get("gamma", 0.2),
            start=params.get("gamma_start", 0.2),
            step=params.get("gamma_step", 0.005),
            every=params.get("gamma_every", 2),
            schedule=params.get("gamma_schedule", "scaled"),
            hold=params.get("gamma_hold", PAPER_HOLD_EPOCHS),
            hold_fraction=params.get("gamma_hold_fraction", SCALED_HOLD_FRACTION),
            final_fraction=params.get("gamma_final_fraction", SCALED_FINAL_FRACTION),
            finetune_lr=params.get("gamma_finetune_lr"),
            epochs=epochs,
        )

    def _scaled_phases(self) -> tuple[int, int]:
        """(H, first epoch at the target E - T) of the scaled schedule."""
        if self.epochs is None:
            raise ValueError("the scaled k-WTA schedule needs the trial's epochs")
        e = self.epochs
        final = max(1, math.ceil(self.final_fraction * e - _FLOOR_SLACK))
        hold = min(math.floor(self.hold_fraction * e + _FLOOR_SLACK), e - final)
        return hold, e - final

    @property
    def anneal_start(self) -> int:
        """The first epoch of the annealing (fine-tune) phase."""
        return self.hold if self.schedule == "paper" else self._scaled_phases()[0]

    def gamma_at(self, epoch: int) -> float:
        """gamma at 0-based ``epoch`` (rounded to 12 decimals so logs read 0.185)."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch={epoch!r} must be an integer >= 0")
        if self.start <= self.target:
            return float(self.target)
        if self.schedule == "paper":
            if epoch < self.hold:
                return float(self.start)
            return annealed_gamma(epoch - self.hold, target=self.target, start=self.start,
                                  step=self.step, every=self.every)
        hold, at_target = self._scaled_phases()
        if epoch < hold:
            return float(self.start)
        if epoch >= at_target:
            return float(self.target)
        per_epoch = (self.start - self.target) / (at_target - hold)
        return round(self.start - per_epoch * (epoch - hold), 12)

    def finetune(self) -> tuple[int, float] | None:
        """(first epoch, constant learning rate) of the fine-tune phase, None without one."""
        if self.finetune_lr is None:
            return None
        return self.anneal_start, float(self.finetune_lr)

    def start_epoch(self, model: nn.Module, epoch: int) -> dict[str, float]:
        gamma = self.gamma_at(epoch)
        if set_gamma(model, gamma) == 0:
            log.warning("k-WTA annealing: the model has no k-WTA module to anneal")
        return {"gamma": gamma}

    def reached(self, model: nn.Module) -> dict[str, float]:
        """The gamma the trained model holds (after early stopping restored a best epoch, that
        epoch's): named ``kwta_gamma_reached`` so no one mistakes it for the target."""
        gammas = {m.gamma for m in model.modules() if isinstance(m, KWinnersTakeAll)}
        if not gammas:
            return {}
        if len(gammas) > 1:
            log.warning("k-WTA modules hold different gammas %s; recording the largest", sorted(gammas))
        return {"kwta_gamma_reached": float(max(gammas))}


def _place_kwta(params: Mapping[str, Any], num_classes: int) -> LayerSet:
    """k-WTA in place of every activation (one module per site, so set_gamma reaches all).

    A dense layer's features have no spatial axes to rank within, so in "channel" mode the
    activations of fully connected layers (VGG-16's head) rank all their features, as the
    paper's k-WTA does in every dense layer.
    """
    kwargs = pick(params, ("gamma", "mode"))
    KWinnersTakeAll(**kwargs)
    KWTAAnnealing.from_params(params)  # the schedule's ranges, checked when the config loads
    dense = {**kwargs, "mode": "volume"}
    return LayerSet(
        act=lambda channels: KWinnersTakeAll(**kwargs),
        dense_act=lambda features: KWinnersTakeAll(**dense),
    )


register_defense(
    "kwta", KWinnersTakeAll, place=_place_kwta,
    # gamma = target sparsity; the gamma_* keys are the training loop's sparsity schedule
    # (KWTAAnnealing): read by the epoch hook, not by the layer.
    params=("gamma", "mode", "gamma_start", "gamma_step", "gamma_every", "gamma_schedule",
            "gamma_hold", "gamma_hold_fraction", "gamma_final_fraction", "gamma_finetune_lr"),
    epoch_hook=KWTAAnnealing.from_params,
    routing=True,
    color="#ff7f0e",
    cost_budget=(1.5, None),  # issue 2's layer-cost targets (time, memory)
    paper="Xiao, Zhong, Zheng: Enhancing Adversarial Defense by k-Winners-Take-All (ICLR 2020)",
    example=Example(lambda: KWinnersTakeAll(gamma=0.25), (2, 8, 3, 3), (2, 8, 3, 3)),
)
