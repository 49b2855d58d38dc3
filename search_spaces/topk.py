"""Search spaces of TopKConv and Dynamic-k (Eigen, Sadovnik: "TopKConv: Increased Adversarial
Robustness Through Deeper Interpretability").

TopKConv replaces the last convolutions: each output channel sums only the k input channels
whose depthwise responses rank highest (TKC-max by spatial max, TKC-sum by spatial sum;
TKC-neuron keeps the k strongest output channels). Dynamic-k replaces the dense layers: each
output sums only its k largest weighted inputs.

``k`` is searched as a *fraction* (of input channels, of input features) so one space fits any
width; the model builder turns it into a count (``max(1, round(k * n))``) for the constructor's
``k``.

Paper defaults: TopKConv in the 2 convs before the classifier with k = 10% of the channels,
TKC-max, and -- in every TopKConv result of the paper -- Dynamic-k in the dense layers with
k = 250 of 25,088 in the penultimate and 10 of 512 in the final one (``k_dense_hidden``,
``k_dense_last``, as those exact fractions; ``dynamic_k_heads: false`` runs TopKConv alone). The
standalone ``dynamic_k`` defense uses one fraction for every dense layer, 2%.
"""

from __future__ import annotations

from search_spaces._params import Categorical, DefenseSpace, Float, Int
from search_spaces._registry import register_space

__all__ = [
    "DYNAMIC_K_NON_CONSTRUCTOR_PARAMS",
    "DYNAMIC_K_SPACE",
    "NON_CONSTRUCTOR_PARAMS",
    "TOPKCONV_NON_CONSTRUCTOR_PARAMS",
    "TOPKCONV_SPACE",
]

_PAPER = (
    "Eigen, Sadovnik: TopKConv: Increased Adversarial Robustness Through Deeper "
    "Interpretability (ICMLA 2021)"
)

# Space parameters that are not keyword arguments of defenses.topk.TopKConv2d:
TOPKCONV_NON_CONSTRUCTOR_PARAMS: tuple[str, ...] = (
    "layers",  # placement: how many of the backbone's last convs are replaced
    "dynamic_k_heads",  # placement: Dynamic-k in the dense layers (the paper) or plain ones
    "k_dense_hidden",  # DynamicKLinear's k in the dense layers before the classifier
    "k_dense_last",  # DynamicKLinear's k in the classifier
)
_HEADS_ON = ("dynamic_k_heads", (True,))
# Every Dynamic-k parameter is a keyword argument of defenses.topk.DynamicKLinear.
DYNAMIC_K_NON_CONSTRUCTOR_PARAMS: tuple[str, ...] = ()
NON_CONSTRUCTOR_PARAMS: tuple[str, ...] = (
    TOPKCONV_NON_CONSTRUCTOR_PARAMS + DYNAMIC_K_NON_CONSTRUCTOR_PARAMS
)

TOPKCONV_SPACE = DefenseSpace(
    name="topkconv",
    params=(
        Float("k", 0.05, 0.5),
        Categorical("criterion", ("max", "sum", "neuron")),
        Int("layers", 1, 2),
        Categorical("dynamic_k_heads", (False, True)),
        Float("k_dense_hidden", 0.002, 0.5, log=True, when=_HEADS_ON),
        Float("k_dense_last", 0.005, 0.5, log=True, when=_HEADS_ON),
    ),
    defaults={
        "k": 0.1, "criterion": "max", "layers": 2, "dynamic_k_heads": True,
        "k_dense_hidden": 250 / 25088, "k_dense_last": 10 / 512,
    },
    description=(
        "TopKConv: each output channel sums only the k (fraction of input channels) "
        "top-ranked depthwise responses, in the last `layers` convs; with Dynamic-k dense "
        "layers (the paper's combination) unless dynamic_k_heads is false"
    ),
    paper=_PAPER,
)

DYNAMIC_K_SPACE = DefenseSpace(
    name="dynamic_k",
    params=(Float("k", 0.01, 0.5),),
    defaults={"k": 0.02},
    description=(
        "Dynamic-k dense layers: each output sums only its k (fraction of inputs) largest "
        "weighted inputs"
    ),
    paper=_PAPER,
)

register_space(TOPKCONV_SPACE, TOPKCONV_NON_CONSTRUCTOR_PARAMS)
register_space(DYNAMIC_K_SPACE, DYNAMIC_K_NON_CONSTRUCTOR_PARAMS)
