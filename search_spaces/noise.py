"""Search space of activation noise alone: Gaussian noise N(0, sigma^2) after each activation.

The ablation of KAP without the pooling (Bashivan et al., "Learning Robust Kernel Ensembles with
Kernel Average Pooling"), which separates what the noise buys from what KAP buys.

Paper default: sigma = 0.1 (the paper uses sigma in {0, 0.1, 0.2}).
"""

from __future__ import annotations

from search_spaces._params import DefenseSpace, Float
from search_spaces._registry import register_space

__all__ = ["NON_CONSTRUCTOR_PARAMS", "SPACE"]

# Every parameter is a keyword argument of defenses.noise.ActivationNoise.
NON_CONSTRUCTOR_PARAMS: tuple[str, ...] = ()

SPACE = DefenseSpace(
    name="noise",
    params=(Float("sigma", 0.0, 0.3),),
    defaults={"sigma": 0.1},
    description="Gaussian activation noise N(0, sigma^2) after each activation (no KAP)",
    paper=(
        "Bashivan, Ibrahim, Dehghani, Ren: Learning Robust Kernel Ensembles with Kernel "
        "Average Pooling (2022), noise-only ablation"
    ),
)

register_space(SPACE, NON_CONSTRUCTOR_PARAMS)
