"""The defense registry: everything the rest of the system knows about a defense, declared once.

Each defense module ends with one :func:`register_defense` call that names its layer, where
:func:`~defenses.build.build_model` puts it (a *placement*: parameters -> :class:`LayerSet`), the
parameters ``build_model`` accepts, its per-epoch training hook, and the traits the evaluation and
the plots read. Nothing outside the defense module names the defense: the study's spec validation,
training loop, checks and plots ask this registry. A third-party defense registers the same way,
from its own module (see docs/adding-a-defense.md).

``create_defense`` checks keyword arguments against the layer's signature up front, so a typo in a
spec fails with the list of allowed keywords instead of a ``TypeError`` deep inside a trial.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from torch import nn

if TYPE_CHECKING:
    from defenses.backbones import LayerSet

__all__ = [
    "BASELINE",
    "DefenseEntry",
    "EpochHook",
    "Example",
    "create_defense",
    "get_defense",
    "iter_defenses",
    "list_defenses",
    "make_epoch_hook",
    "register_defense",
    "unregister_defense",
]

#: The name of the undefended model (not a registered defense).
BASELINE = "none"

LayerFactory = Callable[..., nn.Module]
Placement = Callable[[Mapping[str, Any], int], "LayerSet"]
ParameterSelector = Callable[[nn.Module], Iterable[nn.Parameter]]


class EpochHook(Protocol):
    """Called at the start of every epoch; returns metrics to record for it.

    Two optional methods, used when present: ``finetune() -> (first_epoch, lr) | None``, a
    constant learning rate from that epoch on (the main LR schedule then spans the epochs before
    it), and ``reached(model) -> dict[str, float]``, the values the trained model ended with
    (k-WTA's ``kwta_gamma_reached``), recorded with the trial's results.
    """

    def start_epoch(self, model: nn.Module, epoch: int) -> dict[str, float]: ...


def make_epoch_hook(
    factory: Callable[..., EpochHook], params: Mapping[str, Any], epochs: int
) -> EpochHook:
    """``factory(params, epochs=epochs)``; a factory without an ``epochs`` keyword gets ``params``."""
    sig = _signature(factory)
    if sig is not None and "epochs" in sig.parameters:
        return factory(params, epochs=epochs)
    return factory(params)


@dataclass(frozen=True)
class Example:
    """A tiny instance of the layer and what its forward must look like (the contract tests).

    Attributes:
        make: Builds a small instance (fresh on every call).
        in_shape: Input shape it accepts.
        out_shape: Output shape it returns.
        stochastic_train: A fresh random sample on each training forward.
        mode_dependent: Train and eval compute different functions.
        labels: Number of classes when the layer needs the labels in training (CAS), else 0.
    """

    make: Callable[[], nn.Module]
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    stochastic_train: bool = False
    mode_dependent: bool = False
    labels: int = 0


@dataclass(frozen=True)
class DefenseEntry:
    """What the system knows about one defense.

    Attributes:
        name: Registry key, e.g. ``"kap"``.
        layer: The ``nn.Module`` class (or factory) behind :func:`create_defense`.
        place: ``(params, num_classes) -> LayerSet``: the sites ``build_model`` fills. None for a
            layer-only entry (usable with ``create_defense``, refused by ``build_model``).
        params: The ``defense_params`` keys ``build_model`` accepts (build-time and the
            training-time ones the training loop reads, e.g. k-WTA's schedule).
        training_fields: Defense parameters that set a field of the training config instead
            (``{"recipe": "recipe"}``: CAS searches its training recipe).
        epoch_hook: ``(params, epochs=) -> EpochHook`` for a per-epoch schedule (k-WTA's annealing);
            the ``epochs`` keyword (the trial's budget) is passed when the factory accepts it.
        no_weight_decay: ``model -> parameters``: the defense's own parameters in a built model
            that a training config with ``defense_weight_decay: false`` leaves out of weight
            decay (KAF's alpha, dictionary and bandwidth, as in the KAF thesis). None = none.
        routing: Selects units by argmax/top-k, so gradients can mislead (flag R13).
        color: Plot colour (hex), the same in every plot.
        in_default_study: Searched by a spec that lists no defenses.
        example: A tiny instance for the contract tests every registered layer must pass.
        cost_budget: (time, memory) ratio targets against the undefended training step at
            ResNet-18/CIFAR scale, checked by ``robust-study bench layers``; None = no target.
        paper: The publication, for tables and docs.
    """

    name: str
    layer: LayerFactory
    place: Placement | None = None
    params: tuple[str, ...] = ()
    training_fields: Mapping[str, str] = field(default_factory=dict)
    epoch_hook: Callable[..., EpochHook] | None = None
    routing: bool = False
    color: str | None = None
    in_default_study: bool = True
    example: Example | None = None
    cost_budget: tuple[float | None, float | None] | None = None
    paper: str = ""
    no_weight_decay: ParameterSelector | None = None


_REGISTRY: dict[str, DefenseEntry] = {}


def register_defense(
    name: str,
    layer: LayerFactory,
    *,
    place: Placement | None = None,
    params: tuple[str, ...] = (),
    training_fields: Mapping[str, str] | None = None,
    epoch_hook: Callable[..., EpochHook] | None = None,
    routing: bool = False,
    color: str | None = None,
    in_default_study: bool = True,
    example: Example | None = None,
    cost_budget: tuple[float | None, float | None] | None = None,
    paper: str = "",
    no_weight_decay: ParameterSelector | None = None,
) -> LayerFactory:
    """Register a defense under ``name`` (see :class:`DefenseEntry` for the fields).

    Returns:
        ``layer`` unchanged, so this can also be used inline.

    Raises:
        ValueError: if ``name`` is empty, the baseline's name or already registered (silently
            replacing a layer would change what every study using that name measures), ``layer``
            or ``place`` is not callable, or a training field is not among ``params``.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"defense name={name!r} must be a non-empty string")
    if name == BASELINE:
        raise ValueError(f"defense name {BASELINE!r} is reserved for the undefended model")
    if not callable(layer):
        raise ValueError(f"defense {name!r}: layer={layer!r} must be a callable returning an nn.Module")
    if place is not None and not callable(place):
        raise ValueError(f"defense {name!r}: place={place!r} must be callable")
    if no_weight_decay is not None and not callable(no_weight_decay):
        raise ValueError(f"defense {name!r}: no_weight_decay={no_weight_decay!r} must be callable")
    if name in _REGISTRY:
        raise ValueError(
            f"defense name={name!r} is already registered (to {_REGISTRY[name].layer!r}); "
            "choose another name"
        )
    fields = dict(training_fields or {})
    stray = sorted(set(fields) - set(params))
    if stray:
        raise ValueError(f"defense {name!r}: training_fields {stray} must be among params {list(params)}")
    _REGISTRY[name] = DefenseEntry(
        name=name, layer=layer, place=place, params=tuple(params), training_fields=fields,
        epoch_hook=epoch_hook, routing=bool(routing), color=color,
        in_default_study=bool(in_default_study), example=example, cost_budget=cost_budget, paper=paper,
        no_weight_decay=no_weight_decay,
    )
    return layer


def unregister_defense(name: str) -> None:
    """Remove a registration (tests and plug-in reloads); unknown names are ignored."""
    _REGISTRY.pop(name, None)


def list_defenses() -> list[str]:
    """Return the registered defense names, sorted."""
    return sorted(_REGISTRY)


def get_defense(name: str) -> DefenseEntry:
    """The registration of ``name``.

    Raises:
        ValueError: for an unknown name, listing the registered ones.
    """
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown defense {name!r}; allowed: {', '.join(list_defenses())}") from None


def iter_defenses() -> Iterator[DefenseEntry]:
    """Every registration, by name."""
    for name in list_defenses():
        yield _REGISTRY[name]


def _signature(factory: Callable[..., Any]) -> inspect.Signature | None:
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
    factory = get_defense(name).layer
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
