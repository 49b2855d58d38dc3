"""Name -> layer factory registry for the defense layers.

In the spirit of timm's ``create_act.py``: one dict lookup, no if/elif chain over names, so a
study spec, a search space and a test can all refer to a defense by a stable string and a new
defense is one ``register_defense`` call away. ``create_defense`` checks keyword arguments
against the constructor's signature up front, so a typo in a study spec fails with the list of
allowed keywords instead of a ``TypeError`` deep inside a trial.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

from defenses.cas import ChannelActivationSuppression
from defenses.kaf import KernelActivation
from defenses.kap import KernelAveragePool
from defenses.kwta import KWinnersTakeAll
from defenses.noise import ActivationNoise
from defenses.topk import DynamicKLinear, TopKConv2d

__all__ = ["create_defense", "list_defenses", "register_defense"]

LayerFactory = Callable[..., nn.Module]

_REGISTRY: dict[str, LayerFactory] = {}


def register_defense(name: str, cls: LayerFactory) -> LayerFactory:
    """Register a defense layer under ``name``.

    Args:
        name: Registry key (non-empty string, e.g. ``"kap"``).
        cls: An ``nn.Module`` subclass or any callable returning an ``nn.Module``
            (a ``functools.partial`` works).

    Returns:
        ``cls`` unchanged, so this can also be used inline.

    Raises:
        ValueError: if ``name`` is empty or already registered (silently replacing a layer
            would change what every study using that name measures), or ``cls`` is not callable.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"defense name={name!r} must be a non-empty string")
    if not callable(cls):
        raise ValueError(f"defense {name!r}: cls={cls!r} must be a callable returning an nn.Module")
    if name in _REGISTRY:
        raise ValueError(
            f"defense name={name!r} is already registered (to {_REGISTRY[name]!r}); "
            "choose another name"
        )
    _REGISTRY[name] = cls
    return cls


def list_defenses() -> list[str]:
    """Return the registered defense names, sorted."""
    return sorted(_REGISTRY)


def _signature(factory: LayerFactory) -> inspect.Signature | None:
    try:
        return inspect.signature(factory)
    except (TypeError, ValueError):  # some builtins/C callables have no signature
        return None


def create_defense(name: str, **kwargs: Any) -> nn.Module:
    """Instantiate the defense layer registered under ``name``.

    Args:
        name: A name from :func:`list_defenses`.
        **kwargs: Constructor keyword arguments of that layer.

    Returns:
        A new ``nn.Module`` (a fresh instance on every call: never share one across sites).

    Raises:
        ValueError: for an unknown name (message lists the allowed names), unknown keyword
            arguments (message names them and the allowed ones) or missing required ones;
            the layer's own ``ValueError`` for out-of-range values.

    Examples::

        >>> kap = create_defense("kap", kernel_size=3, stride=1)
    """
    try:
        factory = _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown defense {name!r}; allowed: {', '.join(list_defenses())}"
        ) from None
    sig = _signature(factory)
    if sig is not None:
        params = sig.parameters.values()
        takes_var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
        allowed = [
            p.name
            for p in params
            if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        ]
        unknown = sorted(set(kwargs) - set(allowed))
        if unknown and not takes_var_kw:
            raise ValueError(
                f"unknown argument(s) {', '.join(unknown)} for defense {name!r}; "
                f"allowed: {', '.join(allowed)}"
            )
        missing = [
            p.name
            for p in params
            if p.default is inspect.Parameter.empty
            and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
            and p.name not in kwargs
        ]
        if missing:
            raise ValueError(
                f"defense {name!r} requires argument(s) {', '.join(missing)}; "
                f"allowed: {', '.join(allowed)}"
            )
    return factory(**kwargs)


def _register_builtins() -> None:
    for name, cls in {
        "kap": KernelAveragePool,
        "kwta": KWinnersTakeAll,
        "kaf": KernelActivation,
        "topkconv": TopKConv2d,
        "dynamic_k": DynamicKLinear,
        "cas": ChannelActivationSuppression,
        "noise": ActivationNoise,
    }.items():
        register_defense(name, cls)


_register_builtins()
