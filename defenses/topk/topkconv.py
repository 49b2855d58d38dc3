"""TopKConv: each output channel sums only its k strongest input-channel responses (lean form)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from defenses._placement import check_k, default_of, flag, resolve_k
from defenses._registry import Example, register_defense
from defenses.backbones import LayerSet
from defenses.topk._common import (
    _PAPER,
    TOPK_CRITERIA,
    _check_criterion,
    _check_k,
    _check_positive,
    _chunk_budget,
    _conv_geometry,
    _pair,
    _plan,
    _ranges,
)
from defenses.topk.dynamic_k import DynamicKLinear
from defenses.topk.neuron import TopKNeuronConvBN, _neuron_keep

# --------------------------------------------------------------------------- TopKConv: lean form


def _select_channels(
    x: Tensor,
    weight: Tensor,
    k: int,
    criterion: str,
    stride: tuple[int, int],
    padding: tuple[int, int],
    chunk_bytes: int | None,
    with_output: bool,
) -> tuple[Tensor, Tensor | None]:
    """Top-k input-channel selection and, optionally, the output without bias.

    Must run without autograd. Responses are formed chunk by chunk as one batched product over
    input channels, R[i, (n, l), c] = sum_t U[i, (n, l), t] * W[c, i, t] with U the unfolded input
    (t = kernel tap, l = output position). In this layout the spatial max/sum and the masked sum
    over i reduce outer axes of a contiguous block (fast on CPU), and at most one chunk of
    responses exists at a time.

    Returns:
        keep: bool (N, C_in, C_out), keep[n, i, c] = input channel i is summed into output
            channel c for sample n (this layout makes backward's per-sample reads contiguous;
            :func:`topk_conv2d_mask` returns the (N, C_out, C_in) view).
        out: (N, C_out, H', W') or None.
    """
    n_samples, c_in = x.shape[:2]
    c_out, _, kh, kw = weight.shape
    h_out, w_out = _conv_geometry(x, weight, stride, padding)
    taps, positions = kh * kw, h_out * w_out
    budget = _chunk_budget(chunk_bytes, x.device)
    n_step, c_step = _plan(budget, n_samples, c_out, c_in * positions * x.element_size())

    w_t = weight.reshape(c_out, c_in, taps).permute(1, 2, 0).contiguous()  # (C_in, taps, C_out)
    keep = torch.empty((n_samples, c_in, c_out), dtype=torch.bool, device=x.device)
    out = x.new_empty((n_samples, positions, c_out)) if with_output else None
    buffer = x.new_empty(c_in * positions * n_step * c_step)
    for n0, n1 in _ranges(n_samples, n_step):
        n = n1 - n0
        cols = F.unfold(x[n0:n1], (kh, kw), padding=padding, stride=stride)  # (n, C_in*taps, L)
        u_t = cols.view(n, c_in, taps, positions).permute(1, 0, 3, 2).reshape(
            c_in, n * positions, taps
        )
        for c0, c1 in _ranges(c_out, c_step):
            c = c1 - c0
            resp = buffer[: c_in * positions * n * c].view(c_in, n * positions, c)
            torch.bmm(u_t, w_t[:, :, c0:c1], out=resp)
            resp = resp.view(c_in, n, positions, c)
            scores = resp.amax(dim=2) if criterion == "max" else resp.sum(dim=2)  # (C_in, n, c)
            # topk along a strided outer axis is several times slower on CPU than along a
            # contiguous last axis; the scores are 1/H'W' of the responses, so transpose them.
            scores = scores.permute(1, 2, 0).contiguous()  # (n, c, C_in)
            top = scores.topk(k, dim=2, sorted=False).indices
            # A float 0/1 selection multiplies the responses without a dtype conversion.
            chosen = torch.zeros_like(scores).scatter_(2, top, 1.0)
            keep[n0:n1, :, c0:c1] = chosen.transpose(1, 2)
            if out is not None:
                resp.mul_(chosen.permute(2, 0, 1).contiguous().unsqueeze(2))
                if c == c_out:
                    torch.sum(resp, dim=0, out=out[n0:n1])
                else:
                    out[n0:n1, :, c0:c1] = resp.sum(dim=0)
    if out is None:
        return keep, None
    return keep, out.transpose(1, 2).reshape(n_samples, c_out, h_out, w_out)


def _masked_conv_backward(
    x: Tensor,
    weight: Tensor,
    keep: Tensor,
    grad_out: Tensor,
    stride: tuple[int, int],
    padding: tuple[int, int],
    chunk_bytes: int | None,
    need_x: bool,
    need_w: bool,
) -> tuple[Tensor | None, Tensor | None]:
    """Gradients of Y[n, c] = sum_i keep[n, i, c] * (W[c, i] * X[n, i]) w.r.t. x and W.

    Per sample this is a conv with the masked weight W * keep[n]: grad_x is its transposed conv
    (batched product with the gradient, then fold), and grad_W sums the per-sample weight
    gradients U[n] G[n]^T masked by keep[n]. Temporaries of n_step * c_step * C_in * taps values,
    laid out (n, C_in, taps, c) so the (N, C_in, C_out) mask broadcasts contiguously.
    """
    n_samples, c_in, height, width = x.shape
    c_out, _, kh, kw = weight.shape
    taps = kh * kw
    # contiguous: the incoming gradient may be an expanded view (e.g. of a sum's ones).
    positions = grad_out.shape[2] * grad_out.shape[3]
    grad = grad_out.reshape(n_samples, c_out, positions).contiguous()  # (N, C_out, L)
    w_t = weight.reshape(c_out, c_in, taps).permute(1, 2, 0).contiguous()  # (C_in, taps, C_out)
    budget = _chunk_budget(chunk_bytes, x.device, backward=True)
    n_step, c_step = _plan(budget, n_samples, c_out, c_in * taps * x.element_size())
    buffer = x.new_empty(n_step * c_in * taps * c_step)
    sel_buffer = x.new_empty(n_step * c_in * c_step)

    grad_x = torch.empty_like(x) if need_x else None
    grad_w = torch.zeros_like(w_t) if need_w else None  # (C_in, taps, C_out)
    for n0, n1 in _ranges(n_samples, n_step):
        n = n1 - n0
        cols = F.unfold(x[n0:n1], (kh, kw), padding=padding, stride=stride) if need_w else None
        grad_cols = x.new_empty((n, c_in * taps, positions)) if need_x else None
        for c0, c1 in _ranges(c_out, c_step):
            c = c1 - c0
            # Converted once: mixing the bool mask into float ops would convert it per op.
            sel = sel_buffer[: n * c_in * c].view(n, c_in, 1, c)
            sel.copy_(keep[n0:n1, :, c0:c1].unsqueeze(2))
            tmp = buffer[: n * c_in * taps * c].view(n, c_in, taps, c)
            if grad_cols is not None:
                torch.mul(w_t[:, :, c0:c1], sel, out=tmp)
                masked_w = tmp.view(n, c_in * taps, c)
                if c0 == 0:
                    torch.bmm(masked_w, grad[n0:n1, c0:c1], out=grad_cols)
                else:
                    grad_cols.baddbmm_(masked_w, grad[n0:n1, c0:c1])
            if grad_w is not None and cols is not None:
                torch.bmm(cols, grad[n0:n1, c0:c1].transpose(1, 2), out=tmp.view(n, c_in * taps, c))
                if n == 1:
                    grad_w[:, :, c0:c1].addcmul_(tmp[0], sel[0])  # one fused pass
                else:
                    grad_w[:, :, c0:c1] += tmp.mul_(sel).sum(dim=0)
        if grad_x is not None and grad_cols is not None:
            grad_x[n0:n1] = F.fold(
                grad_cols, (height, width), (kh, kw), padding=padding, stride=stride
            )
    if grad_w is None:
        return grad_x, None
    return grad_x, grad_w.permute(2, 0, 1).reshape(weight.shape)


class _TopKConv2dFunction(torch.autograd.Function):
    """Lean TopKConv (max/sum) without bias; saves only x, W and the bool selection mask."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        x: Tensor,
        weight: Tensor,
        k: int,
        criterion: str,
        stride: tuple[int, int],
        padding: tuple[int, int],
        chunk_bytes: int | None,
    ) -> Tensor:
        keep, out = _select_channels(x, weight, k, criterion, stride, padding, chunk_bytes, True)
        ctx.save_for_backward(x, weight, keep)
        ctx.geometry = (stride, padding, chunk_bytes)  # type: ignore[attr-defined]
        return cast(Tensor, out)

    @staticmethod
    @once_differentiable
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_out: Tensor
    ) -> tuple[Tensor | None, ...]:
        x, weight, keep = ctx.saved_tensors  # type: ignore[attr-defined]
        stride, padding, chunk_bytes = ctx.geometry  # type: ignore[attr-defined]
        need_x, need_w = ctx.needs_input_grad[:2]  # type: ignore[attr-defined]
        grad_x, grad_w = _masked_conv_backward(
            x, weight, keep, grad_out, stride, padding, chunk_bytes, need_x, need_w
        )
        return grad_x, grad_w, None, None, None, None, None


