"""Backbones that receive their layers as constructor arguments.

Like timm's ``ResNet(act_layer=...)``, every backbone takes a :class:`LayerSet` of factories and
calls each factory once per call site, so every site owns its own module (a trainable KAF or a
k-WTA with its own ``gamma`` is never shared by accident). The defenses are placed where their
papers put them by filling in the matching factory (see :func:`defenses.build.build_model`):

* ``act(channels)``: every nonlinearity, including the ones in classifier heads (k-WTA, KAF).
* ``post_conv(channels)``: after every conv + BN (KAP + noise). Convs followed by it output
  ``nominal * conv_width`` channels and BN runs on those; ``post_conv`` must map them back to the
  nominal count (Bashivan et al., "Learning robust kernel ensembles with kernel average pooling",
  appendix A.3: widen the network by the factor KAP's stride removes).
* ``last_conv(in, out, kernel, stride, padding)``: the last ``n_last_convs`` main-path convs
  (TopKConv; Eigen & Sadovnik put it in the two convs before the FC layers).
* ``linear(in, out)``: every fully connected layer (Dynamic-k); ``last_linear(in, out)``, when
  set, the classifier alone (the last FC layer), so a defense can give it its own settings
  (TopKConv's Dynamic-k heads: k = 250 of 25,088 in the penultimate FC layer, 10 of 512 in the last).
* ``block_out(channels)``: after each of the last ``n_block_out`` blocks (CAS; Bai et al.,
  "Improving adversarial robustness via channel-wise activation suppressing").

Blocks, for ``block_out``: the conv blocks of ``small_cnn`` (the site sits before block 2's
max-pool), the residual BasicBlocks of the ResNets (after the block's final activation, so
ResNet-18 with ``n_block_out=2`` matches CAS's best placement: both blocks of layer4), and each
conv layer of ``vgg16`` (after its activation, before any pooling).

ResNet shortcut convs (1x1 conv + BN) also get ``post_conv`` and the widening, so the two
branches have equal shapes whatever ``post_conv`` does to channels; they are not counted as
"last convs" (only main-path convs are).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = [
    "BACKBONES",
    "HEADS",
    "HEAD_OPTIONS",
    "LayerSet",
    "list_backbones",
    "resnet18",
    "resnet20",
    "small_cnn",
    "vgg16",
    "vgg16_map_side",
]

ChannelFactory = Callable[[int], nn.Module]
ConvFactory = Callable[[int, int, int, int, int], nn.Module]
LinearFactory = Callable[[int, int], nn.Module]


def relu(channels: int) -> nn.Module:
    """Default activation factory. Not in-place: hooks on activations (common when analysing
    defenses) and post_conv layers that keep their output for backward stay safe."""
    return nn.ReLU()


def identity(channels: int) -> nn.Module:
    """Default factory for optional sites."""
    return nn.Identity()


def conv2d(
    in_channels: int, out_channels: int, kernel_size: int, stride: int, padding: int
) -> nn.Module:
    """Default conv factory; no bias because BatchNorm follows every conv."""
    return nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, bias=False)


def linear(in_features: int, out_features: int) -> nn.Module:
    """Default fully connected factory."""
    return nn.Linear(in_features, out_features)


@dataclass(frozen=True)
class LayerSet:
    """The per-site layer factories a backbone is built from.

    Args:
        act: ``act(channels) -> Module``, every activation (ReLU by default).
        post_conv: ``post_conv(channels) -> Module`` after every conv + BN (Identity by default).
            It receives the widened channel count ``nominal * conv_width``.
        conv_width: Integer factor by which every conv followed by ``post_conv`` is widened;
            ``post_conv`` must reduce the channels by exactly this factor.
        width_scale: Factor (> 0) :func:`~defenses.build.build_model` multiplies the backbone's
            ``width`` by: every nominal width (between the post_conv sites, and the dense layers)
            scales with it (KAP's literal widening reading, see docs/defenses.md).
        last_conv: ``last_conv(in, out, kernel, stride, padding) -> Module`` for the last
            ``n_last_convs`` main-path convs (BN follows, so no bias is needed).
        n_last_convs: How many of the last main-path convs use ``last_conv`` (0 = none).
        last_conv_norm: ``last_conv`` modules normalise their own output, so the backbone puts no
            BatchNorm after them (TKC-neuron: BN over the kept channels only, pruned ones zeroed
            after it).
        linear: ``linear(in, out) -> Module`` for every fully connected layer.
        last_linear: ``last_linear(in, out) -> Module`` for the classifier (the last FC layer);
            None = ``linear``.
        block_out: ``block_out(channels) -> Module`` after each of the last ``n_block_out`` blocks.
        n_block_out: How many of the last blocks are followed by ``block_out`` (0 = none).
        dense_act: ``dense_act(features) -> Module``, the activations between fully connected
            layers (VGG-16's head); None = ``act``.
    """

    act: ChannelFactory = relu
    post_conv: ChannelFactory = identity
    conv_width: int = 1
    width_scale: float = 1.0
    last_conv: ConvFactory = conv2d
    n_last_convs: int = 0
    last_conv_norm: bool = False
    linear: LinearFactory = linear
    last_linear: LinearFactory | None = None
    block_out: ChannelFactory = identity
    n_block_out: int = 0
    dense_act: ChannelFactory | None = None

    def __post_init__(self) -> None:
        for field_name in ("conv_width",):
            value = getattr(self, field_name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{field_name}={value!r} must be an int >= 1")
        scale = self.width_scale
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not (0 < scale < math.inf):
            raise ValueError(f"width_scale={scale!r} must be a finite number > 0")
        for field_name in ("n_last_convs", "n_block_out"):
            value = getattr(self, field_name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{field_name}={value!r} must be an int >= 0")
        for field_name in ("act", "post_conv", "last_conv", "linear", "block_out"):
            if not callable(getattr(self, field_name)):
                raise ValueError(f"{field_name}={getattr(self, field_name)!r} must be callable")
        if self.last_linear is not None and not callable(self.last_linear):
            raise ValueError(f"last_linear={self.last_linear!r} must be callable or None")
        if not isinstance(self.last_conv_norm, bool):
            raise ValueError(f"last_conv_norm={self.last_conv_norm!r} must be True or False")
        if self.dense_act is not None and not callable(self.dense_act):
            raise ValueError(f"dense_act={self.dense_act!r} must be callable or None")

    def classifier(self, in_features: int, out_features: int) -> nn.Module:
        """The last FC layer: ``last_linear`` when set, else ``linear``."""
        return (self.last_linear or self.linear)(in_features, out_features)


def scale_channels(channels: int, width: float) -> int:
    """Nominal channel count ``channels * width`` (rounded, at least 1)."""
    return max(1, int(round(channels * width)))


def _check_width(width: float) -> float:
    if isinstance(width, bool) or not isinstance(width, (int, float)) or not math.isfinite(width):
        raise ValueError(f"width={width!r} must be a positive number")
    if width <= 0:
        raise ValueError(f"width={width!r} must be > 0")
    return width


def _check_counts(num_classes: int, in_channels: int) -> None:
    for name, value in (("num_classes", num_classes), ("in_channels", in_channels)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be an int >= 1")


class _Sites:
    """Hands out conv units and block outputs in network order.

    Knowing the totals in advance lets it decide which convs are "the last n" and which
    blocks are "the last n" while the network is being constructed front to back.
    """

    def __init__(self, layers: LayerSet, n_convs: int, n_blocks: int, backbone: str) -> None:
        if layers.n_last_convs > n_convs:
            raise ValueError(
                f"n_last_convs={layers.n_last_convs} must be in [0, {n_convs}] for {backbone}"
            )
        if layers.n_block_out > n_blocks:
            raise ValueError(
                f"n_block_out={layers.n_block_out} must be in [0, {n_blocks}] for {backbone}"
            )
        self.layers = layers
        self._n_convs, self._n_blocks = n_convs, n_blocks
        self._conv_i = self._block_i = 0

    def conv_unit(
        self, in_channels: int, out_channels: int, kernel_size: int, stride: int, padding: int
    ) -> nn.Sequential:
        """conv -> BN -> post_conv for a main-path conv with ``out_channels`` nominal outputs."""
        lay = self.layers
        wide = out_channels * lay.conv_width
        is_last = self._conv_i >= self._n_convs - lay.n_last_convs
        self._conv_i += 1
        make_conv = lay.last_conv if is_last else conv2d
        norm: nn.Module = nn.Identity() if is_last and lay.last_conv_norm else nn.BatchNorm2d(wide)
        return nn.Sequential(
            OrderedDict(
                conv=make_conv(in_channels, wide, kernel_size, stride, padding),
                bn=norm,
                post=lay.post_conv(wide),
            )
        )

    def shortcut_unit(self, in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
        """1x1 conv -> BN -> post_conv projection shortcut (not a "last conv" candidate)."""
        wide = out_channels * self.layers.conv_width
        return nn.Sequential(
            OrderedDict(
                conv=conv2d(in_channels, wide, 1, stride, 0),
                bn=nn.BatchNorm2d(wide),
                post=self.layers.post_conv(wide),
            )
        )

    def block_out(self, channels: int) -> nn.Module:
        is_site = self._block_i >= self._n_blocks - self.layers.n_block_out
        self._block_i += 1
        return self.layers.block_out(channels) if is_site else nn.Identity()

    def check_done(self) -> None:
        # Guards the hand-counted totals in each backbone against drifting from the structure.
        if (self._conv_i, self._block_i) != (self._n_convs, self._n_blocks):
            raise RuntimeError(
                f"backbone built {self._conv_i} convs/{self._block_i} blocks, "
                f"expected {self._n_convs}/{self._n_blocks}"
            )


def wants_grad(x: Tensor) -> bool:
    """Autograd will ask for gradients through ``x`` (training, gradient attacks); otherwise a
    max-pool can skip the indices its backward would need (MaxPool2x2, Kernel Max Pool)."""
    return torch.is_grad_enabled() and x.requires_grad


class MaxPool2x2(nn.MaxPool2d):
    """``nn.MaxPool2d(2, ceil_mode=True)`` that skips max indices when no gradient is wanted.

    Why: on CPU, PyTorch's max_pool2d scans each (sample, channel) plane recording indices; in
    forward-only passes (an attack's queries, evaluation) that was a quarter of a small CNN's
    forward. Two strided elementwise maxima give the same values (a maximum is exact; an odd
    side is padded with -inf, which never wins, as ceil_mode's partial window) in a tenth of
    the time. With autograd on it is the parent's pooling, gradients and all.
    """

    def __init__(self) -> None:
        super().__init__(2, ceil_mode=True)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or 0 in x.shape[2:] or wants_grad(x):
            return super().forward(x)  # PyTorch's pooling, its errors for empty maps included
        if x.shape[2] % 2 or x.shape[3] % 2:
            x = nn.functional.pad(x, (0, x.shape[3] % 2, 0, x.shape[2] % 2), value=float("-inf"))
        rows = torch.maximum(x[:, :, 0::2], x[:, :, 1::2])
        return torch.maximum(rows[..., 0::2], rows[..., 1::2])


class ConvBlock(nn.Module):
    """conv -> BN -> post_conv -> act, then the optional block output site."""

    def __init__(
        self,
        sites: _Sites,
        in_channels: int,
        out_channels: int,
        *,
        is_block: bool = True,
    ) -> None:
        super().__init__()
        self.unit = sites.conv_unit(in_channels, out_channels, 3, 1, 1)
        self.act = sites.layers.act(out_channels)
        self.post_block = sites.block_out(out_channels) if is_block else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.post_block(self.act(self.unit(x)))


class BasicBlock(nn.Module):
    """He et al. "Deep residual learning" BasicBlock with layer sites.

    Shape:
        (N, in_channels, H, W) -> (N, out_channels, H/stride, W/stride)
    """

    def __init__(self, sites: _Sites, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        act = sites.layers.act
        self.unit1 = sites.conv_unit(in_channels, out_channels, 3, stride, 1)
        self.act1 = act(out_channels)
        self.unit2 = sites.conv_unit(out_channels, out_channels, 3, 1, 1)
        self.shortcut: nn.Module = (
            sites.shortcut_unit(in_channels, out_channels, stride)
            if stride != 1 or in_channels != out_channels
            else nn.Identity()
        )
        self.act2 = act(out_channels)
        self.post_block = sites.block_out(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        out = self.unit2(self.act1(self.unit1(x)))
        return self.post_block(self.act2(out + self.shortcut(x)))


class _Head(nn.Module):
    """Global average pool, flatten, then the given FC stack."""

    def __init__(self, fc: nn.Module) -> None:
        super().__init__()
        self.fc = fc

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class SmallCNN(nn.Module):
    """Three conv blocks (32-64-128 x width) for 8x8 digits, max-pool after block 2, GAP, FC.

    Shape:
        (N, in_channels, H, W) -> (N, num_classes)
    """

    def __init__(
        self, *, num_classes: int, in_channels: int = 1, width: float = 1, layers: LayerSet
    ) -> None:
        super().__init__()
        _check_counts(num_classes, in_channels)
        c1, c2, c3 = (scale_channels(c, _check_width(width)) for c in (32, 64, 128))
        sites = _Sites(layers, n_convs=3, n_blocks=3, backbone="small_cnn")
        self.features = nn.Sequential(
            ConvBlock(sites, in_channels, c1),
            ConvBlock(sites, c1, c2),
            MaxPool2x2(),
            ConvBlock(sites, c2, c3),
        )
        self.head = _Head(layers.classifier(c3, num_classes))
        sites.check_done()

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


class CifarResNet(nn.Module):
    """CIFAR ResNet (He et al.): 3x3 stem, no stem pooling, BasicBlock stages, GAP, FC.

    Args:
        stage_channels: Nominal channels per stage (before ``width``).
        blocks_per_stage: BasicBlocks per stage; stage s > 0 starts with stride 2.

    Shape:
        (N, in_channels, H, W) -> (N, num_classes)
    """

    def __init__(
        self,
        *,
        stage_channels: tuple[int, ...],
        blocks_per_stage: tuple[int, ...],
        num_classes: int,
        in_channels: int = 3,
        width: float = 1,
        layers: LayerSet,
        name: str = "resnet",
    ) -> None:
        super().__init__()
        _check_counts(num_classes, in_channels)
        _check_width(width)
        chans = [scale_channels(c, width) for c in stage_channels]
        n_blocks = sum(blocks_per_stage)
        sites = _Sites(layers, n_convs=1 + 2 * n_blocks, n_blocks=n_blocks, backbone=name)
        self.stem = sites.conv_unit(in_channels, chans[0], 3, 1, 1)
        self.stem_act = layers.act(chans[0])
        stages: list[nn.Module] = []
        prev = chans[0]
        for s, (c, n) in enumerate(zip(chans, blocks_per_stage, strict=True)):
            blocks = []
            for b in range(n):
                blocks.append(BasicBlock(sites, prev, c, stride=2 if s > 0 and b == 0 else 1))
                prev = c
            stages.append(nn.Sequential(*blocks))
        # Named layer1..layerN like torchvision so CAS sites read "layer4.0", "layer4.1".
        for s, stage in enumerate(stages, start=1):
            self.add_module(f"layer{s}", stage)
        self._n_stages = len(stages)
        self.head = _Head(layers.classifier(prev, num_classes))
        sites.check_done()

    def forward(self, x: Tensor) -> Tensor:
        out = self.stem_act(self.stem(x))
        for s in range(1, self._n_stages + 1):
            out = getattr(self, f"layer{s}")(out)
        return self.head(out)


# Simonyan & Zisserman configuration D (VGG-16): conv widths, "M" = 2x2 max-pool.
_VGG16_CFG: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M",
)


HEADS: tuple[str, ...] = ("gap", "flatten")
# Below this side VGG-16's five 2x2 max-pools no longer see whole windows (ceil_mode pads them):
# there is no spatial map left for a flatten head to keep.
_VGG16_FLATTEN_MIN_SIZE = 32


class _FlattenHead(nn.Module):
    """Flatten the whole feature map (no pooling), then the given FC stack (VGG's own head)."""

    def __init__(self, fc: nn.Module) -> None:
        super().__init__()
        self.fc = fc

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(x, 1))


def vgg16_map_side(input_size: object, head: str) -> int:
    """Side of VGG-16's last feature map for ``head``: 1 (average-pooled) or the flattened map's."""
    if head not in HEADS:
        raise ValueError(f"head={head!r} must be one of {', '.join(HEADS)}")
    if head == "gap":
        return 1
    if isinstance(input_size, bool) or not isinstance(input_size, int):
        raise ValueError(
            f"head='flatten' needs the input size (an int); got input_size={input_size!r}"
        )
    if input_size < _VGG16_FLATTEN_MIN_SIZE:
        raise ValueError(
            f"head='flatten' needs inputs of at least {_VGG16_FLATTEN_MIN_SIZE}x"
            f"{_VGG16_FLATTEN_MIN_SIZE} for vgg16 (five 2x2 max-pools); got {input_size}x"
            f"{input_size}: use head 'gap'"
        )
    side = input_size
    for v in _VGG16_CFG:
        if v == "M":
            side = -(-side // 2)  # ceil_mode pooling
    return side


class VGG16(nn.Module):
    """CIFAR VGG-16 with BatchNorm (config D) and the TopKConv paper's two FC layers.

    Eigen & Sadovnik ("TopKConv: increased adversarial robustness through deeper
    interpretability") use VGG-16 with TopKConv in the two convs before the FC layers and
    Dynamic-k in both FC layers: here ``Linear(F, 512w) -> act -> Linear(512w, classes)``.
    ``head="gap"`` (default) average-pools the last map to 1x1 (F = 512w); pools use ``ceil_mode``
    so inputs smaller than 32x32 (e.g. 8x8 digits) pass. ``head="flatten"`` is the paper's head:
    the last map is flattened without pooling (at 224x224, F = 512 * 7 * 7 = 25,088); it needs
    ``input_size`` >= 32.

    Shape:
        (N, in_channels, H, W) -> (N, num_classes)
    """

    def __init__(
        self,
        *,
        num_classes: int,
        in_channels: int = 3,
        width: float = 1,
        layers: LayerSet,
        head: str = "gap",
        input_size: int | None = None,
    ) -> None:
        super().__init__()
        _check_counts(num_classes, in_channels)
        _check_width(width)
        side = vgg16_map_side(input_size, head)
        n_convs = sum(1 for v in _VGG16_CFG if v != "M")
        sites = _Sites(layers, n_convs=n_convs, n_blocks=n_convs, backbone="vgg16")
        feats: list[nn.Module] = []
        prev = in_channels
        for v in _VGG16_CFG:
            if v == "M":
                feats.append(MaxPool2x2())
            else:
                c = scale_channels(int(v), width)
                feats.append(ConvBlock(sites, prev, c))
                prev = c
        self.features = nn.Sequential(*feats)
        hidden = scale_channels(512, width)
        fc = nn.Sequential(
            OrderedDict(
                fc1=layers.linear(prev * side * side, hidden),
                act=(layers.dense_act or layers.act)(hidden),
                fc2=layers.classifier(hidden, num_classes),
            )
        )
        self.head: nn.Module = _FlattenHead(fc) if head == "flatten" else _Head(fc)
        sites.check_done()

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def small_cnn(
    *, num_classes: int, in_channels: int = 1, width: float = 1, layers: LayerSet | None = None
) -> nn.Module:
    """The 3-conv digits network (see :class:`SmallCNN`)."""
    return SmallCNN(
        num_classes=num_classes, in_channels=in_channels, width=width, layers=layers or LayerSet()
    )


def resnet18(
    *, num_classes: int, in_channels: int = 3, width: float = 1, layers: LayerSet | None = None
) -> nn.Module:
    """CIFAR ResNet-18: BasicBlocks [2, 2, 2, 2], 64-128-256-512 x width.

    The network of the KAP, k-WTA and CAS papers.
    """
    return CifarResNet(
        stage_channels=(64, 128, 256, 512),
        blocks_per_stage=(2, 2, 2, 2),
        num_classes=num_classes,
        in_channels=in_channels,
        width=width,
        layers=layers or LayerSet(),
        name="resnet18",
    )


def resnet20(
    *, num_classes: int, in_channels: int = 3, width: float = 1, layers: LayerSet | None = None
) -> nn.Module:
    """CIFAR ResNet-20: 3 stages x 3 BasicBlocks, 16-32-64 x width (the KAF thesis).

    Uses 1x1-conv projection shortcuts (He et al.'s option B) rather than option A's
    zero-padding, so every backbone treats shortcuts, and KAP on them, the same way.
    """
    return CifarResNet(
        stage_channels=(16, 32, 64),
        blocks_per_stage=(3, 3, 3),
        num_classes=num_classes,
        in_channels=in_channels,
        width=width,
        layers=layers or LayerSet(),
        name="resnet20",
    )


def vgg16(
    *,
    num_classes: int,
    in_channels: int = 3,
    width: float = 1,
    layers: LayerSet | None = None,
    head: str = "gap",
    input_size: int | None = None,
) -> nn.Module:
    """CIFAR VGG-16-BN with two FC layers; ``head="flatten"`` is the paper's (see :class:`VGG16`)."""
    return VGG16(
        num_classes=num_classes, in_channels=in_channels, width=width, layers=layers or LayerSet(),
        head=head, input_size=input_size,
    )


BACKBONES: dict[str, Callable[..., nn.Module]] = {
    "small_cnn": small_cnn,
    "resnet18": resnet18,
    "resnet20": resnet20,
    "vgg16": vgg16,
}


# Backbones that offer heads other than "gap" (the rest always average-pool).
HEAD_OPTIONS: dict[str, tuple[str, ...]] = {"vgg16": HEADS}


def list_backbones() -> list[str]:
    """Return the backbone names :func:`defenses.build_model` accepts, sorted."""
    return sorted(BACKBONES)
