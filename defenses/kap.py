"""Kernel Average Pool (KAP) and Kernel Max Pool: pooling along the channel ("kernel") axis.

Reference:
    P. Bashivan, A. Ibrahim, A. Dehghani, Y. Ren, "Learning robust kernel ensembles with kernel
    average pooling" (KAP). Eq. 2: z_bar[i, k] = (1/K) * sum_{l = S*k - (K-1)/2}^{S*k + (K-1)/2} z[i, l],
    a mean filter of size K and stride S along the channels, applied independently at every spatial
    position; Alg. 1 zero-pads the channel axis and average-pools.

Average pooling runs on the (N, *grid, H*W) view of the input as shifted adds of contiguous
slabs inside a custom autograd Function that saves nothing for backward (pooling is linear: the
backward is its transpose). Max pooling uses ``max_pool2d`` / ``max_pool3d`` on the same view
(PyTorch keeps its input and indices for backward).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from defenses._placement import default_of, flag, nonneg_float, pick
from defenses._registry import Example, register_defense
from defenses.backbones import LayerSet, wants_grad
from defenses.noise import ActivationNoise

__all__ = [
    "KAP_DIMS",
    "KAP_MODES",
    "KAP_WIDENINGS",
    "KernelAveragePool",
    "channel_grid",
    "kap_out_channels",
    "kap_width_factor",
]

KAP_DIMS: tuple[int, ...] = (1, 2)
KAP_MODES: tuple[str, ...] = ("avg", "max")

#: How the network is widened for KAP (Bashivan et al., appendix A.3: "by the same factor as the
#: KAP kernel size"). "area": by the factor KAP removes (S in 1D, S^2 in 2D), so every layer keeps
#: its nominal number of ensembles; "stride": by S also in 2D (the sentence's factor when S = K), so
#: after each 2D KAP the network is S times narrower than nominal; "kernel": the sentence word for
#: word, every conv widened by K whatever S is (with S = 1 the whole network is K times wider).
KAP_WIDENINGS: tuple[str, ...] = ("area", "stride", "kernel")


def _check_int(name: str, value: object, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}={value!r} must be an integer >= {low}")


def _check_dims(dims: object) -> None:
    if isinstance(dims, bool) or not isinstance(dims, int) or dims not in KAP_DIMS:
        raise ValueError(f"dims={dims!r} must be one of {list(KAP_DIMS)}")


def _check_stride(stride: object) -> None:
    _check_int("stride", stride, 1)


def channel_grid(channels: int, stride: int = 1) -> tuple[int, int]:
    """Grid (rows, cols) on which 2D KAP lays out the channels, row-major.

    rows = the largest divisor of ``channels`` that is <= sqrt(channels) and, with ``stride`` > 1,
    such that both rows and cols = channels / rows are divisible by the stride (so the strided
    pooling maps the grid onto a (rows/S) x (cols/S) grid exactly); channel ``i * cols + j`` sits
    at grid cell (i, j). Prime channel counts give a 1 x C grid. Example: 288 channels (32 widened
    by 3^2 for stride 3) lie on 12 x 24, not on the squarer 16 x 18 that stride 3 cannot divide.

    Args:
        channels: number of channels, >= 1.
        stride: the KAP stride the grid must be divisible by (1: any grid).

    Returns:
        (rows, cols) with rows * cols == channels and rows <= cols (rows is the squarest grid
        divisible by the stride; for stride 1, the squarest grid).

    Raises:
        ValueError: bad arguments, or no grid of ``channels`` has both sides divisible by stride.
    """
    _check_int("channels", channels, 1)
    _check_stride(stride)
    rows = math.isqrt(channels)
    while rows >= 1:
        if channels % rows == 0 and rows % stride == 0 and (channels // rows) % stride == 0:
            return rows, channels // rows
        rows -= 1
    raise ValueError(
        f"in_channels={channels} has no channel grid whose sides are both divisible by "
        f"stride={stride}; 2D KAP with stride > 1 needs in_channels = stride^2 * (target channels), "
        f"e.g. in_channels={stride**2 * 64}"
    )


def kap_width_factor(stride: int, dims: int, widen: str = "area", kernel_size: int | None = None) -> int:
    """Factor by which the conv before a KAP is widened.

    KAP with stride S divides the channels by S (1D) or S^2 (2D); Bashivan et al. (appendix A.3)
    widen the network "by the same factor" so each layer keeps the same number of kernel ensembles
    (``widen="area"``). ``widen="stride"`` widens by S in 2D too; ``widen="kernel"`` by the kernel
    size K, as the appendix's sentence reads word for word.

    Args:
        stride: KAP stride S >= 1.
        dims: 1 or 2.
        widen: one of :data:`KAP_WIDENINGS`.
        kernel_size: KAP kernel size K (needed by ``widen="kernel"`` only).

    Returns:
        "kernel": K; otherwise S for dims=1 and, for dims=2, S**2 ("area") or S ("stride").
    """
    _check_stride(stride)
    _check_dims(dims)
    if widen not in KAP_WIDENINGS:
        raise ValueError(f"widen={widen!r} must be one of {list(KAP_WIDENINGS)}")
    if widen == "kernel":
        if kernel_size is None:
            raise ValueError("widen='kernel' needs the kernel_size")
        _check_int("kernel_size", kernel_size, 1)
        return kernel_size
    return stride if dims == 1 or widen == "stride" else stride**2


def kap_out_channels(in_channels: int, stride: int = 1, dims: int = 2) -> int:
    """Number of channels KAP produces from ``in_channels`` (independent of the kernel size).

    The channel axis (1D) or each grid axis (2D) is padded by K-1 in total, so an axis of length L
    yields ceil(L / S) windows. 2D with S > 1 requires both grid sides to be divisible by S, so the
    output is exactly in_channels / S^2 and a widened layer (see :func:`kap_width_factor`) maps back
    to the intended width.

    Raises:
        ValueError: bad arguments, or a 2D grid whose sides are not divisible by the stride.
    """
    _check_int("in_channels", in_channels, 1)
    _check_stride(stride)
    _check_dims(dims)
    if dims == 1:
        return -(-in_channels // stride)
    rows, cols = channel_grid(in_channels, stride)
    return (rows // stride) * (cols // stride)


def _real_counts(length: int, kernel_size: int, stride: int, left: int, out_len: int) -> Tensor:
    """Number of real (non-padding) positions in each window along one padded axis."""
    starts = torch.arange(out_len) * stride - left
    ends = starts + kernel_size  # exclusive
    return (ends.clamp(max=length) - starts.clamp(min=0)).to(torch.float64)


def _window_sum(t: Tensor, axis: int, kernel_size: int, before: int) -> Tensor:
    """Zero-padded stride-1 window sum along ``axis``: out[i] = sum_{o=-before}^{K-1-before} t[i+o].

    Written as K shifted adds of contiguous slabs (the axes after ``axis`` are contiguous), which
    on CPU is several times faster than avg_pool3d over the same view and needs no padded copy.
    """
    length = t.shape[axis]
    after = kernel_size - 1 - before
    out = t.clone(memory_format=torch.contiguous_format)
    for offset in range(1, min(after, length - 1) + 1):
        out.narrow(axis, 0, length - offset).add_(t.narrow(axis, offset, length - offset))
    for offset in range(1, min(before, length - 1) + 1):
        out.narrow(axis, offset, length - offset).add_(t.narrow(axis, 0, length - offset))
    return out


def _avg_scale(
    axes: tuple[int, ...], kernel_size: int, stride: int, left: int, include_pad: bool, like: Tensor
) -> Tensor | float:
    """Divisor of every output window: K^nd, or the real (non-padding) positions per window."""
    if include_pad:
        return 1.0 / kernel_size ** len(axes)
    factor = torch.ones((), dtype=torch.float64)
    for i, length in enumerate(axes):
        out_len = -(-length // stride)
        counts = _real_counts(length, kernel_size, stride, left, out_len)
        shape = [1] * len(axes)
        shape[i] = out_len
        factor = factor * (1.0 / counts).view(shape)
    return factor.unsqueeze(-1).to(device=like.device, dtype=like.dtype)


#: Below this many spatial positions per channel the channels-last pooling kernel has too little
#: to vectorise over and the shifted adds are faster (measured on CPU: ResNet-18 layer4, 4x4).
_BOX_MIN_POSITIONS = 64


def _symmetric_box(view: Tensor, kernel_size: int, stride: int, include_pad: bool) -> bool:
    """Whether the fast 2D path applies: 2D grid, odd K, stride 1, pad counted, enough positions."""
    return (
        view.dim() == 4
        and stride == 1
        and kernel_size % 2 == 1
        and include_pad
        and view.shape[-1] >= _BOX_MIN_POSITIONS
    )


def _box_pool_2d(view: Tensor, kernel_size: int) -> Tensor:
    """K x K zero-padded mean over the grid axes of a contiguous (N, rows, cols, M) view.

    Permuted to (N, M, rows, cols) the view *is* a channels-last tensor with M "channels", so
    avg_pool2d's channels-last kernel pools it in one vectorised pass without any copy, and its
    output permutes back to the same contiguous (N, rows, cols, M) layout.
    """
    pooled = F.avg_pool2d(
        view.permute(0, 3, 1, 2), kernel_size, 1, kernel_size // 2, count_include_pad=True
    )
    return pooled.permute(0, 2, 3, 1)


class _ChannelAvgPool(torch.autograd.Function):
    """Channel average pooling on the (N, *grid, M) view that saves nothing for backward.

    Average pooling is linear, so backward is its transpose applied to the gradient: scale by the
    same divisors, spread strided outputs back (zero insertion), and sum windows with mirrored
    offsets. Only shapes and the (int) pooling arguments are kept, not the input.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(  # type: ignore[override]
        view: Tensor, kernel_size: int, stride: int, left: int, include_pad: bool
    ) -> Tensor:
        axes = tuple(view.shape[1:-1])
        if _symmetric_box(view, kernel_size, stride, include_pad):
            return _box_pool_2d(view, kernel_size)
        out = view
        for axis in range(1, len(axes) + 1):
            out = _window_sum(out, axis, kernel_size, left)
            if stride > 1:
                index = [slice(None)] * out.dim()
                index[axis] = slice(None, None, stride)
                out = out[tuple(index)]
        scale = _avg_scale(axes, kernel_size, stride, left, include_pad, view)
        # In place on our own temporary (stride > 1 leaves a strided view: make it contiguous).
        return out.mul_(scale) if stride == 1 else out * scale

    @staticmethod
    def setup_context(ctx, inputs: tuple, output: Tensor) -> None:  # type: ignore[override]
        view, kernel_size, stride, left, include_pad = inputs
        ctx.args = (tuple(view.shape[1:-1]), kernel_size, stride, left, include_pad)

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        axes, kernel_size, stride, left, include_pad = ctx.args
        if _symmetric_box(grad_out, kernel_size, stride, include_pad):
            # A zero-padded box mean with odd K and stride 1 is a symmetric operator: A^T = A.
            return _box_pool_2d(grad_out.contiguous(), kernel_size), None, None, None, None
        grad = grad_out * _avg_scale(axes, kernel_size, stride, left, include_pad, grad_out)
        mirrored = kernel_size - 1 - left  # the transpose sums offsets -(K-1-left)..left
        for axis in range(len(axes), 0, -1):
            if stride > 1:
                shape = list(grad.shape)
                shape[axis] = axes[axis - 1]
                spread = grad.new_zeros(shape)
                index = [slice(None)] * grad.dim()
                index[axis] = slice(None, None, stride)
                spread[tuple(index)] = grad
                grad = spread
            grad = _window_sum(grad, axis, kernel_size, mirrored)
        return grad, None, None, None, None