def _check_conv_args(
    x: Tensor, weight: Tensor, k: int, criterion: str, stride: object, padding: object
) -> tuple[int, tuple[int, int], tuple[int, int]]:
    criterion = _check_criterion(criterion)
    stride_ = _pair("stride", stride, 1)
    padding_ = _pair("padding", padding, 0)
    _conv_geometry(x, weight, stride_, padding_)
    if criterion == "neuron":
        k = _check_k(k, weight.shape[0], "out_channels")
    else:
        k = _check_k(k, weight.shape[1], "in_channels")
    return k, stride_, padding_


def topk_conv2d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    k: int,
    criterion: str = "max",
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    chunk_bytes: int | None = None,
) -> Tensor:
    """TopKConv, lean form (Eigen & Sadovnik, "TopKConv: Increased Adversarial Robustness...").

    Same outputs and gradients as :func:`topk_conv2d_naive`; never materialises the
    (N, C_out, C_in, H', W') responses beyond one chunk, and backward keeps only x, W and a bool
    mask (N, C_out, C_in).

    Args:
        x: input (N, C_in, H, W).
        weight: conv weight (C_out, C_in, kh, kw).
        bias: (C_out,) or None; added after the selection (never ranked) for "max"/"sum"; for
            "neuron" it is part of the conv output that is ranked.
        k: input channels kept per output channel ("max", "sum"), in [1, C_in]; output channels
            kept per sample ("neuron"), in [1, C_out].
        criterion: "max" (spatial max of A_i^c, the paper), "sum" (spatial sum, the public code)
            or "neuron".
        stride: conv stride (int or pair).
        padding: zero padding (int or pair).
        chunk_bytes: budget of one chunk of temporaries; None = 4 MiB forward / 16 MiB backward
            on CPU, 64 MiB elsewhere.

    Shape:
        Output: (N, C_out, H', W') as for ``F.conv2d``.
    """
    k, stride_, padding_ = _check_conv_args(x, weight, k, criterion, stride, padding)
    if criterion == "neuron":
        y = F.conv2d(x, weight, bias, stride_, padding_)
        if k == weight.shape[0]:
            return y
        # where() keeps only the bool mask for backward.
        return torch.where(_neuron_keep(y, k)[:, :, None, None], y, 0.0)
    if k == weight.shape[1]:
        return F.conv2d(x, weight, bias, stride_, padding_)
    y = _TopKConv2dFunction.apply(x, weight, k, criterion, stride_, padding_, chunk_bytes)
    return y if bias is None else y + bias.view(1, -1, 1, 1)


