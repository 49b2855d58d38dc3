"""Declarative, validated search spaces of the defenses and the training recipe.

Standard library only: the spaces are data that ``study/`` turns into Optuna suggestions
(through :meth:`ConditionalSpace.suggest`, a define-by-run function for Ray's ``OptunaSearch``),
study specs validate against, and MLflow logs as an artifact (``to_dict``).

Example::

    space = ConditionalSpace(("kap", "kwta"), training=TRAINING_SPACE,
                             overrides={"training": {"epochs": 15}})
    first_trials = space.paper_default_configs()   # enqueue: baseline, KAP, k-WTA paper settings
    config = space.suggest(optuna_trial)           # {"defense": "kap", "kap.kernel_size": 3, ...}
    defense, params, training = space.split(config)
"""

from __future__ import annotations

from search_spaces._conditional import DEFENSE_PARAM, ConditionalSpace
from search_spaces._params import (
    Categorical,
    DefenseSpace,
    Fixed,
    Float,
    Int,
    Param,
    TrialLike,
)
from search_spaces._registry import (
    BASELINE,
    NON_CONSTRUCTOR_PARAMS,
    SPACES,
    TRAINING_SPACE,
    get_space,
    list_spaces,
    register_space,
    unregister_space,
)

# The built-in spaces register themselves on import, in the order default studies list them.
from search_spaces import kap, kwta, kaf, topk, cas, noise  # noqa: E402, F401  isort: skip

__all__ = [
    "BASELINE",
    "DEFENSE_PARAM",
    "NON_CONSTRUCTOR_PARAMS",
    "SPACES",
    "TRAINING_SPACE",
    "Categorical",
    "ConditionalSpace",
    "DefenseSpace",
    "Fixed",
    "Float",
    "Int",
    "Param",
    "TrialLike",
    "get_space",
    "list_spaces",
    "register_space",
    "unregister_space",
]
