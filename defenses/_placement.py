"""Small helpers the defense modules' placements share: reading and checking ``defense_params``."""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = ["check_k", "default_of", "flag", "nonneg_float", "pick", "resolve_k"]


def resolve_k(k: float, n: int, *, what: str = "in_channels", layer: str = "layer") -> int:
    """Turn a fraction or a count into an absolute k.

    Args:
        k: A float in (0, 1] is a fraction of ``n`` (k = max(1, round(k * n))); an int >= 1 is
            an absolute count and must not exceed ``n``.
        n: Number of channels/features k selects among.
        what: Name of ``n`` for the error message.
        layer: Layer description for the error message.

    Raises:
        ValueError: naming k, the allowed range and the layer.
    """
    check_k(k, layer)
    if isinstance(k, numbers.Integral):
        if k > n:
            raise ValueError(f"k={k} must be in [1, {what}={n}] for {layer}")
        return int(k)
    return max(1, int(round(float(k) * n)))


def check_k(k: float, layer: str) -> None:
    """Type and range of k, before the channel count is known."""
    if isinstance(k, bool) or not isinstance(k, numbers.Real):
        raise ValueError(f"k={k!r} must be a fraction in (0, 1] or an int >= 1 for {layer}")
    if isinstance(k, numbers.Integral):
        if k < 1:
            raise ValueError(f"k={k} must be an int >= 1 or a fraction in (0, 1] for {layer}")
    elif not (math.isfinite(k) and 0 < k <= 1):
        raise ValueError(
            f"k={k!r} as a float must be a fraction in (0, 1] (use an int for a count) for {layer}"
        )


def default_of(factory: Callable[..., Any], name: str) -> Any:
    """The default of keyword ``name`` in ``factory``'s signature (one source for defaults)."""
    return inspect.signature(factory).parameters[name].default


def pick(params: Mapping[str, Any], keys: Sequence[str]) -> dict[str, Any]:
    """The entries of ``params`` named in ``keys`` (absent keys take the layer's default)."""
    return {key: params[key] for key in keys if key in params}


def nonneg_float(params: Mapping[str, Any], key: str, default: float) -> float:
    value = params.get(key, default)
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not float(value) >= 0:
        raise ValueError(f"{key}={value!r} must be a number >= 0")
    return float(value)


def flag(params: Mapping[str, Any], key: str, default: bool) -> bool:
    value = params.get(key, default)
    if not isinstance(value, bool):
        raise ValueError(f"{key}={value!r} must be True or False")
    return value