def topk_conv2d_mask(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    k: int,
    criterion: str = "max",
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    chunk_bytes: int | None = None,
) -> Tensor:
    """The selection TopKConv makes, without gradients (for tests and analysis).

    Returns:
        Bool (N, C_out, C_in) for "max"/"sum" (True = input channel i summed into output channel
        c); bool (N, C_out) for "neuron" (True = output channel kept). Arguments as
        :func:`topk_conv2d`; the bias matters only to "neuron".
    """
    k, stride_, padding_ = _check_conv_args(x, weight, k, criterion, stride, padding)
    with torch.no_grad():
        if criterion == "neuron":
            return _neuron_keep(F.conv2d(x, weight, bias, stride_, padding_), k)
        keep, _ = _select_channels(
            x, weight, k, criterion, stride_, padding_, chunk_bytes, with_output=False
        )
    return keep.transpose(1, 2)


def topk_conv2d_naive(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    k: int,
    criterion: str = "max",
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
) -> Tensor:
    """Reference TopKConv that materialises all responses A (N, C_out, C_in, H', W') with autograd.

    Memory O(N * C_out * C_in * H' * W'): only for tests and benchmarks. Arguments as
    :func:`topk_conv2d`.
    """
    k, stride_, padding_ = _check_conv_args(x, weight, k, criterion, stride, padding)
    n_samples, c_in = x.shape[:2]
    c_out, _, kh, kw = weight.shape
    if criterion == "neuron":
        y = F.conv2d(x, weight, bias, stride_, padding_)
        top = y.amax(dim=(2, 3)).topk(k, dim=1).indices
        keep = torch.zeros(y.shape[:2], dtype=y.dtype, device=y.device).scatter_(1, top, 1.0)
        return y * keep[:, :, None, None]
    # Depthwise conv with channel multiplier C_out: output channel i * C_out + c is W[c, i] * X_i.
    depthwise = weight.transpose(0, 1).reshape(c_in * c_out, 1, kh, kw)
    resp = F.conv2d(x, depthwise, None, stride_, padding_, groups=c_in)
    resp = resp.view(n_samples, c_in, c_out, *resp.shape[2:]).transpose(1, 2)  # (N, C_out, C_in..)
    scores = resp.amax(dim=(3, 4)) if criterion == "max" else resp.sum(dim=(3, 4))
    top = scores.topk(k, dim=2).indices
    keep = torch.zeros_like(scores).scatter_(2, top, 1.0)
    y = (resp * keep[..., None, None]).sum(dim=2)
    return y if bias is None else y + bias.view(1, -1, 1, 1)


