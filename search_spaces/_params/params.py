"""One parameter of a space: a float or int range, a categorical choice, or a fixed value."""

from __future__ import annotations

import math
import numbers
import reprlib
from dataclasses import KW_ONLY, dataclass
from typing import Any, Protocol

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
