"""The spaces by name. Each space file registers its own space with :func:`register_space`.

Kept apart from ``__init__`` so the space files can import it; ``__init__`` imports the built-in
space files, which registers them. A third-party defense's space file calls
:func:`register_space` the same way.
"""

from __future__ import annotations

from search_spaces._params import DefenseSpace
from search_spaces.training import TRAINING_SPACE

__all__ = [
    "BASELINE",
    "NON_CONSTRUCTOR_PARAMS",
    "SPACES",
    "TRAINING_SPACE",
    "get_space",
    "list_spaces",
    "register_space",
    "unregister_space",
]

# The value of the flat config's "defense" parameter for the undefended model.
BASELINE = "none"

#: name -> space, in registration order (the order default studies list the defenses in).
SPACES: dict[str, DefenseSpace] = {}

#: Per space: the parameters that are not keyword arguments of the defense's layer constructor
#: (placement, schedules, training-loss settings); every other parameter name is one.
NON_CONSTRUCTOR_PARAMS: dict[str, tuple[str, ...]] = {}


def register_space(space: DefenseSpace, non_constructor_params: tuple[str, ...] = ()) -> DefenseSpace:
    """Register the search space of the defense ``space.name``.

    Args:
        space: The space; its name is the defense's registry name.
        non_constructor_params: Its parameters that are not keywords of the layer's constructor.

    Returns:
        ``space`` unchanged.

    Raises:
        ValueError: for a name already registered or the baseline's name, or a non-constructor
            parameter the space does not have.
    """
    if not isinstance(space, DefenseSpace):
        raise ValueError(f"space={space!r} must be a DefenseSpace")
    if space.name == BASELINE:
        raise ValueError(f"space name {BASELINE!r} is reserved for the undefended model")
    if space.name in SPACES:
        raise ValueError(f"a space named {space.name!r} is already registered")
    stray = sorted(set(non_constructor_params) - set(space.param_names))
    if stray:
        raise ValueError(f"space {space.name!r}: non-constructor params {stray} are not among its params")
    SPACES[space.name] = space
    NON_CONSTRUCTOR_PARAMS[space.name] = tuple(non_constructor_params)
    return space


def unregister_space(name: str) -> None:
    """Remove a registration (tests and plug-in reloads); unknown names are ignored."""
    SPACES.pop(name, None)
    NON_CONSTRUCTOR_PARAMS.pop(name, None)


def list_spaces() -> list[str]:
    """The registered spaces' names, in registration order."""
    return list(SPACES)


def get_space(name: str) -> DefenseSpace:
    """The space of the defense called ``name``.

    Raises:
        ValueError: for an unknown name, listing the known ones.
    """
    try:
        return SPACES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown defense {name!r}; allowed: {list(SPACES)}") from None
