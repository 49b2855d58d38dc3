"""Search-space parameter names equal the defense constructors' keyword names (issue 4)."""

from __future__ import annotations

import inspect

import pytest

import defenses
from defenses._registry import _REGISTRY
from search_spaces import NON_CONSTRUCTOR_PARAMS, SPACES


@pytest.mark.parametrize("name", sorted(SPACES))
def test_space_params_are_constructor_keywords_or_declared_placement(name: str) -> None:
    space = SPACES[name]
    keywords = set(inspect.signature(_REGISTRY[name].layer.__init__).parameters) - {"self"}
    extra = set(NON_CONSTRUCTOR_PARAMS[name])
    for param in space.param_names:
        assert param in keywords or param in extra, f"{name}.{param} is neither a constructor keyword nor declared"
        # ... and build_model accepts every searched parameter under the same name.
        assert param in defenses.DEFENSE_PARAMS[name], f"build_model does not accept {name}.{param}"
    # the declared non-constructor parameters really are not constructor keywords
    assert not (extra & keywords), extra & keywords


def test_every_registered_defense_has_a_space() -> None:
    assert set(defenses.list_defenses()) == set(SPACES)
