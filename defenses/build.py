"""``build_model``: a backbone with one defense at its paper sites, normalisation inside.

Each defense module registers its placement (docs/defenses.md): a function that turns
``defense_params`` into a :class:`~defenses.backbones.LayerSet`; the backbone then calls the
factories once per site. Parameters that belong to training (k-WTA's annealing schedule, CAS's
loss weight and recipe) are accepted so one flat trial config can be passed straight through,
and ignored here: the training loop reads them.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from defenses._placement import resolve_k
from defenses._registry import BASELINE, get_defense, list_defenses
from defenses.backbones import BACKBONES, HEAD_OPTIONS, HEADS, LayerSet, list_backbones, vgg16_map_side

__all__ = ["DEFENSE_PARAMS", "Normalize", "build_model", "check_head", "resolve_k"]


class _ParamsView(Mapping[str, tuple[str, ...]]):
    """For each buildable defense, the ``defense_params`` keys :func:`build_model` accepts.

    A live view of the registry (so a plug-in registered later shows up), not a second list.
    """

    def _names(self) -> list[str]:
        return [BASELINE] + [n for n in list_defenses() if get_defense(n).place is not None]

    def __getitem__(self, name: str) -> tuple[str, ...]:
        if name == BASELINE:
            return ()
        entry = get_defense(name) if name in list_defenses() else None
        if entry is None or entry.place is None:
            raise KeyError(name)
        return entry.params

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __len__(self) -> int:
        return len(self._names())


DEFENSE_PARAMS: Mapping[str, tuple[str, ...]] = _ParamsView()


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
        self.mean: Tensor
        self.std: Tensor
        self.register_buffer("mean", mean_t.reshape(1, n))
        self.register_buffer("std", std_t.reshape(1, n))

    def forward(self, x: Tensor) -> Tensor:
        shape = (1, self.mean.shape[1]) + (1,) * (x.dim() - 2)
        return (x - self.mean.reshape(shape)) / self.std.reshape(shape)


def check_head(backbone: str, head: str, input_size: int | None) -> None:
    """Refuse a classifier head the backbone does not offer or the input size does not allow.

    Raises:
        ValueError: one line naming the head, the backbone and what is allowed.
    """
    offered = HEAD_OPTIONS.get(backbone, ("gap",))
    if head not in offered:
        others = sorted(b for b, heads in HEAD_OPTIONS.items() if head in heads)
        raise ValueError(
            f"head={head!r} is not offered for {backbone}; allowed: {', '.join(offered)}"
            + (f" ({head!r} only for {', '.join(others)})" if others else f" (heads: {', '.join(HEADS)})")
        )
    if backbone == "vgg16":
        vgg16_map_side(input_size, head)


def _place_baseline(params: Mapping[str, Any], num_classes: int) -> LayerSet:
    return LayerSet()


def _scaled_width(width: float, scale: float) -> float:
    # The backbone validates width itself; only a valid number is scaled here.
    if isinstance(width, bool) or not isinstance(width, (int, float)):
        return width
    return width * scale


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
    head: str = "gap",
    input_size: int | None = None,
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
            default (or the defaults in the defense module's placement).
            ``k`` is a fraction in (0, 1] of the channels/features or an int count.
        mean: Per-channel input mean (length ``in_channels``) or None.
        std: Per-channel input std (length ``in_channels``) or None.
        width: Channel multiplier (ints as in the papers; fractions allowed for quick studies).
        head: "gap" (average-pool the last map, every backbone) or "flatten" (flatten it without
            pooling: VGG-16's head in the TopKConv paper; vgg16 only, inputs >= 32x32).
        input_size: Side H = W of the inputs; needed by ``head="flatten"``.

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
    name = BASELINE if defense is None else defense
    try:
        place = _place_baseline if name == BASELINE else get_defense(name).place
    except ValueError:
        place = None
    if place is None:
        raise ValueError(
            f"unknown defense {defense!r}; allowed: None, {', '.join(sorted(DEFENSE_PARAMS))}"
        )
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
    check_head(backbone, head, input_size)
    head_args: dict[str, Any] = {"head": head, "input_size": input_size} if head != "gap" else {}
    normalize = Normalize(mean, std, channels=in_channels)
    layers = place(params, num_classes)
    if layers.width_scale != 1:
        width = _scaled_width(width, layers.width_scale)
    net = make_backbone(
        num_classes=num_classes, in_channels=in_channels, width=width, layers=layers, **head_args
    )
    return nn.Sequential(OrderedDict(normalize=normalize, net=net))