class TopKConv2d(nn.Module):
    """TopKConv layer (Eigen & Sadovnik, "TopKConv: Increased Adversarial Robustness Through
    Deeper Interpretability").

    A conv with the ordinary weight (C_out, C_in, kh, kw) in which output channel c sums only the k
    input channels i whose depthwise responses A_i^c = W[c, i] * X_i have the largest spatial max
    ("max", the paper's TKC-max) or spatial sum ("sum", TKC-sum), per sample; the bias is added
    after the selection. "neuron" (TKC-neuron) is an ordinary conv that keeps, per sample, the k
    output channels with the largest spatial max (bias included) and zeroes the others. With
    k = C_in ("max"/"sum") or k = C_out ("neuron") it is exactly ``nn.Conv2d``.

    The paper puts it in the two convs before the FC layers of a VGG16 with k = 10% of the
    channels. Forward/backward use the lean form of :func:`topk_conv2d`.

    Args:
        in_channels: C_in >= 1.
        out_channels: C_out >= 1.
        kernel_size: int or (kh, kw).
        k: channels kept, in [1, in_channels] ("max"/"sum") or [1, out_channels] ("neuron").
        criterion: "max", "sum" or "neuron".
        stride: int or pair, >= 1.
        padding: int or pair, >= 0 (zeros).
        bias: learnable bias (C_out,).

    Attributes:
        chunk_bytes: budget for one chunk of temporaries (None = device default); lower it to
            bound memory further, raise it for fewer, larger kernels.

    Shape:
        Input (N, C_in, H, W); output (N, C_out, H', W') as ``nn.Conv2d``.

    Examples::

        >>> conv = TopKConv2d(64, 64, 3, k=6, padding=1)
        >>> y = conv(torch.randn(8, 64, 8, 8))
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        k: int,
        criterion: str = "max",
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        bias: bool = True,
    ) -> None:
        super().__init__()
        self.in_channels = _check_positive("in_channels", in_channels)
        self.out_channels = _check_positive("out_channels", out_channels)
        self.kernel_size = _pair("kernel_size", kernel_size, 1)
        self.criterion = _check_criterion(criterion)
        if criterion == "neuron":
            self.k = _check_k(k, self.out_channels, "out_channels")
        else:
            self.k = _check_k(k, self.in_channels, "in_channels")
        self.stride = _pair("stride", stride, 1)
        self.padding = _pair("padding", padding, 0)
        self.chunk_bytes: int | None = None
        self.weight = nn.Parameter(
            torch.empty(self.out_channels, self.in_channels, *self.kernel_size)
        )
        if bias:
            self.bias: nn.Parameter | None = nn.Parameter(torch.empty(self.out_channels))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise exactly as ``nn.Conv2d`` (Kaiming-uniform, a = sqrt(5))."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.in_channels * self.kernel_size[0] * self.kernel_size[1]
            bound = 1.0 / math.sqrt(fan_in)
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        return topk_conv2d(
            x, self.weight, self.bias, self.k, self.criterion, self.stride, self.padding,
            self.chunk_bytes,
        )

    def selection_mask(self, x: Tensor) -> Tensor:
        """The selection for input x: see :func:`topk_conv2d_mask`."""
        return topk_conv2d_mask(
            x, self.weight, self.bias, self.k, self.criterion, self.stride, self.padding,
            self.chunk_bytes,
        )

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, k={self.k}, "
            f"criterion={self.criterion!r}, stride={self.stride}, padding={self.padding}, "
            f"bias={self.bias is not None}"
        )

# --------------------------------------------------------------------------- registration

TOPKCONV_K = 0.1  # Eigen & Sadovnik: k = 10% of the channels
TOPKCONV_LAYERS = 2  # ... in the two convs before the FC layers
# Every TopKConv result in the paper also has Dynamic-k in both FC layers: k = 250 of the 25,088
# inputs of the penultimate one and 10 of the 512 of the last. Fractions, so that the paper's
# network gets exactly those counts and a smaller one the same shares.
K_DENSE_HIDDEN = 250 / 25088
K_DENSE_LAST = 10 / 512
_DENSE_PARAMS = ("k_dense_hidden", "k_dense_last")


def _dynamic_k_fc(k: float, which: str) -> Any:
    def fc(fin: int, fout: int) -> nn.Module:
        kk = resolve_k(k, fin, what="in_features", layer=f"DynamicKLinear({fin}->{fout}, {which})")
        return DynamicKLinear(fin, fout, k=kk)

    return fc


def _place_topkconv(params: Mapping[str, Any], num_classes: int) -> LayerSet:
    """TopKConv for the last ``layers`` main-path convs; Dynamic-k in the FC layers (the paper's
    combination) unless ``dynamic_k_heads`` is False.

    ``k_dense_last`` is the classifier's k (every backbone); ``k_dense_hidden`` that of the FC
    layers before it (VGG-16's penultimate one). TKC-neuron comes with its own BatchNorm over the
    kept channels (:class:`TopKNeuronConvBN`), so pruned channels are 0 at the activation.
    """
    k = params.get("k", TOPKCONV_K)
    criterion = params.get("criterion", default_of(TopKConv2d, "criterion"))
    n_layers = params.get("layers", TOPKCONV_LAYERS)
    if isinstance(n_layers, bool) or not isinstance(n_layers, numbers.Integral) or n_layers < 1:
        raise ValueError(f"layers={n_layers!r} must be an int >= 1 (paper: 2)")
    check_k(k, "TopKConv2d")
    if criterion not in TOPK_CRITERIA:
        raise ValueError(f"criterion={criterion!r} must be one of {list(TOPK_CRITERIA)}")
    heads = flag(params, "dynamic_k_heads", True)
    if not heads:
        stray = [p for p in _DENSE_PARAMS if p in params]
        if stray:
            raise ValueError(
                f"{stray[0]} sets a Dynamic-k head's k: it needs dynamic_k_heads=True "
                "(False = plain dense layers)"
            )
    k_hidden = params.get("k_dense_hidden", K_DENSE_HIDDEN)
    k_last = params.get("k_dense_last", K_DENSE_LAST)
    check_k(k_hidden, "the hidden DynamicKLinear layers (k_dense_hidden)")
    check_k(k_last, "the last DynamicKLinear layer (k_dense_last)")

    def last_conv(cin: int, cout: int, kernel: int, stride: int, padding: int) -> nn.Module:
        # "neuron" keeps k output channels; "max"/"sum" keep k input channels per output.
        n, what = (cout, "out_channels") if criterion == "neuron" else (cin, "in_channels")
        kk = resolve_k(k, n, what=what, layer=f"TopKConv2d({cin}->{cout})")
        if criterion == "neuron":
            return TopKNeuronConvBN(cin, cout, kernel, k=kk, stride=stride, padding=padding)
        return TopKConv2d(
            cin, cout, kernel, k=kk, criterion=criterion, stride=stride, padding=padding,
            bias=False,
        )

    dense: dict[str, Any] = {}
    if heads:
        dense = {"linear": _dynamic_k_fc(k_hidden, "hidden"), "last_linear": _dynamic_k_fc(k_last, "last")}
    return LayerSet(
        last_conv=last_conv, n_last_convs=int(n_layers), last_conv_norm=criterion == "neuron",
        **dense,
    )


register_defense(
    "topkconv", TopKConv2d, place=_place_topkconv,
    # layers = how many of the last main-path convs become TopKConv2d.
    # dynamic_k_heads, k_dense_hidden, k_dense_last: the paper's Dynamic-k FC layers.
    params=("k", "criterion", "layers", "dynamic_k_heads", *_DENSE_PARAMS), routing=True, color="#d62728",
    cost_budget=(2.0, 1.5),  # issue 2's layer-cost targets (time, memory)
    paper=_PAPER,
    example=Example(lambda: TopKConv2d(in_channels=6, out_channels=5, kernel_size=3, k=2, padding=1),
                    (2, 6, 4, 4), (2, 5, 4, 4)),
)
