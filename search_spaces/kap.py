"""Search space of KAP, Kernel Average Pool (Bashivan et al., "Learning Robust Kernel Ensembles
with Kernel Average Pooling").

KAP averages (or max-pools) each channel with its neighbours along the kernel axis, after every
convolution, followed by Gaussian activation noise N(0, sigma^2) at training time.

Paper defaults: the paper uses sigma in {0, 0.1, 0.2} (0.1 here), a mean filter with stride 1
(overlapping kernels), and the authors' lab code uses the 2D layout (channels on a grid); the
kernel size K = 3 is our default for the 1..4 range and is the value to confirm against the
paper's appendix. Stride S > 1 shrinks the channels (by S in 1D, S^2 in 2D) and is compensated by
widening the preceding conv (paper appendix A.3): by S^2 in 2D (``widen: area``, the default:
every layer keeps its nominal number of ensembles), by S (``widen: stride``), or by the kernel
size K as the appendix words it (``widen: kernel``), see docs/defenses.md.
"""

from __future__ import annotations

from search_spaces._params import Categorical, DefenseSpace, Float, Int
from search_spaces._registry import register_space

__all__ = ["NON_CONSTRUCTOR_PARAMS", "SPACE"]

# Space parameters that are not keyword arguments of defenses.kap.KernelAveragePool:
NON_CONSTRUCTOR_PARAMS: tuple[str, ...] = (
    "sigma",  # std of the ActivationNoise(sigma) placed after each KAP, not a KAP argument
    "widen",  # how the convs before a strided KAP are widened (placement, not a KAP argument)
)

SPACE = DefenseSpace(
    name="kap",
    params=(
        Int("kernel_size", 1, 4),
        # Declared relation instead of clamping: suggested from 1..kernel_size (Optuna allows a
        # numeric range to change between trials), so every proposal is valid and unbiased.
        Int("stride", 1, 4, at_most="kernel_size"),
        Float("sigma", 0.0, 0.3),
        Categorical("dims", (1, 2)),
        Categorical("mode", ("avg", "max")),
        # "area" and "stride" differ only in 2D (1D: both widen by S); "kernel" (K, the appendix's
        # words) is searched in 2D with them; in 1D it is set in a trial config.
        Categorical("widen", ("area", "stride", "kernel"), when=("dims", (2,))),
    ),
    defaults={"kernel_size": 3, "stride": 1, "sigma": 0.1, "dims": 2, "mode": "avg", "widen": "area"},
    description=(
        "Kernel Average Pool: mean (or max) filter of size K, stride S along the channel axis "
        "after each conv, then Gaussian activation noise N(0, sigma^2)"
    ),
    paper=(
        "Bashivan, Ibrahim, Dehghani, Ren: Learning Robust Kernel Ensembles with Kernel "
        "Average Pooling (2022)"
    ),
)

register_space(SPACE, NON_CONSTRUCTOR_PARAMS)
