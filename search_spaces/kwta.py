"""Search space of k-WTA, k-Winners-Take-All (Xiao, Zhong, Zheng: "Enhancing Adversarial
Defense by k-Winners-Take-All", ICLR 2020; reproduced in the seed "Reproducing ... k-WTA").

k-WTA replaces ReLU: per sample it keeps the k = floor(gamma * N) largest activations and zeros
the rest. The sparsity is annealed from gamma_start to the target gamma by the training loop
(defenses.kwta.KWTAAnnealing). gamma_schedule "paper": gamma_hold epochs at gamma_start (the
paper: 50), then gamma_start - gamma_step * floor(j / gamma_every) over the fine-tune epochs j.
"scaled" (the default): the same shape fitted to the trial's epochs, a gamma_hold_fraction at
gamma_start, the last gamma_final_fraction at the target, a linear anneal in between, so the
target is always reached. gamma_finetune_lr: constant learning rate from the first annealing
epoch on (the authors' fine-tune: 0.001); None keeps the main schedule.

Paper defaults: target gamma 0.1, "volume" ranking (over C*H*W), annealing from 0.2.
"""

from __future__ import annotations

from search_spaces._params import Categorical, DefenseSpace, Float, Int
from search_spaces._registry import register_space

__all__ = ["NON_CONSTRUCTOR_PARAMS", "SPACE"]

_PAPER = ("gamma_schedule", ("paper",))
_SCALED = ("gamma_schedule", ("scaled",))

# Space parameters that are not keyword arguments of defenses.kwta.KWinnersTakeAll: the
# training loop's sparsity schedule, applied per epoch.
NON_CONSTRUCTOR_PARAMS: tuple[str, ...] = (
    "gamma_start",
    "gamma_schedule",
    "gamma_hold",
    "gamma_step",
    "gamma_every",
    "gamma_hold_fraction",
    "gamma_final_fraction",
    "gamma_finetune_lr",
)

SPACE = DefenseSpace(
    name="kwta",
    params=(
        Float("gamma", 0.05, 0.3),
        Categorical("mode", ("volume", "channel")),
        Float("gamma_start", 0.1, 0.5),
        Categorical("gamma_schedule", ("scaled", "paper")),
        Int("gamma_hold", 0, 200, when=_PAPER),
        Float("gamma_step", 0.001, 0.02, when=_PAPER),
        Int("gamma_every", 1, 5, when=_PAPER),
        # Bounds keep hold + final <= 1 for every pair the sampler can draw.
        Float("gamma_hold_fraction", 0.0, 0.6, when=_SCALED),
        Float("gamma_final_fraction", 0.0, 0.4, when=_SCALED),
        Categorical("gamma_finetune_lr", (None, 0.001)),
    ),
    defaults={
        "gamma": 0.1,
        "mode": "volume",
        "gamma_start": 0.2,
        "gamma_schedule": "scaled",
        "gamma_hold": 50,
        "gamma_step": 0.005,
        "gamma_every": 2,
        "gamma_hold_fraction": 0.4,
        "gamma_final_fraction": 0.25,
        "gamma_finetune_lr": None,
    },
    description=(
        "k-Winners-Take-All instead of ReLU: keep the floor(gamma*N) largest activations per "
        "sample, with sparsity annealed from gamma_start to gamma"
    ),
    paper=(
        "Xiao, Zhong, Zheng: Enhancing Adversarial Defense by k-Winners-Take-All (ICLR 2020)"
    ),
)

register_space(SPACE, NON_CONSTRUCTOR_PARAMS)
