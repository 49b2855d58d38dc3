"""A conditional space over several defenses: the defense first, then its parameters.

Flat configs (what Optuna, Ray Tune and MLflow see) namespace every parameter:
``{"defense": "kap", "kap.kernel_size": 3, ..., "training.lr": 0.1, ...}``; "." because Ray
Tune unflattens config keys on "/" only. ``defense == "none"`` is the undefended baseline.
"""

# Wrong types in user input raise ValueError too: the one error the CLI reports as exit 2.
# ruff: noqa: TRY004
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from search_spaces._params import (
    Categorical,
    DefenseSpace,
    Fixed,
    Float,
    Int,
    TrialLike,
)
from search_spaces._registry import BASELINE, get_space

__all__ = ["DEFENSE_PARAM", "ConditionalSpace"]

DEFENSE_PARAM = "defense"
_TRAINING = "training"


def _prefixed(prefix: str, values: Mapping[str, Any]) -> dict[str, Any]:
    return {f"{prefix}.{k}": v for k, v in values.items()}


def _possible_values(p: Any) -> Iterable[Any]:
    # The values that bound what a parameter can produce (ends of a range suffice for ranges).
    if isinstance(p, Categorical):
        return p.choices
    if isinstance(p, Fixed):
        return (p.value,)
    if isinstance(p, (Float, Int)):
        return (p.low, p.high)
    return ()