class KernelAveragePool(nn.Module):
    """Kernel Average Pool / Kernel Max Pool along the channel axis (Bashivan et al., KAP).

    Every output channel is the mean (or max) of a window of K neighbouring input channels, taken
    independently at each spatial position; neighbouring channels thus form a kernel ensemble.

    - dims=1: window of K channels, stride S. The channel axis is zero-padded by K-1 in total
      (floor((K-1)/2) before, the rest after), so output channel c (odd K, S=1) is the mean of input
      channels c-(K-1)/2 .. c+(K-1)/2, and C channels become ceil(C/S).
    - dims=2: the C channels are laid row-major on an r x c grid (:func:`channel_grid`) and pooled
      with a K x K window and stride S per grid axis (same padding rule per axis); output channels
      = (r/S) * (c/S). With S > 1 both grid sides must be divisible by S (checked in forward and
      :meth:`out_channels`, ValueError otherwise).

    Edge windows contain padding. ``count_include_pad=True`` divides them by K (K^2 in 2D), as the
    paper's Alg. 1; ``False`` divides by the number of real channels, as the authors' lab code.
    ``mode="max"`` (Kernel Max Pool) pads with -inf, so padding never wins.

    Cost: "avg" copies the input once per grid axis and keeps nothing for backward; "max" keeps
    the input and the max indices (and pads a copy for even K or grid axes shorter than K).

    Args:
        kernel_size: window size K >= 1 (K x K in 2D).
        stride: stride S with 1 <= S <= K. S = K gives disjoint ensembles; S > 1 shrinks the channels
            by S (1D) or S^2 (2D), see :func:`kap_width_factor` to widen the preceding conv.
        dims: 1 or 2.
        mode: "avg" (KAP) or "max" (Kernel Max Pool).
        count_include_pad: divisor of edge windows in "avg" mode (see above); ignored for "max".

    Shape:
        Input: (N, C, H, W) (any (N, C, *), including (N, C)). Output: (N, C_out, H, W) with
        C_out = :meth:`out_channels` (C). Values of any real dtype, on any device.

    Examples::

        >>> kap = KernelAveragePool(kernel_size=3, stride=1, dims=2)
        >>> kap(torch.randn(8, 64, 32, 32)).shape
        torch.Size([8, 64, 32, 32])
        >>> KernelAveragePool(kernel_size=2, stride=2, dims=2).out_channels(256)
        64
    """

    def __init__(
        self,
        kernel_size: int = 3,
        stride: int = 1,
        dims: int = 2,
        mode: str = "avg",
        count_include_pad: bool = True,
    ) -> None:
        super().__init__()
        _check_int("kernel_size", kernel_size, 1)
        _check_stride(stride)
        if stride > kernel_size:
            raise ValueError(
                f"stride={stride} must be in [1, kernel_size={kernel_size}]: a larger stride "
                f"would skip channels entirely"
            )
        _check_dims(dims)
        if mode not in KAP_MODES:
            raise ValueError(f"mode={mode!r} must be one of {list(KAP_MODES)}")
        self.kernel_size = kernel_size
        self.stride = stride
        self.dims = dims
        self.mode = mode
        self.count_include_pad = bool(count_include_pad)
        # Padding before each pooled axis; the remaining K-1-left goes after it.
        self._left = (kernel_size - 1) // 2
        self._right = kernel_size - 1 - self._left

    def out_channels(self, in_channels: int) -> int:
        """Output channel count for ``in_channels`` input channels (see :func:`kap_out_channels`)."""
        return kap_out_channels(in_channels, self.stride, self.dims)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() < 2:
            raise ValueError(f"input shape {tuple(x.shape)} must be (N, C, *) with a channel axis 1")
        n, channels = x.shape[0], x.shape[1]
        spatial = x.shape[2:]
        self.out_channels(channels)  # validates the grid/stride combination with a clear message
        axes: tuple[int, ...] = (channels,) if self.dims == 1 else channel_grid(channels, self.stride)
        # (N, *grid, M): the channel axis (or its grid) becomes pooled axes, M stays innermost.
        view = x.reshape(n, *axes, math.prod(spatial))
        if self.mode == "avg":
            out = _ChannelAvgPool.apply(
                view, self.kernel_size, self.stride, self._left, self.count_include_pad
            )
            return out.reshape(n, math.prod(out.shape[1:-1]), *spatial)
        return self._max_pool(view.unsqueeze(1), axes).reshape(n, -1, *spatial)

    def _max_pool(self, view: Tensor, axes: tuple[int, ...]) -> Tensor:
        """Kernel Max Pool on the (N, 1, *grid, M) view; autograd keeps PyTorch's max indices."""
        k, s, nd = self.kernel_size, self.stride, len(axes)
        if not wants_grad(view):
            return self._max_pool_values(view, nd)
        kernel = (k,) * nd + (1,)
        stride = (s,) * nd + (1,)
        # Pool with PyTorch's own (symmetric) padding when possible; otherwise pad explicitly:
        # for even K (asymmetric rule) and for axes shorter than K (3D pooling rejects those).
        symmetric = self._left == self._right and min(axes) >= k
        if not symmetric:
            view = self._pad_never_winning(view, nd)
        padding = (self._left if symmetric else 0,) * nd + (0,)
        pool = F.max_pool2d if nd == 1 else F.max_pool3d
        return pool(view, kernel, stride, padding)

    def _max_pool_values(self, view: Tensor, nd: int) -> Tensor:
        """The same maxima without indices, for forward passes that need no gradient.

        Why: max_pool2d/3d on this layout pools along a non-innermost axis one output at a time,
        recording indices; attacks' forward-only queries (Square: thousands per sample) spent more
        time there than in the widened convs. Padding with -inf, taking strided K-windows as a
        view (``unfold``) and reducing them with ``amax`` is vectorized over M and gives the same
        values: a maximum is exact, so the model's outputs do not change, only their cost.
        """
        k, s = self.kernel_size, self.stride
        view = self._pad_never_winning(view, nd)
        for axis in range(2, 2 + nd):  # a 2D window's maximum is the maximum of its rows' maxima
            view = view.unfold(axis, k, s).amax(dim=-1)
        return view

    def _pad_never_winning(self, view: Tensor, nd: int) -> Tensor:
        """The (N, 1, *grid, M) view padded with -inf by the window rule on each grid axis.

        F.pad lists (before, after) pairs starting from the last axis (M is never padded).
        """
        return F.pad(view, (0, 0) + (self._left, self._right) * nd, value=float("-inf"))

    def extra_repr(self) -> str:
        text = f"kernel_size={self.kernel_size}, stride={self.stride}, dims={self.dims}, mode={self.mode!r}"
        if self.mode == "avg":
            text += f", count_include_pad={self.count_include_pad}"
        return text


