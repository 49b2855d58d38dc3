"""Early stopping in a spec: what its author writes, and what a study runs (``auto`` decided).

Kept apart from :mod:`study.spec` so the rule for ``auto`` (and the measurement behind it) reads on
its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import Field

from study.config import _Strict

__all__ = ["AUTO_MAX_EPOCHS", "AUTO_MAX_TRIALS", "AUTO_MIN_EPOCHS", "AUTO_MIN_TRIALS", "EARLY_STOPPING_RULES", "EarlyStopping", "EarlyStoppingConfig",
           "decide_early_stopping", "milestones"]

EARLY_STOPPING_RULES = ("mo_asha", "asha")
#: Where ``auto`` turns MO-ASHA on: the study sizes at which ``bench search`` measured it winning
#: (3 seeds; docs/benchmarks.md, *Early stopping*). Trials of 6 epochs, first rung at epoch 2, all
#: measured on 2026-12-06 against TPE alone, as a share of random search's core-seconds to reach its
#: front: 16 trials 79 % against 82 %, 32 trials 50 % against 56 %, 48 trials 27 % against 43 %, 64
#: trials 25.3 % against 30 % (earlier days at 16 and 32: wins and one tie). At 64 trials of 9 epochs,
#: first rung at epoch 3, it lost: TPE alone 30 %, TPE + MO-ASHA not within 100 % and a lower final
#: front on every seed. With the rung at two thirds of 9 epochs it tied (31 %), and two thirds of 6
#: epochs lost at 32 trials (63 %), so the rung stays at a third and auto stays off from 9 epochs: the
#: 6-epoch wins do not carry over there, and longer trials (CIFAR's 100 epochs) were not measured.
#: Between 6 and 8 epochs the first rung is epoch 2, as measured. Fewer than 16 trials leave the rungs
#: too few peers to rank, more than 64 and shorter trials were not measured: auto leaves them alone.
#: ``bench search --grace`` moves the rung for such measurements.
AUTO_MIN_TRIALS = 16
AUTO_MAX_TRIALS = 64
AUTO_MIN_EPOCHS = 6
AUTO_MAX_EPOCHS = 8


class EarlyStoppingConfig(_Strict):
    """Early stopping at successive-halving rungs. Stopped trials are excluded from the front and told
    to Optuna as pruned. In a spec, ``early_stopping: mo_asha`` (or ``asha``, ``auto``, ``off``) is
    short for ``{enabled: true, rule: mo_asha}`` (``enabled: auto``, ``enabled: false``)."""

    enabled: bool | Literal["auto"] = "auto"
    """auto (default): on where it was measured to win (AUTO_MIN_TRIALS to AUTO_MAX_TRIALS trials of
    AUTO_MIN_EPOCHS to AUTO_MAX_EPOCHS epochs, epochs not searched), off elsewhere; see
    :func:`decide_early_stopping`."""
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
        on, why = False, f"auto: {num_trials} trials, on up to {AUTO_MAX_TRIALS} (measured up to there)"
    elif epochs < AUTO_MIN_EPOCHS:
        on, why = False, f"auto: {epochs} epochs per trial, on from {AUTO_MIN_EPOCHS}"
    elif epochs > AUTO_MAX_EPOCHS:
        on, why = False, (f"auto: {epochs} epochs per trial, on up to {AUTO_MAX_EPOCHS}; bench search measured it "
                          "losing to TPE alone at 64 trials of 9 epochs")
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
