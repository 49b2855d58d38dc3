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

import dataclasses
import math
import numbers
import reprlib
from collections.abc import Callable, Mapping
from dataclasses import KW_ONLY, dataclass, field
from typing import Any, Protocol

__all__ = [
    "Categorical",
    "DefenseSpace",
    "Fixed",
    "Float",
    "Int",
    "Param",
    "TrialLike",
]

# Optuna's CategoricalChoiceType: values that storages, Ray configs, MLflow and JSON all accept.
_CHOICE_TYPES = (type(None), bool, int, float, str)
_GRID_TOL = 1e-9


class TrialLike(Protocol):
    """What :meth:`DefenseSpace.suggest` needs from a trial (``optuna.Trial`` satisfies it)."""

    def suggest_float(
        self, name: str, low: float, high: float, *, step: float | None = None, log: bool = False
    ) -> float: ...

    def suggest_int(
        self, name: str, low: int, high: int, *, step: int = 1, log: bool = False
    ) -> int: ...

    def suggest_categorical(self, name: str, choices: Any) -> Any: ...


def _is_real(value: object) -> bool:
    # bool is an int subclass, but True is never a meaningful learning rate.
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_finite_real(value: object) -> bool:
    if not _is_real(value):
        return False
    try:
        return math.isfinite(value)  # type: ignore[arg-type]
    except OverflowError:  # an int beyond float range (10**400): not a usable bound or value
        return False


# Values in error messages come from user input: bounded, so a huge or deeply nested value
# (a YAML alias bomb) still makes one short line.
_SHOW = reprlib.Repr()  # keyword arguments only from Python 3.12
_SHOW.maxstring, _SHOW.maxother, _SHOW.maxlong = 60, 60, 40
_SHOW.maxlist, _SHOW.maxtuple, _SHOW.maxdict, _SHOW.maxlevel = 6, 6, 4, 2


def _show(value: object) -> str:
    return _SHOW.repr(value)


def _is_integer(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _choice_in(value: object, choices: tuple[Any, ...]) -> bool:
    return any(
        isinstance(value, bool) == isinstance(c, bool)
        and isinstance(value, str) == isinstance(c, str)
        and value == c
        for c in choices
    )


def _check_name(kind: str, name: object) -> None:
    # "." separates namespaces in flat configs ("kap.kernel_size"), so names must be identifiers.
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"{kind} name={name!r} must be a Python identifier (letters, digits, _)")


def _check_relations(
    name: str, at_most: object, when: object
) -> tuple[str, tuple[Any, ...]] | None:
    if at_most is not None:
        _check_name(f"{name}: at_most", at_most)
        if at_most == name:
            raise ValueError(f"{name}: at_most={at_most!r} must name another parameter")
    if when is None:
        return None
    if (
        not isinstance(when, (tuple, list))
        or len(when) != 2
        or not isinstance(when[1], (tuple, list))
        or len(when[1]) == 0
    ):
        raise ValueError(
            f"{name}: when={when!r} must be (parameter_name, (value, ...)) with at least one value"
        )
    _check_name(f"{name}: when", when[0])
    return (when[0], tuple(when[1]))


def _on_grid(value: float, low: float, step: float) -> bool:
    n = (value - low) / step
    return abs(n - round(n)) <= _GRID_TOL * max(1.0, abs(n))


