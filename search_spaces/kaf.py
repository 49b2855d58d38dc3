"""Search space of KAF, Kernel-based Activation Functions (Scardapane, Van Vaerenbergh,
Totaro, Uncini: "Kafnets: kernel-based non-parametric activation functions for neural
networks"; seed thesis "Robustness of DNNs using trainable activation functions").

KAF replaces ReLU by g(s) = sum_i alpha_i exp(-gamma (s - d_i)^2) per channel, over a fixed
dictionary of D points equally spaced on [-boundary, boundary].

Paper defaults (thesis): D = 20, random alpha, bandwidth gamma = 1/(6 Delta^2), fixed dictionary,
boundary 3 (the reference code uses 3 or 4). KAF_Free trains the dictionary and the bandwidth too,
shared by the layer or (``per_channel``, the thesis' variant) one of each per channel.
"""

from __future__ import annotations

from search_spaces._params import Categorical, DefenseSpace, Float, Int
from search_spaces._registry import register_space

__all__ = ["NON_CONSTRUCTOR_PARAMS", "SPACE"]

# Every parameter is a keyword argument of defenses.kaf.KernelActivation.
NON_CONSTRUCTOR_PARAMS: tuple[str, ...] = ()

SPACE = DefenseSpace(
    name="kaf",
    params=(
        Int("dictionary_size", 5, 40),
        Categorical("init", ("random", "relu", "elu", "swish")),
        Categorical("bandwidth", ("thesis", "reference")),
        Categorical("trainable_dictionary", (False, True)),
        # The thesis' KAF_Free: a dictionary and a bandwidth per channel (2*C*D + C parameters).
        Categorical("per_channel", (False, True), when=("trainable_dictionary", (True,))),
        Float("boundary", 2.0, 4.0),
    ),
    defaults={
        "dictionary_size": 20,
        "init": "random",
        "bandwidth": "thesis",
        "trainable_dictionary": False,
        "per_channel": False,
        "boundary": 3.0,
    },
    description=(
        "Kernel-based activation function instead of ReLU: a per-channel mixture of D Gaussian "
        "kernels on a fixed dictionary"
    ),
    paper=(
        "Scardapane, Van Vaerenbergh, Totaro, Uncini: Kafnets: kernel-based non-parametric "
        "activation functions for neural networks (2019)"
    ),
)

register_space(SPACE, NON_CONSTRUCTOR_PARAMS)
