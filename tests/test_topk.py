"""TopKConv / Dynamic-k (Eigen & Sadovnik): paper formulas, lean == naive, validation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from defenses.topk import (
    DynamicKLinear,
    TopKConv2d,
    _plan,
    dynamic_k_linear,
    dynamic_k_linear_naive,
    topk_conv2d,
    topk_conv2d_mask,
    topk_conv2d_naive,
)

CRITERIA = ["max", "sum", "neuron"]
# (N, C_in, C_out, H, W, kernel, stride, padding, k)
GEOMETRIES = [
    (3, 5, 4, 6, 6, 3, 1, 1, 2),
    (2, 6, 7, 7, 5, (3, 2), 2, (1, 0), 3),
    (4, 8, 3, 5, 5, 1, 1, 0, 1),
    (2, 4, 6, 4, 4, 2, 1, 0, 3),
]


def _grads(y: torch.Tensor, g: torch.Tensor, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return torch.autograd.grad(y, inputs, g)


# ----------------------------------------------------------------------------- TopKConv2d


@pytest.mark.parametrize("criterion", ["max", "sum"])
def test_k_equal_in_channels_is_conv2d(criterion: str) -> None:
    torch.manual_seed(0)
    ref = nn.Conv2d(6, 5, 3, stride=2, padding=1)
    layer = TopKConv2d(6, 5, 3, k=6, criterion=criterion, stride=2, padding=1)
    layer.load_state_dict(ref.state_dict())
    x = torch.randn(3, 6, 7, 7)
    torch.testing.assert_close(layer(x), ref(x))
    # The naive reference (which really sums depthwise responses) agrees too.
    naive = topk_conv2d_naive(x, ref.weight, ref.bias, 6, criterion, 2, 1)
    torch.testing.assert_close(naive, ref(x), rtol=1e-5, atol=1e-5)


def test_neuron_k_equal_out_channels_is_conv2d() -> None:
    torch.manual_seed(0)
    ref = nn.Conv2d(4, 6, 3, padding=1)
    layer = TopKConv2d(4, 6, 3, k=6, criterion="neuron", padding=1)
    layer.load_state_dict(ref.state_dict())
    x = torch.randn(2, 4, 5, 5)
    torch.testing.assert_close(layer(x), ref(x))


def test_init_matches_conv2d() -> None:
    torch.manual_seed(3)
    ref = nn.Conv2d(6, 5, (3, 2))
    torch.manual_seed(3)
    layer = TopKConv2d(6, 5, (3, 2), k=2)
    assert layer.weight.shape == (5, 6, 3, 2)
    torch.testing.assert_close(layer.weight, ref.weight, rtol=0, atol=0)
    torch.testing.assert_close(layer.bias, ref.bias, rtol=0, atol=0)
    assert TopKConv2d(6, 5, 3, k=2, bias=False).bias is None


@pytest.mark.parametrize("criterion", CRITERIA)
@pytest.mark.parametrize("geometry", GEOMETRIES)
# For geometry 0 in float64 these budgets give forward chunks (samples, channels) of (all, all),
# (1, 1), (1, 2) and (2, all), and backward chunks of (all, all), (1, 1), (2, all), (all, all).
@pytest.mark.parametrize("chunk_bytes", [None, 1, 3000, 12000])
def test_lean_matches_naive(criterion: str, geometry: tuple, chunk_bytes: int | None) -> None:
    n, c_in, c_out, h, w, kernel, stride, padding, k = geometry
    if criterion == "neuron":
        k = min(k, c_out)
    torch.manual_seed(1)
    # float64 random inputs: scores are tie-free, so both forms select the same channels.
    x = torch.randn(n, c_in, h, w, dtype=torch.float64, requires_grad=True)
    layer = TopKConv2d(c_in, c_out, kernel, k, criterion, stride, padding).double()
    layer.chunk_bytes = chunk_bytes
    y = layer(x)
    y_ref = topk_conv2d_naive(x, layer.weight, layer.bias, k, criterion, stride, padding)
    assert y.shape == y_ref.shape == F.conv2d(x, layer.weight, None, stride, padding).shape
    torch.testing.assert_close(y, y_ref)
    g = torch.randn_like(y)
    for got, want in zip(
        _grads(y, g, x, layer.weight, layer.bias),
        _grads(y_ref, g, x, layer.weight, layer.bias),
        strict=True,
    ):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("criterion", ["max", "sum"])
def test_lean_gradient_of_one_input_only(criterion: str) -> None:
    """Backward computes only what is asked: x alone, or the weight alone."""
    torch.manual_seed(2)
    x = torch.randn(2, 5, 5, 5, dtype=torch.float64)
    w = torch.randn(3, 5, 3, 3, dtype=torch.float64)
    g = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    xr = x.clone().requires_grad_()
    (gx,) = _grads(topk_conv2d(xr, w, None, 2, criterion, 1, 1), g, xr)
    (gx_ref,) = _grads(topk_conv2d_naive(xr, w, None, 2, criterion, 1, 1), g, xr)
    torch.testing.assert_close(gx, gx_ref)
    wr = w.clone().requires_grad_()
    (gw,) = _grads(topk_conv2d(x, wr, None, 2, criterion, 1, 1), g, wr)
    (gw_ref,) = _grads(topk_conv2d_naive(x, wr, None, 2, criterion, 1, 1), g, wr)
    torch.testing.assert_close(gw, gw_ref)


def test_float32_default_chunks_match_naive() -> None:
    torch.manual_seed(4)
    x = torch.randn(4, 16, 6, 6, requires_grad=True)
    layer = TopKConv2d(16, 12, 3, k=3, padding=1)
    y = layer(x)
    y_ref = topk_conv2d_naive(x, layer.weight, layer.bias, 3, "max", 1, 1)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    for got, want in zip(
        _grads(y, g, x, layer.weight), _grads(y_ref, g, x, layer.weight), strict=True
    ):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _tiny_example() -> tuple[torch.Tensor, torch.Tensor]:
    """1x1 kernel, so A_i^c = W[c, i] * X_i can be read off by hand."""
    x = torch.tensor(
        [
            [
                [[5.0, -5.0], [-5.0, -5.0]],  # max 5, sum -10
                [[1.0, 1.0], [1.0, 1.0]],  # max 1, sum 4
                [[3.0, 0.0], [0.0, 0.0]],  # max 3, sum 3
            ]
        ]
    )
    w = torch.tensor([[1.0, 1.0, 1.0], [-1.0, 1.0, 1.0]]).view(2, 3, 1, 1)
    return x, w


def test_hand_checked_selection() -> None:
    x, w = _tiny_example()
    b = torch.tensor([0.5, -1.0])
    # Output channel 0 (all weights +1): by max the order is ch0 (5) > ch2 (3) > ch1 (1);
    # by sum ch1 (4) > ch2 (3) > ch0 (-10). Output channel 1 flips ch0 to [-5, 5, 5, 5]:
    # max 5 / sum 10, so ch0 ranks first under both criteria.
    mask = topk_conv2d_mask(x, w, None, 1, "max")
    assert mask.tolist() == [[[True, False, False], [True, False, False]]]
    mask = topk_conv2d_mask(x, w, None, 1, "sum")
    assert mask.tolist() == [[[False, True, False], [True, False, False]]]
    mask = topk_conv2d_mask(x, w, None, 2, "max")
    assert mask.tolist() == [[[True, False, True], [True, False, True]]]

    y = topk_conv2d(x, w, b, 1, "max")
    expected = torch.tensor([[[[5.5, -4.5], [-4.5, -4.5]], [[-6.0, 4.0], [4.0, 4.0]]]])
    torch.testing.assert_close(y, expected)
    y = topk_conv2d(x, w, b, 1, "sum")
    expected = torch.tensor([[[[1.5, 1.5], [1.5, 1.5]], [[-6.0, 4.0], [4.0, 4.0]]]])
    torch.testing.assert_close(y, expected)
    y = topk_conv2d(x, w, None, 2, "max")
    expected = torch.tensor([[[[8.0, -5.0], [-5.0, -5.0]], [[-2.0, 5.0], [5.0, 5.0]]]])
    torch.testing.assert_close(y, expected)


def test_hand_checked_selection_module_and_neuron() -> None:
    x, w = _tiny_example()
    layer = TopKConv2d(3, 2, 1, k=1, criterion="neuron", bias=False)
    with torch.no_grad():
        layer.weight.copy_(w)
    # Plain conv: channel 0 = [9, -4, -4, -4] (max 9), channel 1 = [-1, 6, 6, 6] (max 6).
    assert layer.selection_mask(x).tolist() == [[True, False]]
    torch.testing.assert_close(
        layer(x), torch.tensor([[[[9.0, -4.0], [-4.0, -4.0]], [[0.0, 0.0], [0.0, 0.0]]]])
    )


def test_neuron_zeroes_exactly_out_minus_k_channels() -> None:
    torch.manual_seed(5)
    c_out, k = 9, 4
    layer = TopKConv2d(5, c_out, 3, k=k, criterion="neuron", padding=1)
    x = torch.randn(6, 5, 7, 7)
    y = layer(x)
    full = F.conv2d(x, layer.weight, layer.bias, padding=1)
    zero_channels = (y == 0).flatten(2).all(dim=2)  # (N, C_out)
    assert zero_channels.sum(dim=1).tolist() == [c_out - k] * 6
    kept = ~zero_channels
    torch.testing.assert_close(y[kept], full[kept])
    # The kept channels are the k with the largest spatial max.
    top = full.amax(dim=(2, 3)).topk(k, dim=1).indices
    assert torch.equal(kept, torch.zeros_like(kept).scatter_(1, top, True))
    assert torch.equal(kept, layer.selection_mask(x))


def test_max_sum_keep_exactly_k_inputs_per_output() -> None:
    torch.manual_seed(6)
    x = torch.randn(3, 10, 5, 5)
    w = torch.randn(4, 10, 3, 3)
    for criterion in ("max", "sum"):
        mask = topk_conv2d_mask(x, w, None, 3, criterion, padding=1, chunk_bytes=1)
        assert mask.shape == (3, 4, 10) and mask.dtype == torch.bool
        assert (mask.sum(dim=2) == 3).all()
        assert torch.equal(mask, topk_conv2d_mask(x, w, None, 3, criterion, padding=1))


def test_chunk_plan() -> None:
    # Whole samples while one sample's temporaries fit, then channel chunks, never below 1 x 1.
    assert _plan(budget=1000, n_samples=8, n_channels=5, bytes_per_channel=10) == (8, 5)
    assert _plan(budget=120, n_samples=8, n_channels=5, bytes_per_channel=10) == (2, 5)
    assert _plan(budget=30, n_samples=8, n_channels=5, bytes_per_channel=10) == (1, 3)
    assert _plan(budget=1, n_samples=8, n_channels=5, bytes_per_channel=10) == (1, 1)


def test_lean_saves_no_response_tensor() -> None:
    """Backward keeps x, W and a bool mask, never the (N, C_out, C_in, H', W') responses."""
    torch.manual_seed(7)
    n, c_in, c_out, h = 4, 8, 6, 5
    x = torch.randn(n, c_in, h, h, requires_grad=True)
    layer = TopKConv2d(c_in, c_out, 3, k=2, padding=1)
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x)
    lean = {(tuple(t.shape), t.dtype) for t in saved}
    assert lean == {
        ((n, c_in, h, h), torch.float32),
        ((c_out, c_in, 3, 3), torch.float32),
        ((n, c_in, c_out), torch.bool),
    }
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        topk_conv2d_naive(x, layer.weight, layer.bias, 2, "max", 1, 1)
    assert max(t.numel() for t in saved) >= n * c_out * c_in * h * h


def test_module_repr_and_attributes() -> None:
    layer = TopKConv2d(8, 4, 3, k=2, criterion="sum", stride=2, padding=1, bias=False)
    assert (layer.k, layer.criterion, layer.stride, layer.padding) == (2, "sum", (2, 2), (1, 1))
    assert "k=2" in repr(layer) and "'sum'" in repr(layer)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"k": 0}, r"k=0 must be in \[1, in_channels=4\]"),
        ({"k": 5}, r"k=5 must be in \[1, in_channels=4\]"),
        ({"k": 2.0}, r"k=2.0"),
        ({"k": 7, "criterion": "neuron"}, r"k=7 must be in \[1, out_channels=6\]"),
        ({"criterion": "mean"}, r"criterion='mean'"),
        ({"in_channels": 0}, r"in_channels=0"),
        ({"out_channels": -1}, r"out_channels=-1"),
        ({"kernel_size": 0}, r"kernel_size=0"),
        ({"kernel_size": (3, 3, 3)}, r"kernel_size=\(3, 3, 3\)"),
        ({"stride": 0}, r"stride=0"),
        ({"padding": -1}, r"padding=-1"),
    ],
)
def test_topkconv_bad_arguments(kwargs: dict, message: str) -> None:
    args = {"in_channels": 4, "out_channels": 6, "kernel_size": 3, "k": 2} | kwargs
    with pytest.raises(ValueError, match=message):
        TopKConv2d(**args)


def test_topkconv_bad_inputs() -> None:
    layer = TopKConv2d(4, 6, 3, k=2)
    with pytest.raises(ValueError, match=r"input shape \(2, 5, 8, 8\)"):
        layer(torch.randn(2, 5, 8, 8))
    with pytest.raises(ValueError, match=r"input shape \(4, 8, 8\)"):
        layer(torch.randn(4, 8, 8))
    with pytest.raises(ValueError, match="smaller than kernel"):
        layer(torch.randn(1, 4, 2, 2))
    with pytest.raises(ValueError, match="chunk_bytes=0"):
        topk_conv2d(torch.randn(1, 4, 5, 5), layer.weight, None, 2, chunk_bytes=0)
    layer.chunk_bytes = 0  # the module passes its attribute through
    with pytest.raises(ValueError, match="chunk_bytes=0"):
        layer(torch.randn(1, 4, 5, 5))


# ----------------------------------------------------------------------------- DynamicKLinear


def test_dynamic_k_full_is_linear() -> None:
    torch.manual_seed(0)
    ref = nn.Linear(7, 3)
    torch.manual_seed(0)
    layer = DynamicKLinear(7, 3, k=7)
    torch.testing.assert_close(layer.weight, ref.weight, rtol=0, atol=0)
    torch.testing.assert_close(layer.bias, ref.bias, rtol=0, atol=0)
    x = torch.randn(5, 7)
    torch.testing.assert_close(layer(x), ref(x))
    # The naive reference with k = in_features is the same sum.
    torch.testing.assert_close(dynamic_k_linear_naive(x, ref.weight, ref.bias, 7), ref(x))


def test_dynamic_k_hand_checked() -> None:
    x = torch.tensor([[1.0, 2.0, 3.0]])
    w = torch.tensor([[1.0, -1.0, 2.0], [-1.0, -1.0, -1.0]], requires_grad=True)
    b = torch.tensor([0.5, 0.0])
    # Row 0 products [1, -2, 6]: top-2 = 6 + 1. Row 1 products [-1, -2, -3]: top-2 = -1 - 2.
    y = dynamic_k_linear(x, w, b, 2)
    torch.testing.assert_close(y, torch.tensor([[7.5, -3.0]]))
    (gw,) = torch.autograd.grad(y.sum(), (w,))
    # d out_j / d W_ji = x_i for the selected products only.
    torch.testing.assert_close(gw, torch.tensor([[1.0, 0.0, 3.0], [1.0, 2.0, 0.0]]))


@pytest.mark.parametrize("chunk_bytes", [None, 1, 100])
@pytest.mark.parametrize("shape", [(6, 20), (2, 3, 20), (20,)])
def test_dynamic_k_lean_matches_naive(chunk_bytes: int | None, shape: tuple[int, ...]) -> None:
    torch.manual_seed(8)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    layer = DynamicKLinear(20, 7, k=4).double()
    layer.chunk_bytes = chunk_bytes
    y = layer(x)
    y_ref = dynamic_k_linear_naive(x, layer.weight, layer.bias, 4)
    assert y.shape == (*shape[:-1], 7)
    torch.testing.assert_close(y, y_ref)
    g = torch.randn_like(y)
    params = (x, layer.weight, layer.bias)
    for got, want in zip(_grads(y, g, *params), _grads(y_ref, g, *params), strict=True):
        torch.testing.assert_close(got, want)


def test_dynamic_k_saves_indices_not_products() -> None:
    x = torch.randn(4, 30, requires_grad=True)
    layer = DynamicKLinear(30, 5, k=3)
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x)
    assert {tuple(t.shape) for t in saved} == {(4, 30), (5, 30), (4, 5, 3)}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"k": 0}, r"k=0 must be in \[1, in_features=8\]"),
        ({"k": 9}, r"k=9 must be in \[1, in_features=8\]"),
        ({"in_features": 0}, r"in_features=0"),
        ({"out_features": 0}, r"out_features=0"),
    ],
)
def test_dynamic_k_bad_arguments(kwargs: dict, message: str) -> None:
    args = {"in_features": 8, "out_features": 3, "k": 2} | kwargs
    with pytest.raises(ValueError, match=message):
        DynamicKLinear(**args)


def test_dynamic_k_bad_input() -> None:
    with pytest.raises(ValueError, match=r"input shape \(2, 9\)"):
        DynamicKLinear(8, 3, k=2)(torch.randn(2, 9))


@pytest.mark.parametrize("criterion", CRITERIA)
def test_empty_batch_and_strided_input(criterion: str) -> None:
    torch.manual_seed(9)
    layer = TopKConv2d(6, 5, 3, k=2, criterion=criterion, padding=1)
    x0 = torch.randn(0, 6, 5, 5, requires_grad=True)
    layer(x0).sum().backward()
    assert x0.grad is not None and x0.grad.shape == x0.shape
    # channels_last and transposed (non-contiguous) inputs give the naive result.
    for x in (
        torch.randn(3, 6, 5, 5).to(memory_format=torch.channels_last),
        torch.randn(3, 5, 6, 5).transpose(1, 2),
    ):
        x.requires_grad_()
        y = layer(x)
        y_ref = topk_conv2d_naive(x, layer.weight, layer.bias, 2, criterion, 1, 1)
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
        # y.sum() hands backward an expanded (stride-0) gradient.
        (gx,) = torch.autograd.grad(y.sum(), x)
        (gx_ref,) = torch.autograd.grad(y_ref.sum(), x)
        torch.testing.assert_close(gx, gx_ref, rtol=1e-5, atol=1e-5)


def test_dynamic_k_empty_batch() -> None:
    layer = DynamicKLinear(8, 3, k=2)
    x = torch.randn(0, 8, requires_grad=True)
    y = layer(x)
    y.sum().backward()
    assert y.shape == (0, 3) and x.grad is not None and x.grad.shape == (0, 8)