@dataclass(frozen=True)
class Float:
    """A real-valued parameter in ``[low, high]``, optionally log-scaled or on a ``step`` grid.

    Args:
        name: parameter name, equal to the defense constructor's keyword where there is one.
        low: smallest allowed value.
        high: largest allowed value (``low == high`` is allowed: a degenerate range).
        log: sample on a log scale (needs ``low > 0``; exclusive with ``step``, as in Optuna).
        step: grid spacing from ``low``; ``high - low`` must be a multiple of it.
        at_most: name of another numeric parameter this value must not exceed.
        when: ``(parameter, values)``: active only when that parameter takes one of the values.
    """

    name: str
    low: float
    high: float
    log: bool = False
    step: float | None = None
    _: KW_ONLY
    at_most: str | None = None
    when: tuple[str, tuple[Any, ...]] | None = None

    def __post_init__(self) -> None:
        _check_name("parameter", self.name)
        for label, bound in (("low", self.low), ("high", self.high)):
            if not _is_finite_real(bound):
                raise ValueError(f"{self.name}: {label}={_show(bound)} must be a finite real number")
        if self.low > self.high:
            raise ValueError(f"{self.name}: low={self.low!r} must be <= high={self.high!r}")
        if not isinstance(self.log, bool):
            raise ValueError(f"{self.name}: log={self.log!r} must be True or False")
        if self.log and self.low <= 0:
            raise ValueError(f"{self.name}: log=True needs low > 0, got low={self.low!r}")
        if self.step is not None:
            if self.log:
                raise ValueError(
                    f"{self.name}: step={self.step!r} cannot be combined with log=True"
                )
            if not _is_finite_real(self.step) or self.step <= 0:
                raise ValueError(f"{self.name}: step={self.step!r} must be a positive real number")
            if not _on_grid(self.high, self.low, self.step):
                raise ValueError(
                    f"{self.name}: high - low = {self.high - self.low!r} must be a multiple of "
                    f"step={self.step!r}"
                )
        object.__setattr__(self, "when", _check_relations(self.name, self.at_most, self.when))
        object.__setattr__(self, "low", float(self.low))
        object.__setattr__(self, "high", float(self.high))

    def contains(self, value: object) -> bool:
        """Whether ``value`` is a finite real number in range (and on the step grid)."""
        if not _is_finite_real(value):
            return False
        if not self.low <= value <= self.high:  # type: ignore[operator]
            return False
        return self.step is None or _on_grid(
            float(value), self.low, self.step  # type: ignore[arg-type]
        )

    def validate(self, value: object) -> None:
        """Raise ``ValueError`` naming the parameter, the value and the allowed range."""
        if not self.contains(value):
            grid = "" if self.step is None else f" on a grid of step {self.step} from {self.low}"
            raise ValueError(
                f"{self.name}={_show(value)} must be a real number in [{self.low}, {self.high}]{grid}"
            )

    def suggest(
        self, trial: TrialLike, name: str, low: float | None = None, high: float | None = None
    ) -> float:
        """Ask ``trial`` for a value under ``name``, optionally within narrower bounds."""
        lo = self.low if low is None else max(self.low, float(low))
        hi = self.high if high is None else min(self.high, float(high))
        if self.step is not None:
            # Narrowed bounds must stay on the declared grid, or Optuna would shift it.
            lo = self.low + math.ceil((lo - self.low) / self.step - _GRID_TOL) * self.step
            hi = self.low + math.floor((hi - self.low) / self.step + _GRID_TOL) * self.step
            lo, hi = max(lo, self.low), min(hi, self.high)
        _check_nonempty(self.name, lo, hi)
        return float(trial.suggest_float(name, lo, hi, log=self.log, step=self.step))

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly description."""
        return _with_relations(
            self,
            {"type": "float", "name": self.name, "low": self.low, "high": self.high,
             "log": self.log, "step": self.step},
        )


@dataclass(frozen=True)
class Int:
    """An integer parameter in ``[low, high]`` on a ``step`` grid, optionally log-scaled.

    Args:
        name: parameter name, equal to the defense constructor's keyword where there is one.
        low: smallest allowed value.
        high: largest allowed value; ``high - low`` must be a multiple of ``step``.
        log: sample on a log scale (needs ``low >= 1`` and ``step == 1``, as in Optuna).
        step: grid spacing from ``low`` (>= 1).
        at_most: name of another numeric parameter this value must not exceed.
        when: ``(parameter, values)``: active only when that parameter takes one of the values.
    """

    name: str
    low: int
    high: int
    log: bool = False
    step: int = 1
    _: KW_ONLY
    at_most: str | None = None
    when: tuple[str, tuple[Any, ...]] | None = None

    def __post_init__(self) -> None:
        _check_name("parameter", self.name)
        for label, bound in (("low", self.low), ("high", self.high)):
            if not _is_integer(bound):
                raise ValueError(f"{self.name}: {label}={bound!r} must be an integer")
        if self.low > self.high:
            raise ValueError(f"{self.name}: low={self.low!r} must be <= high={self.high!r}")
        if not isinstance(self.log, bool):
            raise ValueError(f"{self.name}: log={self.log!r} must be True or False")
        if not _is_integer(self.step) or self.step < 1:
            raise ValueError(f"{self.name}: step={self.step!r} must be an integer >= 1")
        if self.log and (self.low < 1 or self.step != 1):
            raise ValueError(
                f"{self.name}: log=True needs low >= 1 and step == 1, got low={self.low!r}, "
                f"step={self.step!r}"
            )
        if (self.high - self.low) % self.step:
            raise ValueError(
                f"{self.name}: high - low = {self.high - self.low} must be a multiple of "
                f"step={self.step}"
            )
        object.__setattr__(self, "when", _check_relations(self.name, self.at_most, self.when))
        object.__setattr__(self, "low", int(self.low))
        object.__setattr__(self, "high", int(self.high))
        object.__setattr__(self, "step", int(self.step))

    def contains(self, value: object) -> bool:
        """Whether ``value`` is an integer (not a bool) in range and on the step grid."""
        if not _is_integer(value):
            return False
        v: int = value  # type: ignore[assignment]
        return self.low <= v <= self.high and (v - self.low) % self.step == 0

    def validate(self, value: object) -> None:
        """Raise ``ValueError`` naming the parameter, the value and the allowed range."""
        if not self.contains(value):
            grid = f" in steps of {self.step}" if self.step != 1 else ""
            raise ValueError(
                f"{self.name}={_show(value)} must be an integer in [{self.low}, {self.high}]{grid}"
            )

    def suggest(
        self, trial: TrialLike, name: str, low: float | None = None, high: float | None = None
    ) -> int:
        """Ask ``trial`` for a value under ``name``, optionally within narrower bounds."""
        lo = self.low if low is None else max(self.low, math.ceil(low))
        hi = self.high if high is None else min(self.high, math.floor(high))
        lo = self.low + -(-(lo - self.low) // self.step) * self.step
        hi = self.low + ((hi - self.low) // self.step) * self.step
        _check_nonempty(self.name, lo, hi)
        return trial.suggest_int(name, lo, hi, log=self.log, step=self.step)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly description."""
        return _with_relations(
            self,
            {"type": "int", "name": self.name, "low": self.low, "high": self.high,
             "log": self.log, "step": self.step},
        )