@dataclass(frozen=True)
class ConditionalSpace:
    """Search over which defense to use (or none) and, conditionally, that defense's parameters.

    Only the chosen defense's parameters are suggested. A defense parameter with the same name as
    a training parameter (CAS's ``recipe``) decides that training parameter for the defense: the
    training one is then not suggested but set to the defense's value, so both keys agree.

    Args:
        defenses: built-in defense names to search (see ``search_spaces.SPACES``), no duplicates.
        include_baseline: add the undefended model (``defense == "none"``) as a choice.
        overrides: per defense name (or ``"training"``), fixed values or narrowed parameters,
            as accepted by :meth:`DefenseSpace.restrict`.
        training: the training space searched alongside (``search_spaces.TRAINING_SPACE``), or
            None to leave training out of the search.
        defaults_per_recipe: :meth:`paper_default_configs` gives each defense's paper defaults
            once per searched training recipe (standard and adversarial training side by side),
            not only with the training space's default recipe.

    Raises:
        ValueError: on unknown/duplicate defenses, an empty choice, overrides for defenses not
            searched, or overrides that contradict each other.
    """

    defenses: tuple[str, ...]
    include_baseline: bool = True
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    training: DefenseSpace | None = None
    defaults_per_recipe: bool = False
    _spaces: dict[str, DefenseSpace] = field(init=False, repr=False, compare=False)
    _training_space: DefenseSpace | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.defenses, str) or not isinstance(self.defenses, Iterable):
            raise ValueError(f"defenses={self.defenses!r} must be a tuple of defense names")
        defenses = tuple(self.defenses)
        object.__setattr__(self, "defenses", defenses)
        for d in defenses:
            if d == BASELINE:
                raise ValueError(
                    f"defenses must not list {BASELINE!r}: use include_baseline=True for the "
                    "undefended model"
                )
        duplicates = sorted({d for d in defenses if defenses.count(d) > 1})
        if duplicates:
            raise ValueError(f"defenses {duplicates} appear more than once in {defenses}")
        if not isinstance(self.include_baseline, bool):
            raise ValueError(f"include_baseline={self.include_baseline!r} must be True or False")
        if not defenses and not self.include_baseline:
            raise ValueError("nothing to search: no defenses and include_baseline=False")
        if self.training is not None and not isinstance(self.training, DefenseSpace):
            raise ValueError(f"training={self.training!r} must be a DefenseSpace or None")

        if not isinstance(self.overrides, Mapping):
            raise ValueError(f"overrides={self.overrides!r} must be a dict of dicts")
        allowed = list(defenses) + ([_TRAINING] if self.training is not None else [])
        unknown = [k for k in self.overrides if k not in allowed]
        if unknown:
            raise ValueError(f"overrides for {unknown} which are not searched; allowed: {allowed}")
        overrides = {k: dict(v) for k, v in self.overrides.items()}
        object.__setattr__(self, "overrides", overrides)

        spaces = {d: get_space(d).restrict(overrides.get(d, {})) for d in defenses}
        training = self.training
        if training is not None:
            training = training.restrict(overrides.get(_TRAINING, {}))
        object.__setattr__(self, "_spaces", spaces)
        object.__setattr__(self, "_training_space", training)
        self._check_shared_params()

    def _check_shared_params(self) -> None:
        if self._training_space is None:
            return
        for d, space in self._spaces.items():
            for name in self._shared(space):
                target = self._training_space.param(name)
                for value in _possible_values(space.param(name)):
                    try:
                        target.validate(value)
                    except ValueError as e:
                        raise ValueError(
                            f"{d}.{name} decides training.{name}, but training does not allow "
                            f"it: {e}"
                        ) from None

    def _shared(self, space: DefenseSpace) -> list[str]:
        if self._training_space is None:
            return []
        return [n for n in space.param_names if n in self._training_space.param_names]

    # -- public API -------------------------------------------------------------------------

    def defense_choices(self) -> tuple[str, ...]:
        """The ``defense`` parameter's values: ``"none"`` first (if included), then the defenses."""
        return ((BASELINE,) if self.include_baseline else ()) + self.defenses

    def space(self, defense: str) -> DefenseSpace:
        """The (restricted) space of one searched defense."""
        if defense not in self._spaces:
            raise ValueError(f"defense {defense!r} is not searched; searched: {list(self._spaces)}")
        return self._spaces[defense]

    @property
    def training_space(self) -> DefenseSpace | None:
        """The (restricted) training space, or None."""
        return self._training_space

    def suggest(self, trial: TrialLike) -> dict[str, Any]:
        """Define-by-run: suggest the defense, then only its parameters and the training's.

        Pass this bound method as ``OptunaSearch(space=conditional_space.suggest, ...)``; the
        returned flat dict (which also carries fixed values) becomes the trial's config.

        Args:
            trial: any object with Optuna-like ``suggest_float``/``suggest_int``/
                ``suggest_categorical`` methods.

        Returns:
            The flat config, valid for :meth:`validate`.
        """
        defense_param = Categorical(DEFENSE_PARAM, self.defense_choices())
        defense = defense_param.suggest(trial, DEFENSE_PARAM)
        defense_param.validate(defense)
        flat: dict[str, Any] = {DEFENSE_PARAM: defense}
        shared: dict[str, Any] = {}
        if defense != BASELINE:
            space = self._spaces[defense]
            values = space.suggest(trial, prefix=f"{defense}.")
            flat.update(_prefixed(defense, values))
            shared = {n: values[n] for n in self._shared(space) if n in values}
        if self._training_space is not None:
            training = self._training_space.suggest(trial, prefix=f"{_TRAINING}.", given=shared)
            flat.update(_prefixed(_TRAINING, training))
        return flat

    def paper_default_configs(self) -> list[dict[str, Any]]:
        """One flat config per choice with its paper defaults (baseline first, if included).

        Enqueue these as a study's first trials so every study starts from the published
        settings. Only active parameters appear, exactly as :meth:`suggest` would write them.
        With ``defaults_per_recipe``, every searched recipe in turn (a defense that decides its
        recipe appears once, with its own).
        """
        configs = []
        for recipe in self._default_recipes():
            for defense in self.defense_choices():
                flat: dict[str, Any] = {DEFENSE_PARAM: defense}
                shared: dict[str, Any] = {} if recipe is None else {"recipe": recipe}
                if defense != BASELINE:
                    space = self._spaces[defense]
                    values = space.active_defaults()
                    decided = {n: values[n] for n in self._shared(space) if n in values}
                    if recipe is not None and decided.get("recipe", recipe) != recipe:
                        continue  # the defense decides its recipe: it appeared with it already
                    flat.update(_prefixed(defense, values))
                    shared = {**shared, **decided}
                if self._training_space is not None:
                    flat.update(_prefixed(_TRAINING, self._training_space.active_defaults(shared)))
                if flat not in configs:
                    configs.append(flat)
        return configs

    def _default_recipes(self) -> tuple[Any, ...]:
        """The training recipes the paper defaults are enqueued with: (None,) means the training
        space's default only."""
        space = self._training_space
        if not self.defaults_per_recipe or space is None or "recipe" not in space.param_names:
            return (None,)
        recipe = space.param("recipe")
        return tuple(getattr(recipe, "choices", (None,)))

    def allowed_keys(self, defense: str) -> list[str]:
        """Every key a flat config may hold when ``defense`` is chosen."""
        keys = [DEFENSE_PARAM]
        if defense != BASELINE:
            keys += [f"{defense}.{n}" for n in self.space(defense).param_names]
        if self._training_space is not None:
            keys += [f"{_TRAINING}.{n}" for n in self._training_space.param_names]
        return keys

    def split(self, flat: Mapping[str, Any]) -> tuple[str, dict[str, Any], dict[str, Any]]:
        """Validate a flat config and split it into (defense, its params, training params).

        Parameter names in the two dicts are bare (``"kernel_size"``, ``"lr"``); inactive
        parameters are absent (fill them from the space's ``defaults`` if needed).

        Raises:
            ValueError: as :meth:`validate`.
        """
        if not isinstance(flat, Mapping):
            raise ValueError(f"config {flat!r} must be a dict")
        if DEFENSE_PARAM not in flat:
            raise ValueError(f"config misses {DEFENSE_PARAM!r}; choices: {self.defense_choices()}")
        defense = flat[DEFENSE_PARAM]
        Categorical(DEFENSE_PARAM, self.defense_choices()).validate(defense)
        allowed = self.allowed_keys(defense)
        unknown = [k for k in flat if k not in allowed]
        if unknown:
            raise ValueError(
                f"unknown key(s) {unknown} for defense {defense!r}; allowed: {allowed}"
            )
        defense_values: dict[str, Any] = {}
        training_values: dict[str, Any] = {}
        for key, value in flat.items():
            if key == DEFENSE_PARAM:
                continue
            prefix, _, name = key.partition(".")
            (training_values if prefix == _TRAINING else defense_values)[name] = value
        if defense != BASELINE:
            space = self._spaces[defense]
            space.validate(defense_values)
            for name in self._shared(space):
                if name in defense_values and training_values.get(name) != defense_values[name]:
                    raise ValueError(
                        f"{_TRAINING}.{name}={training_values.get(name)!r} must equal "
                        f"{defense}.{name}={defense_values[name]!r}, which decides it"
                    )
        if self._training_space is not None:
            self._training_space.validate(training_values)
        return defense, defense_values, training_values

    def validate(self, flat: Mapping[str, Any]) -> dict[str, Any]:
        """Check a flat config and return it as a new dict.

        Raises:
            ValueError: naming the missing ``defense``, an unknown key (listing the allowed
                keys), an out-of-range value, a violated constraint, or a training parameter
                that disagrees with the defense parameter that decides it.
        """
        self.split(flat)
        return dict(flat)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly description (logged as the study's search-space artifact)."""
        shared = {
            f"{d}.{n}": f"{_TRAINING}.{n}" for d, s in self._spaces.items() for n in self._shared(s)
        }
        return {
            DEFENSE_PARAM: {"type": "categorical", "choices": list(self.defense_choices())},
            "include_baseline": self.include_baseline,
            "defenses": {d: s.to_dict() for d, s in self._spaces.items()},
            _TRAINING: None if self._training_space is None else self._training_space.to_dict(),
            "decides": shared,
            "overrides": {
                k: {n: v.to_dict() if hasattr(v, "to_dict") else v for n, v in o.items()}
                for k, o in self.overrides.items()
            },
        }
