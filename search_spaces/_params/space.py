"""A defense's search space: its parameters, paper defaults, relations and constraints."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from search_spaces._params.params import (
    _PARAM_TYPES,
    Categorical,
    Fixed,
    Float,
    Int,
    Param,
    TrialLike,
    _check_name,
    _choice_in,
    _is_real,
)

Constraint = tuple[str, Callable[[Mapping[str, Any]], bool]]






def _prune_when(params: list[Param]) -> tuple[list[Param], set[str]]:
    """``params`` with ``when`` relations narrowed to their Categorical's choices, and the names
    of the parameters that can no longer be active (left out)."""
    kept: dict[str, Param] = {}
    dropped: set[str] = set()
    for p in params:
        if p.when is not None:
            ref_name, values = p.when
            ref = kept.get(ref_name)
            if isinstance(ref, Categorical):
                values = tuple(v for v in values if ref.contains(v))
            if ref_name in dropped or not values:
                dropped.add(p.name)
                continue
            if values != p.when[1]:
                p = dataclasses.replace(p, when=(ref_name, values))
        if not isinstance(p, Categorical) and p.at_most in dropped:
            p = dataclasses.replace(p, at_most=None)
        kept[p.name] = p
    return list(kept.values()), dropped


def _numeric_range(p: Param) -> tuple[float, float] | None:
    if isinstance(p, (Float, Int)):
        return (p.low, p.high)
    if isinstance(p, Fixed) and _is_real(p.value):
        return (p.value, p.value)
    return None


@dataclass(frozen=True)
class DefenseSpace:
    """The hyperparameters of one defense (or of the training recipe) and their paper defaults.

    Parameter names equal the defense constructor's keyword names, except for placement,
    schedule and training parameters (each space module lists those in
    ``NON_CONSTRUCTOR_PARAMS``). Parameters are suggested in the order given, so a parameter
    named by another's ``at_most``/``when`` must come before it.

    Args:
        name: the space's name (an identifier, e.g. ``"kap"``); the namespace in flat configs.
        params: the parameters, names unique.
        defaults: the paper's value for every parameter (enqueued as a study's first trials).
        description: one line saying what the defense does.
        paper: the paper the defaults come from (authors, title).
        constraints: extra ``(description, check)`` rules over a config; ``check`` receives the
            config's active values and returns True when valid. Use module-level functions, not
            lambdas, so the space pickles. ``at_most`` relations are checked automatically.

    Raises:
        ValueError: on duplicate names, dangling or out-of-order relations, or defaults that are
            incomplete or invalid.
    """

    name: str
    params: tuple[Param, ...]
    defaults: dict[str, Any]
    description: str = ""
    paper: str = ""
    constraints: tuple[Constraint, ...] = field(default=())

    def __post_init__(self) -> None:
        _check_name("space", self.name)
        if not isinstance(self.params, (tuple, list)):
            raise ValueError(f"{self.name}: params={self.params!r} must be a tuple of parameters")
        params = tuple(self.params)
        object.__setattr__(self, "params", params)
        seen: dict[str, Param] = {}
        for p in params:
            if not isinstance(p, _PARAM_TYPES):
                raise ValueError(f"{self.name}: {p!r} is not a Float, Int, Categorical or Fixed")
            if p.name in seen:
                raise ValueError(f"{self.name}: parameter name {p.name!r} appears more than once")
            self._check_param_relations(p, seen)
            seen[p.name] = p
        constraints = tuple(self.constraints)
        for c in constraints:
            if not (
                isinstance(c, tuple) and len(c) == 2 and isinstance(c[0], str) and callable(c[1])
            ):
                raise ValueError(
                    f"{self.name}: constraint {c!r} must be a (description, callable) pair"
                )
        object.__setattr__(self, "constraints", constraints)
        if not isinstance(self.defaults, Mapping):
            raise ValueError(f"{self.name}: defaults={self.defaults!r} must be a dict")
        defaults = dict(self.defaults)
        missing = [p.name for p in params if p.name not in defaults]
        if missing:
            raise ValueError(f"{self.name}: defaults miss parameter(s) {missing}")
        object.__setattr__(self, "defaults", defaults)
        try:
            self.validate(defaults)
        except ValueError as e:
            raise ValueError(f"{self.name}: invalid defaults: {e}") from None

    def _check_param_relations(self, p: Param, earlier: Mapping[str, Param]) -> None:
        if p.at_most is not None:
            ref = earlier.get(p.at_most)
            if ref is None:
                raise ValueError(
                    f"{self.name}: {p.name}.at_most={p.at_most!r} must name a parameter listed "
                    f"before it, one of {sorted(earlier)}"
                )
            own, other = _numeric_range(p), _numeric_range(ref)
            if own is None or other is None:
                raise ValueError(
                    f"{self.name}: {p.name}.at_most={p.at_most!r} relates non-numeric parameters"
                )
            if own[0] > other[1]:
                raise ValueError(
                    f"{self.name}: {p.name} >= {own[0]} can never be <= {p.at_most} <= {other[1]}"
                )
        if p.when is not None:
            ref_name, values = p.when
            ref = earlier.get(ref_name)
            if ref is None:
                raise ValueError(
                    f"{self.name}: {p.name}.when names {ref_name!r}, which must be a parameter "
                    f"listed before it, one of {sorted(earlier)}"
                )
            if not isinstance(ref, (Categorical, Fixed)):
                raise ValueError(
                    f"{self.name}: {p.name}.when must name a categorical parameter, "
                    f"{ref_name!r} is not"
                )
            if isinstance(ref, Categorical):
                bad = [v for v in values if not ref.contains(v)]
                if bad:
                    raise ValueError(
                        f"{self.name}: {p.name}.when values {bad!r} are not choices of "
                        f"{ref_name} {ref.choices!r}"
                    )

    @property
    def param_names(self) -> tuple[str, ...]:
        """The parameter names in suggestion order."""
        return tuple(p.name for p in self.params)

    def param(self, name: str) -> Param:
        """The parameter called ``name``.

        Raises:
            ValueError: if there is none, listing the allowed names.
        """
        for p in self.params:
            if p.name == name:
                return p
        raise ValueError(
            f"{self.name}: unknown parameter {name!r}; allowed: {list(self.param_names)}"
        )

    def is_active(self, param: Param, values: Mapping[str, Any]) -> bool:
        """Whether ``param`` matters given the values of the parameters before it."""
        if param.when is None:
            return True
        ref_name, allowed = param.when
        return ref_name in values and _choice_in(values[ref_name], allowed)

    def constraint_descriptions(self) -> list[str]:
        """Every cross-parameter rule in words (``at_most`` relations first)."""
        rules = [f"{p.name} <= {p.at_most}" for p in self.params if p.at_most is not None]
        return rules + [desc for desc, _ in self.constraints]

    def validate(self, config: Mapping[str, Any]) -> dict[str, Any]:
        """Check a complete config of this space and return it as a new dict.

        Every active parameter must be present; an inactive one (its ``when`` unmet) may be
        given and is then range-checked too.

        Raises:
            ValueError: naming the unknown key (and the allowed keys), the missing key, the
                out-of-range value or the violated constraint.
        """
        if not isinstance(config, Mapping):
            raise ValueError(f"{self.name}: config {config!r} must be a dict")
        unknown = [k for k in config if k not in self.param_names]
        if unknown:
            raise ValueError(
                f"{self.name}: unknown parameter(s) {unknown}; allowed: {list(self.param_names)}"
            )
        for p in self.params:
            if p.name in config:
                p.validate(config[p.name])
            elif self.is_active(p, config):
                raise ValueError(f"{self.name}: missing parameter {p.name!r}")
        self._check_constraints(config)
        return dict(config)

    def _check_constraints(self, config: Mapping[str, Any]) -> None:
        for p in self.params:
            if (
                p.at_most is not None
                and p.name in config
                and p.at_most in config
                and config[p.name] > config[p.at_most]
            ):
                raise ValueError(
                    f"{self.name}: {p.name}={config[p.name]!r} must be <= "
                    f"{p.at_most}={config[p.at_most]!r}"
                )
        for desc, check in self.constraints:
            if not check(config):
                shown = {k: config[k] for k in self.param_names if k in config}
                raise ValueError(f"{self.name}: {shown} violates constraint: {desc}")

    def restrict(self, overrides: Mapping[str, Any]) -> DefenseSpace:
        """A new space with some parameters fixed or narrowed.

        Args:
            overrides: parameter name -> either a plain value (the parameter becomes
                :class:`Fixed` after the value is validated against it) or a parameter of the
                same name and kind whose range/choices lie inside the original (narrowing).
                Defaults of overridden parameters become the fixed value (or stay the paper
                default if it lies in the narrowed range, else the narrowed range's low end /
                first choice).

        A parameter whose ``when`` names a narrowed :class:`Categorical` keeps only the values
        still among its choices; with none left it can never be active and leaves the space
        with its default (as does anything whose ``when`` names it, and an ``at_most`` naming
        it is dropped: it never bounds anything). A controlling parameter fixed to one value
        leaves its dependants in place, inactive, as a space may declare them.

        Raises:
            ValueError: on unknown names, invalid values, widened ranges, or when the resulting
                defaults break a cross-parameter rule (then fix the related parameter too).
        """
        if not isinstance(overrides, Mapping):
            raise ValueError(f"{self.name}: overrides {overrides!r} must be a dict")
        unknown = [k for k in overrides if k not in self.param_names]
        if unknown:
            raise ValueError(
                f"{self.name}: cannot override unknown parameter(s) {unknown}; "
                f"allowed: {list(self.param_names)}"
            )
        params: list[Param] = []
        defaults = dict(self.defaults)
        for p in self.params:
            if p.name not in overrides:
                params.append(p)
                continue
            new, default = self._narrow(p, overrides[p.name])
            params.append(new)
            defaults[p.name] = default
        params, dropped = _prune_when(params)
        for name in dropped:
            del defaults[name]
        try:
            return dataclasses.replace(self, params=tuple(params), defaults=defaults)
        except ValueError as e:
            raise ValueError(
                f"{self.name}: overrides {dict(overrides)} are inconsistent: {e}"
            ) from None

    def _narrow(self, p: Param, override: Any) -> tuple[Param, Any]:
        relations: dict[str, Any] = {"when": p.when}
        if not isinstance(p, Categorical):
            relations["at_most"] = p.at_most
        if not isinstance(override, _PARAM_TYPES):
            p.validate(override)
            return Fixed(p.name, override, at_most=p.at_most, when=p.when), override
        if override.name != p.name:
            raise ValueError(f"{self.name}: override for {p.name!r} is named {override.name!r}")
        if isinstance(override, Fixed):
            p.validate(override.value)
            return Fixed(p.name, override.value, at_most=p.at_most, when=p.when), override.value
        if type(override) is not type(p):
            raise ValueError(
                f"{self.name}: cannot narrow {type(p).__name__} {p.name!r} with a "
                f"{type(override).__name__}"
            )
        if isinstance(override, Categorical):
            for c in override.choices:
                p.validate(c)
        else:
            assert isinstance(override, (Float, Int)) and isinstance(p, (Float, Int))  # same type as p
            # Both ends on the original grid keep every narrowed value valid for the original.
            p.validate(override.low)
            p.validate(override.high)
            if override.log != p.log or override.step != p.step:
                raise ValueError(
                    f"{self.name}: narrowing {p.name!r} must keep log={p.log} and step={p.step}"
                )
        new = dataclasses.replace(override, **relations)
        default = self.defaults[p.name]
        if not new.contains(default):
            default = new.choices[0] if isinstance(new, Categorical) else new.low
        return new, default

    def suggest(
        self, trial: TrialLike, prefix: str = "", given: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """Suggest the active parameters of this space (define-by-run).

        Args:
            trial: an object with Optuna-like ``suggest_*`` methods (e.g. ``optuna.Trial``).
            prefix: prepended to each parameter name when asking the trial (``"kap."``).
            given: values decided elsewhere (not suggested, but validated and used for
                ``when``/``at_most``), e.g. a training recipe chosen by the defense.

        Returns:
            The active parameters' values, keyed by the bare parameter names.
        """
        given = dict(given or {})
        unknown = [k for k in given if k not in self.param_names]
        if unknown:
            raise ValueError(f"{self.name}: given unknown parameter(s) {unknown}")
        # Values known before any suggestion tighten the lower bound of the parameters they
        # are related to by ``at_most`` (e.g. a fixed stride raises kernel_size's minimum).
        known = {p.name: p.value for p in self.params if isinstance(p, Fixed)} | given
        values: dict[str, Any] = {}
        for p in self.params:
            if not self.is_active(p, values):
                continue
            if p.name in given:
                p.validate(given[p.name])
                values[p.name] = given[p.name]
            elif isinstance(p, Fixed):
                values[p.name] = p.value
            elif isinstance(p, Categorical):
                values[p.name] = p.suggest(trial, prefix + p.name)
                p.validate(values[p.name])
            else:
                high = values.get(p.at_most) if p.at_most is not None else None
                floors = [
                    known[q.name]
                    for q in self.params
                    if q.at_most == p.name and q.name in known and self.is_active(q, known)
                ]
                low = max(floors) if floors else None
                values[p.name] = p.suggest(trial, prefix + p.name, low=low, high=high)
                # Optuna hands enqueued values back even when outside the distribution.
                p.validate(values[p.name])
        self._check_constraints(values)
        return values

    def active_defaults(self, given: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The defaults of the parameters that are active under the defaults (and ``given``)."""
        merged = {**self.defaults, **(given or {})}
        values: dict[str, Any] = {}
        for p in self.params:
            if self.is_active(p, values):
                values[p.name] = merged[p.name]
        return values

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly description (for logging the search space as an artifact)."""
        return {
            "name": self.name,
            "description": self.description,
            "paper": self.paper,
            "params": [p.to_dict() for p in self.params],
            "defaults": dict(self.defaults),
            "constraints": self.constraint_descriptions(),
        }
