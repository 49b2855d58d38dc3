"""Search space of CAS, Channel-wise Activation Suppressing (Bai, Zeng, Jiang, Xia, Ma, Wang:
"Improving Adversarial Robustness via Channel-wise Activation Suppressing", ICLR 2021).

A CAS module after a block multiplies each channel by an auxiliary classifier's weight for the
true (train) or predicted (eval) class; the loss adds beta/S * sum of the auxiliary CEs. CAS is
meant to be combined with adversarial training.

``recipe`` is the training method CAS is combined with. It also exists in the training space;
in a :class:`search_spaces.ConditionalSpace` the CAS value is the one used: ``training.recipe`` is
then not suggested but set to ``cas.recipe``.

Paper defaults: beta = 2, CAS after both blocks of ResNet-18's layer4 (their best), PGD-10
adversarial training. ``last3`` is the paper's VGG-16 placement (the last three conv layers, with
beta = 3). ``last4`` (ResNet-18's layer3 + layer4, the paper's ablation) is a placement of the
defense (a trial config's ``defense_params``) but not of this space: the digits CNN has only three
blocks, so a study could propose a model that cannot be built.
"""

from __future__ import annotations

from search_spaces._params import Categorical, DefenseSpace, Float
from search_spaces._registry import register_space

__all__ = ["NON_CONSTRUCTOR_PARAMS", "SPACE"]

# Space parameters that are not keyword arguments of
# defenses.cas.ChannelActivationSuppression:
NON_CONSTRUCTOR_PARAMS: tuple[str, ...] = (
    "beta",  # weight of the auxiliary losses in the training loss
    "placement",  # where the modules go: after the last one, two or three blocks
    "recipe",  # training method CAS is combined with (adversarial training)
)

SPACE = DefenseSpace(
    name="cas",
    params=(
        Float("beta", 0.0, 20.0),
        Categorical("placement", ("last", "last2", "last3")),
        Categorical("recipe", ("pgd_at", "trades", "mart", "fast_at")),
    ),
    defaults={"beta": 2.0, "placement": "last2", "recipe": "pgd_at"},
    description=(
        "Channel-wise Activation Suppressing: auxiliary classifiers reweight the channels of "
        "the last block(s); loss CE + beta/S * sum CE_aux; with adversarial training"
    ),
    paper=(
        "Bai, Zeng, Jiang, Xia, Ma, Wang: Improving Adversarial Robustness via Channel-wise "
        "Activation Suppressing (ICLR 2021)"
    ),
)

register_space(SPACE, NON_CONSTRUCTOR_PARAMS)
