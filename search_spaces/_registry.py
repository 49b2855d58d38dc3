"""The built-in spaces by name (kept apart from ``__init__`` so submodules can import it)."""

from __future__ import annotations

from search_spaces import cas, kaf, kap, kwta, noise, topk
from search_spaces._params import DefenseSpace
from search_spaces.training import TRAINING_SPACE

__all__ = ["BASELINE", "NON_CONSTRUCTOR_PARAMS", "SPACES", "TRAINING_SPACE", "get_space"]

# The value of the flat config's "defense" parameter for the undefended model.
BASELINE = "none"

SPACES: dict[str, DefenseSpace] = {
    space.name: space
    for space in (
        kap.SPACE,
        kwta.SPACE,
        kaf.SPACE,
        topk.TOPKCONV_SPACE,
        topk.DYNAMIC_K_SPACE,
        cas.SPACE,
        noise.SPACE,
    )
}

# Per space: the parameters that are not keyword arguments of the defense's constructor
# (placement, schedules, training-loss settings); every other parameter name is one.
NON_CONSTRUCTOR_PARAMS: dict[str, tuple[str, ...]] = {
    "kap": kap.NON_CONSTRUCTOR_PARAMS,
    "kwta": kwta.NON_CONSTRUCTOR_PARAMS,
    "kaf": kaf.NON_CONSTRUCTOR_PARAMS,
    "topkconv": topk.TOPKCONV_NON_CONSTRUCTOR_PARAMS,
    "dynamic_k": topk.DYNAMIC_K_NON_CONSTRUCTOR_PARAMS,
    "cas": cas.NON_CONSTRUCTOR_PARAMS,
    "noise": noise.NON_CONSTRUCTOR_PARAMS,
}


def get_space(name: str) -> DefenseSpace:
    """The built-in space of the defense called ``name``.

    Raises:
        ValueError: for an unknown name, listing the known ones.
    """
    try:
        return SPACES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown defense {name!r}; allowed: {list(SPACES)}") from None
