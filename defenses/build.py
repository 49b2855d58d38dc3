"""``build_model``: a backbone with one defense at its paper sites, normalisation inside.

Placement per defense (docs/defenses.md) is a table of small functions that turn
``defense_params`` into a :class:`~defenses.backbones.LayerSet`; the backbone then calls the
factories once per site. Parameters that belong to training (k-WTA's annealing schedule, CAS's
loss weight and recipe) are accepted so one flat trial config can be passed straight through,
and ignored here: the training loop reads them.
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from defenses.backbones import BACKBONES, LayerSet, list_backbones
from defenses.cas import ChannelActivationSuppression
from defenses.kaf import KernelActivation
from defenses.kap import KernelAveragePool, kap_width_factor
from defenses.kwta import KWinnersTakeAll
from defenses.noise import ActivationNoise
from defenses.topk import DynamicKLinear, TopKConv2d

__all__ = ["DEFENSE_PARAMS", "Normalize", "build_model", "resolve_k"]

#: For each defense, the keys :func:`build_model` accepts in ``defense_params``.
#: Names equal the layer constructors' keyword names where a layer takes them.
DEFENSE_PARAMS: dict[str, tuple[str, ...]] = {
    # sigma > 0 adds ActivationNoise after every KAP; noise_at_eval keeps it in eval mode
    # (the authors' stochastic deployment).
    "kap": ("kernel_size", "stride", "dims", "mode", "count_include_pad", "sigma", "noise_at_eval"),
    "noise": ("sigma", "at_eval"),
    # gamma = target sparsity; gamma_start/step/every are the training loop's annealing schedule.
    "kwta": ("gamma", "mode", "gamma_start", "gamma_step", "gamma_every"),
    "kaf": ("dictionary_size", "boundary", "bandwidth", "init", "trainable_dictionary"),
    # layers = how many of the last main-path convs become TopKConv2d.
    "topkconv": ("k", "criterion", "layers"),
    "dynamic_k": ("k",),
    # beta (aux loss weight) and recipe (AT/TRADES/MART) are read by the training loop.
    "cas": ("placement", "beta", "recipe"),
}

#: Defaults of the build-level parameters (layer keywords default to the layer's own defaults).
KAP_SIGMA = 0.0
TOPKCONV_K = 0.1  # Eigen & Sadovnik: k = 10% of the channels
TOPKCONV_LAYERS = 2  # ... in the two convs before the FC layers
DYNAMIC_K = 0.02  # Eigen & Sadovnik: k = 10 of 512 in the final FC layer
CAS_PLACEMENTS: dict[str, int] = {"last": 1, "last2": 2, "last3": 3}
CAS_PLACEMENT = "last2"  # Bai et al.: both blocks of ResNet-18's layer4 works best


class Normalize(nn.Module):
    """Per-channel ``(x - mean) / std`` as the model's first layer.

    Keeping normalisation inside the model (as RobustBench does) lets attacks work in the
    [0, 1] input space and ε mean what the papers mean.

    Args:
        mean: Per-channel means, or None for 0.
        std: Per-channel standard deviations (> 0), or None for 1.
        channels: Expected channel count; required only to check lengths.

    Shape:
        (N, C, H, W) or (N, C) -> same.
    """

    def __init__(
        self,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        channels: int | None = None,
    ) -> None:
        super().__init__()
        lengths = {len(v) for v in (mean, std) if v is not None}
        if channels is not None:
            lengths.add(channels)
        if len(lengths) > 1:
            raise ValueError(
                f"mean={mean!r} and std={std!r} must each have length in_channels={channels}"
            )
        n = lengths.pop() if lengths else 1
        mean_t = torch.zeros(n) if mean is None else torch.as_tensor(mean, dtype=torch.float32)
        std_t = torch.ones(n) if std is None else torch.as_tensor(std, dtype=torch.float32)
        if not bool(torch.isfinite(mean_t).all()):
            raise ValueError(f"mean={mean!r} must be finite")
        if not bool((std_t > 0).all()) or not bool(torch.isfinite(std_t).all()):
            raise ValueError(f"std={std!r} must be finite and > 0")
        self.register_buffer("mean", mean_t.reshape(1, n))
        self.register_buffer("std", std_t.reshape(1, n))

    def forward(self, x: Tensor) -> Tensor:
        shape = (1, self.mean.shape[1]) + (1,) * (x.dim() - 2)
        return (x - self.mean.reshape(shape)) / self.std.reshape(shape)


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
    _check_k(k, layer)
    if isinstance(k, numbers.Integral):
        if k > n:
            raise ValueError(f"k={k} must be in [1, {what}={n}] for {layer}")
        return int(k)
    return max(1, int(round(float(k) * n)))


def _check_k(k: float, layer: str) -> None:
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


def _default(factory: Callable[..., Any], name: str) -> Any:
    return inspect.signature(factory).parameters[name].default


def _pick(params: Mapping[str, Any], keys: Sequence[str]) -> dict[str, Any]:
    return {key: params[key] for key in keys if key in params}


def _nonneg_float(params: Mapping[str, Any], key: str, default: float) -> float:
    value = params.get(key, default)
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value >= 0:
        raise ValueError(f"{key}={value!r} must be a number >= 0")
    return float(value)


def _flag(params: Mapping[str, Any], key: str, default: bool) -> bool:
    value = params.get(key, default)
    if not isinstance(value, bool):
        raise ValueError(f"{key}={value!r} must be True or False")
    return value


def _layers_none(params: Mapping[str, Any], num_classes: int) -> LayerSet:
    return LayerSet()


def _layers_kap(params: Mapping[str, Any], num_classes: int) -> LayerSet:
    """KAP (+ noise) after every conv + BN, convs widened by KAP's channel reduction."""
    kap_kwargs = _pick(params, ("kernel_size", "stride", "dims", "mode", "count_include_pad"))
    KernelAveragePool(**kap_kwargs)  # validate once, before building a whole network
    stride = kap_kwargs.get("stride", _default(KernelAveragePool, "stride"))
    dims = kap_kwargs.get("dims", _default(KernelAveragePool, "dims"))
    factor = kap_width_factor(stride, dims)
    sigma = _nonneg_float(params, "sigma", KAP_SIGMA)
    at_eval = _flag(params, "noise_at_eval", False)

    def post_conv(channels: int) -> nn.Module:
        kap = KernelAveragePool(**kap_kwargs)
        try:
            out = kap.out_channels(channels)
        except ValueError as err:
            raise ValueError(
                f"KernelAveragePool({kap_kwargs}) cannot map the widened {channels} channels back "
                f"to the nominal {channels // factor}: {err}"
            ) from err
        if out * factor != channels:
            raise ValueError(
                f"KernelAveragePool({kap_kwargs}) maps the widened {channels} channels to {out}, "
                f"not the nominal {channels // factor}; choose kernel_size/stride/dims "
                f"(or width) so the channels divide evenly"
            )
        if sigma > 0:
            return nn.Sequential(kap, ActivationNoise(sigma, at_eval=at_eval))
        return kap

    return LayerSet(post_conv=post_conv, conv_width=factor)


