"""Dynamic-k dense layer: each output sums only its k largest weighted inputs (lean form)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from defenses._placement import check_k, resolve_k
from defenses._registry import Example, register_defense
from defenses.backbones import LayerSet
from defenses.topk._common import _PAPER, _check_k, _check_positive, _chunk_budget, _plan, _ranges

# --------------------------------------------------------------------------- Dynamic-k dense


class _DynamicKLinearFunction(torch.autograd.Function):
    """Lean Dynamic-k without bias; saves x, W and the top-k indices (N, out, k)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        x: Tensor,
        weight: Tensor,
        k: int,
        chunk_bytes: int | None,
    ) -> Tensor:
        n_samples, in_features = x.shape
        out_features = weight.shape[0]
        budget = _chunk_budget(chunk_bytes, x.device)
        _, step = _plan(budget, 1, out_features, n_samples * in_features * x.element_size())
        out = x.new_empty((n_samples, out_features))
        index = torch.empty((n_samples, out_features, k), dtype=torch.long, device=x.device)
        buffer = x.new_empty(n_samples * step * in_features)
        for j0, j1 in _ranges(out_features, step):
            products = buffer[: n_samples * (j1 - j0) * in_features].view(
                n_samples, j1 - j0, in_features
            )
            torch.mul(x.unsqueeze(1), weight[j0:j1].unsqueeze(0), out=products)
            top = products.topk(k, dim=2, sorted=False)
            out[:, j0:j1] = top.values.sum(dim=2)
            index[:, j0:j1] = top.indices
        ctx.save_for_backward(x, weight, index)
        return out

    @staticmethod
    @once_differentiable
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_out: Tensor
    ) -> tuple[Tensor | None, ...]:
        x, weight, index = ctx.saved_tensors  # type: ignore[attr-defined]
        need_x, need_w = ctx.needs_input_grad[:2]  # type: ignore[attr-defined]
        n_samples, out_features, k = index.shape
        in_features = x.shape[1]
        grad_x = grad_w = None
        # Only the N * out * k selected products carry gradient: gather them, scatter back.
        if need_x:
            w_sel = weight.unsqueeze(0).expand(n_samples, -1, -1).gather(2, index)
            w_sel.mul_(grad_out.unsqueeze(2))
            grad_x = torch.zeros_like(x).scatter_add_(
                1, index.view(n_samples, out_features * k), w_sel.view(n_samples, out_features * k)
            )
        if need_w:
            x_sel = x.unsqueeze(1).expand(-1, out_features, -1).gather(2, index)
            x_sel.mul_(grad_out.unsqueeze(2))
            rows = torch.arange(out_features, device=x.device).mul_(in_features).view(1, -1, 1)
            grad_w = torch.zeros_like(weight).view(-1).index_add_(
                0, (index + rows).view(-1), x_sel.view(-1)
            ).view_as(weight)
        return grad_x, grad_w, None, None


def _check_linear_args(x: Tensor, weight: Tensor, k: int) -> int:
    if weight.dim() != 2:
        raise ValueError(f"weight shape {tuple(weight.shape)} must be (out_features, in_features)")
    if x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"input shape {tuple(x.shape)} must be (*, in_features={weight.shape[1]})"
        )
    return _check_k(k, weight.shape[1], "in_features")


def dynamic_k_linear(
    x: Tensor, weight: Tensor, bias: Tensor | None, k: int, chunk_bytes: int | None = None
) -> Tensor:
    """Dynamic-k dense, lean form (Eigen & Sadovnik, "TopKConv...": TopKDense).

    out_j = sum of the k largest signed products W_ji * x_i, plus b_j. The (N, out, in) products
    exist one chunk at a time; backward keeps x, W and the top-k indices and touches only the
    selected products. Same outputs and gradients as :func:`dynamic_k_linear_naive`.

    Args:
        x: input (*, in_features).
        weight: (out_features, in_features).
        bias: (out_features,) or None.
        k: products kept per output, in [1, in_features].
        chunk_bytes: budget of one chunk of products; None = device default.

    Shape:
        Output: (*, out_features).
    """
    k = _check_linear_args(x, weight, k)
    if k == weight.shape[1]:
        return F.linear(x, weight, bias)
    flat = x.reshape(-1, weight.shape[1])
    y = _DynamicKLinearFunction.apply(flat, weight, k, chunk_bytes)
    if bias is not None:
        y = y + bias
    return y.view(*x.shape[:-1], weight.shape[0])


def dynamic_k_linear_naive(x: Tensor, weight: Tensor, bias: Tensor | None, k: int) -> Tensor:
    """Reference Dynamic-k: materialises all products (*, out, in) with autograd (tests only)."""
    k = _check_linear_args(x, weight, k)
    y = (x.unsqueeze(-2) * weight).topk(k, dim=-1).values.sum(dim=-1)
    return y if bias is None else y + bias


class DynamicKLinear(nn.Module):
    """Dynamic-k dense layer (Eigen & Sadovnik, "TopKConv: Increased Adversarial Robustness
    Through Deeper Interpretability": TopKDense).

    out_j = sum over the k largest signed products W_ji * x_i, plus b_j, per sample. The paper uses
    k = 250 of 25,088 inputs in the penultimate FC layer and k = 10 of 512 in the last. With
    k = in_features it is exactly ``nn.Linear``.

    Args:
        in_features: >= 1.
        out_features: >= 1.
        k: products kept per output, in [1, in_features].
        bias: learnable bias (out_features,).

    Attributes:
        chunk_bytes: budget for one chunk of products (None = device default).

    Shape:
        Input (*, in_features); output (*, out_features).

    Examples::

        >>> fc = DynamicKLinear(512, 10, k=10)
        >>> logits = fc(torch.randn(8, 512))
    """

    def __init__(self, in_features: int, out_features: int, k: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features = _check_positive("in_features", in_features)
        self.out_features = _check_positive("out_features", out_features)
        self.k = _check_k(k, self.in_features, "in_features")
        self.chunk_bytes: int | None = None
        self.weight = nn.Parameter(torch.empty(self.out_features, self.in_features))
        if bias:
            self.bias: nn.Parameter | None = nn.Parameter(torch.empty(self.out_features))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise exactly as ``nn.Linear`` (Kaiming-uniform, a = sqrt(5))."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        return dynamic_k_linear(x, self.weight, self.bias, self.k, self.chunk_bytes)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, k={self.k}, "
            f"bias={self.bias is not None}"
        )

# --------------------------------------------------------------------------- registration

DYNAMIC_K = 0.02  # Eigen & Sadovnik: k = 10 of 512 in the final FC layer


def _place_dynamic_k(params: Mapping[str, Any], num_classes: int) -> LayerSet:
    """Dynamic-k in every FC layer (the single classifier of small_cnn/ResNets, both of VGG)."""
    k = params.get("k", DYNAMIC_K)
    check_k(k, "DynamicKLinear")

    def fc(fin: int, fout: int) -> nn.Module:
        kk = resolve_k(k, fin, what="in_features", layer=f"DynamicKLinear({fin}->{fout})")
        return DynamicKLinear(fin, fout, k=kk)

    return LayerSet(linear=fc)


register_defense(
    "dynamic_k", DynamicKLinear, place=_place_dynamic_k, params=("k",), routing=True,
    color="#9467bd", paper=_PAPER,
    example=Example(lambda: DynamicKLinear(in_features=7, out_features=4, k=3), (3, 7), (3, 4)),
)
