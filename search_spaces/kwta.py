"""Search space of k-WTA, k-Winners-Take-All (Xiao, Zhong, Zheng: "Enhancing Adversarial
Defense by k-Winners-Take-All", ICLR 2020; reproduced in the seed "Reproducing ... k-WTA").

k-WTA replaces ReLU: per sample it keeps the k = floor(gamma * N) largest activations and zeros
the rest. The authors fine-tune with annealed sparsity: gamma(e) = max(gamma, gamma_start -
gamma_step * floor(e / gamma_every)); with gamma_start <= gamma the schedule is simply the
target from the first epoch.

Paper defaults: target gamma 0.1, "volume" ranking (over C*H*W), annealing from 0.2 by 0.005
every 2 epochs.
"""

from __future__ import annotations

from search_spaces._params import Categorical, DefenseSpace, Float, Int
from search_spaces._registry import register_space

__all__ = ["NON_CONSTRUCTOR_PARAMS", "SPACE"]

# Space parameters that are not keyword arguments of defenses.kwta.KWinnersTakeAll:
NON_CONSTRUCTOR_PARAMS: tuple[str, ...] = (
    "gamma_start",  # annealing schedule applied by the training loop, per epoch
    "gamma_step",  # annealing schedule: decrement of gamma
    "gamma_every",  # annealing schedule: epochs between decrements
)

SPACE = DefenseSpace(
    name="kwta",
    params=(
        Float("gamma", 0.05, 0.3),
        Categorical("mode", ("volume", "channel")),
        Float("gamma_start", 0.1, 0.5),
        Float("gamma_step", 0.001, 0.02),
        Int("gamma_every", 1, 5),
    ),
    defaults={
        "gamma": 0.1,
        "mode": "volume",
        "gamma_start": 0.2,
        "gamma_step": 0.005,
        "gamma_every": 2,
    },
    description=(
        "k-Winners-Take-All instead of ReLU: keep the floor(gamma*N) largest activations per "
        "sample, with sparsity annealed from gamma_start"
    ),
    paper=(
        "Xiao, Zhong, Zheng: Enhancing Adversarial Defense by k-Winners-Take-All (ICLR 2020)"
    ),
)

register_space(SPACE, NON_CONSTRUCTOR_PARAMS)