def _layers_noise(params: Mapping[str, Any], num_classes: int) -> LayerSet:
    """The Gaussian-noise baseline at KAP's sites, without KAP."""
    kwargs = _pick(params, ("sigma", "at_eval"))
    ActivationNoise(**kwargs)
    return LayerSet(post_conv=lambda channels: ActivationNoise(**kwargs))


def _layers_kwta(params: Mapping[str, Any], num_classes: int) -> LayerSet:
    """k-WTA in place of every activation (one module per site, so set_gamma reaches all)."""
    kwargs = _pick(params, ("gamma", "mode"))
    KWinnersTakeAll(**kwargs)
    return LayerSet(act=lambda channels: KWinnersTakeAll(**kwargs))


def _layers_kaf(params: Mapping[str, Any], num_classes: int) -> LayerSet:
    """A KAF (own alpha per channel/neuron) in place of every activation."""
    kwargs = _pick(
        params, ("dictionary_size", "boundary", "bandwidth", "init", "trainable_dictionary")
    )
    KernelActivation(1, **kwargs)
    return LayerSet(act=lambda channels: KernelActivation(channels, **kwargs))


def _layers_topkconv(params: Mapping[str, Any], num_classes: int) -> LayerSet:
    """TopKConv2d for the last ``layers`` main-path convs."""
    k = params.get("k", TOPKCONV_K)
    criterion = params.get("criterion", _default(TopKConv2d, "criterion"))
    n_layers = params.get("layers", TOPKCONV_LAYERS)
    if isinstance(n_layers, bool) or not isinstance(n_layers, numbers.Integral) or n_layers < 1:
        raise ValueError(f"layers={n_layers!r} must be an int >= 1 (paper: 2)")
    _check_k(k, "TopKConv2d")

    def last_conv(cin: int, cout: int, kernel: int, stride: int, padding: int) -> nn.Module:
        # "neuron" keeps k output channels; "max"/"sum" keep k input channels per output.
        n, what = (cout, "out_channels") if criterion == "neuron" else (cin, "in_channels")
        kk = resolve_k(k, n, what=what, layer=f"TopKConv2d({cin}->{cout})")
        return TopKConv2d(
            cin, cout, kernel, k=kk, criterion=criterion, stride=stride, padding=padding,
            bias=False,
        )

    return LayerSet(last_conv=last_conv, n_last_convs=int(n_layers))


