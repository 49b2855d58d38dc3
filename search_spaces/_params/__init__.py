"""Validated search-space parameters and the per-defense space that groups them.

Search spaces are data: small frozen value objects that check themselves on construction
(after Optuna's ``distributions.py``) and raise ``ValueError`` naming the bad value. They know
nothing about Optuna: :meth:`DefenseSpace.suggest` drives any object with Optuna-like
``suggest_float`` / ``suggest_int`` / ``suggest_categorical`` methods, so the same space serves
Optuna, Ray's ``OptunaSearch`` define-by-run function and the fake trials of the tests.

Two declarative relations between parameters keep the flat config valid by construction:

* ``at_most="other"`` (numeric params): the value must not exceed ``other``'s value. When
  suggesting, the upper bound is lowered to ``other``'s value (Optuna allows a numeric
  distribution's range to change between trials; only categorical choices must stay fixed), so
  no invalid combination is ever proposed and nothing is clamped (clamping would pile
  probability mass on the boundary). The cost: Optuna's relative samplers (multivariate TPE,
  NSGA-II crossover) only model parameters whose distribution never changed, so such a
  parameter is sampled independently -- as are all parameters of a conditional space anyway.
* ``when=("other", (v1, v2, ...))``: the parameter only matters when ``other`` takes one of
  these values (e.g. ``noise_sigma`` only for the ``noise`` training recipe). Inactive
  parameters are neither suggested nor written into a config, so Optuna does not model
  parameters that had no effect.

Everything here pickles with the standard :mod:`pickle` (Ray Tune pickles its searcher, and with
it the define-by-run space, into experiment checkpoints): no lambdas, no mapping proxies.
"""

# Wrong types in user input raise ValueError too: the one error the CLI reports as exit 2.
# ruff: noqa: TRY004

from __future__ import annotations

from search_spaces._params.params import (  # noqa: F401
    _PARAM_TYPES,
    Categorical,
    Fixed,
    Float,
    Int,
    Param,
    TrialLike,
)
from search_spaces._params.space import (  # noqa: F401
    Constraint,
    DefenseSpace,
)