@dataclass(frozen=True)
class Categorical:
    """A parameter taking one of ``choices`` (None, bool, int, float or str values).

    Args:
        name: parameter name, equal to the defense constructor's keyword where there is one.
        choices: the allowed values, at least one, no duplicates (a list is turned into a tuple).
        when: ``(parameter, values)``: active only when that parameter takes one of the values.
    """

    name: str
    choices: tuple[Any, ...]
    _: KW_ONLY
    when: tuple[str, tuple[Any, ...]] | None = None

    @property
    def at_most(self) -> None:
        """Categorical values are not ordered: no ``at_most`` relation."""
        return None

    def __post_init__(self) -> None:
        _check_name("parameter", self.name)
        if not isinstance(self.choices, (tuple, list)) or len(self.choices) == 0:
            raise ValueError(f"{self.name}: choices={self.choices!r} must be a non-empty tuple")
        choices = tuple(self.choices)
        for c in choices:
            if not isinstance(c, _CHOICE_TYPES) or (isinstance(c, float) and not math.isfinite(c)):
                raise ValueError(
                    f"{self.name}: choice {c!r} must be None, a bool, an int, a finite float "
                    "or a str"
                )
        for i, c in enumerate(choices):
            if _choice_in(c, choices[:i]):
                raise ValueError(f"{self.name}: choice {c!r} appears more than once in {choices!r}")
        object.__setattr__(self, "choices", choices)
        object.__setattr__(self, "when", _check_relations(self.name, None, self.when))

    def contains(self, value: object) -> bool:
        """Whether ``value`` is one of the choices (``1`` is not ``True`` here)."""
        return _choice_in(value, self.choices)

    def validate(self, value: object) -> None:
        """Raise ``ValueError`` naming the parameter, the value and the allowed choices."""
        if not self.contains(value):
            raise ValueError(f"{self.name}={_show(value)} must be one of {self.choices!r}")

    def suggest(self, trial: TrialLike, name: str) -> Any:
        """Ask ``trial`` for one of the choices under ``name``."""
        return trial.suggest_categorical(name, self.choices)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly description."""
        return _with_relations(
            self, {"type": "categorical", "name": self.name, "choices": list(self.choices)}
        )


@dataclass(frozen=True)
class Fixed:
    """A parameter pinned to one value: written into configs, never suggested.

    Made by :meth:`DefenseSpace.restrict` from a fixed override, after validating the value
    against the parameter it replaces (whose ``at_most``/``when`` relations it keeps).

    Args:
        name: parameter name.
        value: the value (None, bool, int, float or str).
        at_most: name of another numeric parameter this value must not exceed.
        when: ``(parameter, values)``: active only when that parameter takes one of the values.
    """

    name: str
    value: Any
    _: KW_ONLY
    at_most: str | None = None
    when: tuple[str, tuple[Any, ...]] | None = None

    def __post_init__(self) -> None:
        _check_name("parameter", self.name)
        if not isinstance(self.value, _CHOICE_TYPES):
            raise ValueError(
                f"{self.name}: fixed value {self.value!r} must be None, a bool, an int, a float "
                "or a str"
            )
        object.__setattr__(self, "when", _check_relations(self.name, self.at_most, self.when))

    def contains(self, value: object) -> bool:
        """Whether ``value`` is the fixed value."""
        return _choice_in(value, (self.value,))

    def validate(self, value: object) -> None:
        """Raise ``ValueError`` unless ``value`` is the fixed value."""
        if not self.contains(value):
            raise ValueError(f"{self.name}={_show(value)} is fixed to {self.value!r} in this space")

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly description."""
        return _with_relations(self, {"type": "fixed", "name": self.name, "value": self.value})


Param = Float | Int | Categorical | Fixed
_PARAM_TYPES = (Float, Int, Categorical, Fixed)

Constraint = tuple[str, Callable[[Mapping[str, Any]], bool]]


def _check_nonempty(name: str, low: float, high: float) -> None:
    if low > high:
        raise ValueError(
            f"{name}: no value satisfies the bounds [{low}, {high}] imposed by related parameters"
        )


def _with_relations(param: Param, d: dict[str, Any]) -> dict[str, Any]:
    if param.at_most is not None:
        d["at_most"] = param.at_most
    if param.when is not None:
        d["when"] = {"param": param.when[0], "values": list(param.when[1])}
    return d


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
