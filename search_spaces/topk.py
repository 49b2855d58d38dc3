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
TKC-max; Dynamic-k with k = 250 of 25,088 (~1%) in the penultimate and 10 of 512 (~2%) in the
final dense layer -- one fraction for both here, 2%.
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
)
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
    ),
    defaults={"k": 0.1, "criterion": "max", "layers": 2},
    description=(
        "TopKConv: each output channel sums only the k (fraction of input channels) "
        "top-ranked depthwise responses, in the last `layers` convs"
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
