"""Early stopping in a spec: what its author writes, and what a study runs (``auto`` decided).

Kept apart from :mod:`study.spec` so the rule for ``auto`` (and the measurement behind it) reads on
its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import Field

from study.config import _Strict

__all__ = ["AUTO_MAX_TRIALS", "AUTO_MIN_EPOCHS", "AUTO_MIN_TRIALS", "EARLY_STOPPING_RULES", "EarlyStopping", "EarlyStoppingConfig",
           "decide_early_stopping", "milestones"]

EARLY_STOPPING_RULES = ("mo_asha", "asha")
#: Where ``auto`` turns MO-ASHA on: the study sizes at which ``bench search`` measured it winning
#: (trials of 6 epochs, 3 seeds; docs/benchmarks.md). At 32 trials TPE + MO-ASHA reached random
#: search's front with 41 % of random's core-seconds, TPE alone 84 %; at 16 trials 56 % and 68 %. Once
#: trials measured their per-epoch robust accuracy only at the rungs: 63 % and 68 % at 16 trials, 71 % and
#: 71 % at 32, with a higher final front on every seed at the same compute.
#: At 64 trials of 9 epochs (the issue's reference size, 2026-12-06) it lost: TPE alone reached random
#: search's 64-trial front with 30 % of its core-seconds, TPE + MO-ASHA not at all within 100 %, and
#: ended lower on every seed. So auto stops at AUTO_MAX_TRIALS; between 33 and 63 trials it was not
#: measured and stays off too. (With the first rung at two thirds of the epochs instead of a third it
#: tied TPE alone there, 31 % against 30 %. Not the default: re-measured the same day at 6 epochs, the
#: rung at two thirds lost at 32 trials, 63 % against TPE's 56 %, where a third won with 50 %, and at
#: 16 trials both were within noise of TPE's 82 %: 77 % and 79 %. `bench search --grace` sets it.)
#: Fewer than 16 trials leave the rungs too few peers to rank, and shorter trials make the first rung
#: most of a trial's cost: neither was measured, so auto leaves them alone.
AUTO_MIN_TRIALS = 16
AUTO_MAX_TRIALS = 32
AUTO_MIN_EPOCHS = 6


class EarlyStoppingConfig(_Strict):
    """Early stopping at successive-halving rungs. Stopped trials are excluded from the front and told
    to Optuna as pruned. In a spec, ``early_stopping: mo_asha`` (or ``asha``, ``auto``, ``off``) is
    short for ``{enabled: true, rule: mo_asha}`` (``enabled: auto``, ``enabled: false``)."""

    enabled: bool | Literal["auto"] = "auto"
    """auto (default): on where it was measured to win (AUTO_MIN_TRIALS to AUTO_MAX_TRIALS trials of at
    least AUTO_MIN_EPOCHS epochs, epochs not searched), off elsewhere; see :func:`decide_early_stopping`."""
    rule: Literal[EARLY_STOPPING_RULES] = "mo_asha"  # type: ignore[valid-type]
    """mo_asha: rungs ranked by non-dominated sorting of the objectives on validation numbers (Schmucker
    et al. 2021) | asha: Ray Tune's single-metric ASHA on validation clean accuracy."""
    grace_epochs: int | None = Field(None, ge=1, le=1000)
    """Epochs every trial runs before it can be stopped; unset: a third of the epochs (at least 1),
    the first rung bench search measured."""
    reduction_factor: int = Field(3, ge=2, le=1000)
    """ASHA reduction factor."""


@dataclass(frozen=True)
class EarlyStopping:
    """A spec's early stopping as it runs: ``auto`` decided and the grace period filled in."""

    enabled: bool
    rule: str
    grace_epochs: int
    reduction_factor: int
    why: str
    """Why it is on or off (``auto`` says which condition decided)."""

    def describe(self) -> str:
        if not self.enabled:
            return f"early stopping off ({self.why})"
        return (f"early stopping {self.rule}: first rung at epoch {self.grace_epochs}, reduction factor "
                f"{self.reduction_factor} ({self.why})")


def decide_early_stopping(config: EarlyStoppingConfig, num_trials: int, epochs: int,
                          epochs_searched: bool = False) -> EarlyStopping:
    """What a study of ``num_trials`` trials of ``epochs`` epochs runs under ``config``."""
    grace = config.grace_epochs or max(1, epochs // 3)
    if config.enabled != "auto":
        return EarlyStopping(bool(config.enabled), config.rule, grace, config.reduction_factor, "set in the spec")
    if epochs_searched:
        on, why = False, "auto: epochs are searched, rungs would compare trials of different lengths"
    elif num_trials < AUTO_MIN_TRIALS:
        on, why = False, f"auto: {num_trials} trials, on from {AUTO_MIN_TRIALS}"
    elif num_trials > AUTO_MAX_TRIALS:
        on, why = False, (f"auto: {num_trials} trials, on up to {AUTO_MAX_TRIALS}; bench search measured it "
                          "losing to TPE alone at 64")
    elif epochs < AUTO_MIN_EPOCHS:
        on, why = False, f"auto: {epochs} epochs per trial, on from {AUTO_MIN_EPOCHS}"
    else:
        on, why = True, f"auto: {num_trials} trials of {epochs} epochs"
    return EarlyStopping(on, config.rule, grace, config.reduction_factor, why)


def milestones(grace: int, reduction_factor: int, last: int) -> list[int]:
    """Rung epochs grace * rf**k strictly below ``last`` (the trial's final epoch), ascending."""
    out = []
    t = grace
    while t < last:
        out.append(t)
        t *= reduction_factor
    return out