def _layers_dynamic_k(params: Mapping[str, Any], num_classes: int) -> LayerSet:
    """Dynamic-k in every FC layer (the single classifier of small_cnn/ResNets, both of VGG)."""
    k = params.get("k", DYNAMIC_K)
    _check_k(k, "DynamicKLinear")

    def fc(fin: int, fout: int) -> nn.Module:
        kk = resolve_k(k, fin, what="in_features", layer=f"DynamicKLinear({fin}->{fout})")
        return DynamicKLinear(fin, fout, k=kk)

    return LayerSet(linear=fc)


def _layers_cas(params: Mapping[str, Any], num_classes: int) -> LayerSet:
    """CAS after the last one/two/three blocks."""
    placement = params.get("placement", CAS_PLACEMENT)
    if placement not in CAS_PLACEMENTS:
        raise ValueError(
            f"placement={placement!r} must be one of {', '.join(map(repr, CAS_PLACEMENTS))}"
        )
    return LayerSet(
        block_out=lambda channels: ChannelActivationSuppression(channels, num_classes),
        n_block_out=CAS_PLACEMENTS[placement],
    )


_PLACEMENT: dict[str, Callable[[Mapping[str, Any], int], LayerSet]] = {
    "none": _layers_none,
    "kap": _layers_kap,
    "noise": _layers_noise,
    "kwta": _layers_kwta,
    "kaf": _layers_kaf,
    "topkconv": _layers_topkconv,
    "dynamic_k": _layers_dynamic_k,
    "cas": _layers_cas,
}


def build_model(
    backbone: str,
    *,
    num_classes: int,
    in_channels: int,
    defense: str | None = None,
    defense_params: Mapping[str, Any] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    width: float = 1,
) -> nn.Module:
    """Build ``Normalize -> backbone`` with ``defense`` at its paper sites.

    Sites (docs/defenses.md): ``kap`` after every conv + BN (convs widened by
    ``kap_width_factor`` so stride > 1 keeps the nominal channels; ``sigma > 0`` adds
    ``ActivationNoise``); ``noise`` the same sites without KAP; ``kwta`` and ``kaf`` replace
    every activation, heads included; ``topkconv`` the last ``layers`` main-path convs;
    ``dynamic_k`` every FC layer; ``cas`` after the last block(s) (``placement``).

    Args:
        backbone: One of :func:`list_backbones`.
        num_classes: Number of logits.
        in_channels: Input image channels.
        defense: A key of :data:`DEFENSE_PARAMS`, or None/"none" for the undefended baseline.
        defense_params: Keys from ``DEFENSE_PARAMS[defense]``; omitted keys take the layer's
            default (or this module's ``KAP_SIGMA``/``TOPKCONV_*``/``DYNAMIC_K``/``CAS_PLACEMENT``).
            ``k`` is a fraction in (0, 1] of the channels/features or an int count.
        mean: Per-channel input mean (length ``in_channels``) or None.
        std: Per-channel input std (length ``in_channels``) or None.
        width: Channel multiplier (ints as in the papers; fractions allowed for quick studies).

    Returns:
        ``nn.Sequential(normalize=Normalize, net=backbone)`` taking inputs in [0, 1] and
        returning logits of shape (N, num_classes).

    Raises:
        ValueError: for an unknown backbone, defense or parameter (naming the allowed ones), or
            an out-of-range value.

    Examples::

        >>> model = build_model("resnet18", num_classes=10, in_channels=3, defense="kap",
        ...                     defense_params={"kernel_size": 3, "sigma": 0.1})
    """
    try:
        make_backbone = BACKBONES[backbone]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown backbone {backbone!r}; allowed: {', '.join(list_backbones())}"
        ) from None
    name = "none" if defense is None else defense
    try:
        place = _PLACEMENT[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown defense {defense!r}; allowed: None, {', '.join(sorted(_PLACEMENT))}"
        ) from None
    params = dict(defense_params or {})
    allowed = DEFENSE_PARAMS.get(name, ())
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ValueError(
            f"unknown defense_params {', '.join(map(repr, unknown))} for defense {defense!r}; "
            f"allowed: {', '.join(allowed) if allowed else 'none'}"
        )
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes={num_classes!r} must be an int >= 1")
    if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
        raise ValueError(f"in_channels={in_channels!r} must be an int >= 1")
    normalize = Normalize(mean, std, channels=in_channels)
    layers = place(params, num_classes)
    net = make_backbone(
        num_classes=num_classes, in_channels=in_channels, width=width, layers=layers
    )
    return nn.Sequential(OrderedDict(normalize=normalize, net=net))