# --------------------------------------------------------------------------- registration

#: Noise after each KAP when a placement gives no sigma (the layer alone is noise-free).
KAP_SIGMA = 0.0


def _place_kap(params: Mapping[str, Any], num_classes: int) -> LayerSet:
    """KAP (+ noise) after every conv + BN, convs widened by KAP's channel reduction.

    ``widen="stride"`` (2D): the convs are widened by S only. In backbone terms the nominal
    widths shrink by S (``width_scale`` 1/S) and the convs are widened by S^2 from there, so a
    conv has S x its original channels and KAP leaves original / S. ``widen="kernel"``: likewise
    with K in place of S (``width_scale`` K / S^2 in 2D, K / S in 1D).
    """
    kap_kwargs = pick(params, ("kernel_size", "stride", "dims", "mode", "count_include_pad"))
    KernelAveragePool(**kap_kwargs)  # validate once, before building a whole network
    stride = kap_kwargs.get("stride", default_of(KernelAveragePool, "stride"))
    dims = kap_kwargs.get("dims", default_of(KernelAveragePool, "dims"))
    kernel_size = kap_kwargs.get("kernel_size", default_of(KernelAveragePool, "kernel_size"))
    widen = params.get("widen", "area")
    factor = kap_width_factor(stride, dims)  # what KAP removes; the conv width relative to nominal
    width_scale = kap_width_factor(stride, dims, widen, kernel_size) / factor
    sigma = nonneg_float(params, "sigma", KAP_SIGMA)
    at_eval = flag(params, "noise_at_eval", False)

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

    return LayerSet(post_conv=post_conv, conv_width=factor, width_scale=width_scale)


register_defense(
    "kap", KernelAveragePool, place=_place_kap,
    # sigma > 0 adds ActivationNoise after every KAP; noise_at_eval keeps it in eval mode
    # (the authors' stochastic deployment); widen picks the reading of the widening rule.
    params=("kernel_size", "stride", "dims", "mode", "count_include_pad", "sigma", "noise_at_eval", "widen"),
    color="#1f77b4",
    cost_budget=(1.3, None),  # issue 2's layer-cost targets (time, memory)
    paper="Bashivan, Ibrahim, Dehghani, Ren: Learning Robust Kernel Ensembles with Kernel Average Pooling (2022)",
    example=Example(lambda: KernelAveragePool(kernel_size=3, stride=1), (2, 8, 3, 3), (2, 8, 3, 3)),
)
