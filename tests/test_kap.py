"""Kernel Average / Max Pool (Bashivan et al.) against the paper's formula, computed by loops."""

from __future__ import annotations

import math

import pytest
import torch

import defenses.kap as kap_module
from defenses.kap import (
    KernelAveragePool,
    channel_grid,
    kap_out_channels,
    kap_width_factor,
)


def _window(length: int, k: int, s: int, j: int) -> list[int]:
    """Indices of window j on a padded axis (left pad floor((K-1)/2)); negatives/overflow = padding."""
    start = j * s - (k - 1) // 2
    return list(range(start, start + k))


def _loop_kap_1d(x: torch.Tensor, k: int, s: int, mode: str, include_pad: bool) -> torch.Tensor:
    c = x.shape[1]
    outs = []
    for j in range(math.ceil(c / s)):
        real = [i for i in _window(c, k, s, j) if 0 <= i < c]
        vals = x[:, real]
        if mode == "max":
            outs.append(vals.amax(1))
        else:
            outs.append(vals.sum(1) / (k if include_pad else len(real)))
    return torch.stack(outs, 1)


def _loop_kap_2d(x: torch.Tensor, k: int, s: int, mode: str, include_pad: bool) -> torch.Tensor:
    rows, cols = channel_grid(x.shape[1], s)
    outs = []
    for a in range(math.ceil(rows / s)):
        for b in range(math.ceil(cols / s)):
            real = [
                i * cols + j
                for i in _window(rows, k, s, a)
                for j in _window(cols, k, s, b)
                if 0 <= i < rows and 0 <= j < cols
            ]
            vals = x[:, real]
            if mode == "max":
                outs.append(vals.amax(1))
            else:
                outs.append(vals.sum(1) / (k * k if include_pad else len(real)))
    return torch.stack(outs, 1)


def test_1d_interior_channel_is_window_mean():
    torch.manual_seed(0)
    x = torch.randn(2, 10, 3, 4)
    y = KernelAveragePool(kernel_size=3, stride=1, dims=1)(x)
    assert y.shape == x.shape
    for c in range(1, 9):
        torch.testing.assert_close(y[:, c], x[:, c - 1 : c + 2].mean(1))
    # Edge windows divide by K (padding counted, paper Alg. 1).
    torch.testing.assert_close(y[:, 0], x[:, :2].sum(1) / 3)
    torch.testing.assert_close(y[:, 9], x[:, 8:].sum(1) / 3)


def test_1d_count_include_pad_false_divides_by_real_channels():
    torch.manual_seed(0)
    x = torch.randn(2, 7, 3, 3)
    y = KernelAveragePool(kernel_size=3, stride=1, dims=1, count_include_pad=False)(x)
    torch.testing.assert_close(y[:, 0], x[:, :2].mean(1))
    torch.testing.assert_close(y[:, 6], x[:, 5:].mean(1))
    torch.testing.assert_close(y[:, 3], x[:, 2:5].mean(1))


@pytest.mark.parametrize("mode", ["avg", "max"])
@pytest.mark.parametrize("include_pad", [True, False])
@pytest.mark.parametrize(
    ("k", "s", "c"),
    [(1, 1, 5), (2, 1, 6), (2, 2, 7), (3, 1, 8), (3, 2, 9), (3, 3, 10), (4, 1, 9), (4, 3, 11), (5, 2, 6), (5, 1, 3)],
)
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_1d_matches_loop(k, s, c, mode, include_pad, grad):
    # grad: "max" pools with PyTorch's max_pool (indices for backward) only when autograd needs
    # them, and with strided windows' amax otherwise; both must give the formula's values.
    torch.manual_seed(1)
    x = torch.randn(2, c, 3, 2, requires_grad=grad)
    kap = KernelAveragePool(kernel_size=k, stride=s, dims=1, mode=mode, count_include_pad=include_pad)
    y = kap(x)
    assert y.shape == (2, math.ceil(c / s), 3, 2) == (2, kap.out_channels(c), 3, 2)
    torch.testing.assert_close(y, _loop_kap_1d(x, k, s, mode, include_pad))


@pytest.mark.parametrize("mode", ["avg", "max"])
@pytest.mark.parametrize("include_pad", [True, False])
@pytest.mark.parametrize(
    ("k", "s", "c"),
    [(1, 1, 6), (2, 1, 12), (2, 2, 16), (3, 1, 12), (3, 1, 7), (3, 2, 64), (3, 3, 36), (4, 2, 16), (4, 4, 64)],
)
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_2d_matches_loop(k, s, c, mode, include_pad, grad):
    torch.manual_seed(2)
    x = torch.randn(2, c, 2, 3, requires_grad=grad)
    kap = KernelAveragePool(kernel_size=k, stride=s, dims=2, mode=mode, count_include_pad=include_pad)
    y = kap(x)
    assert y.shape[1] == kap.out_channels(c) == c // (s * s)
    torch.testing.assert_close(y, _loop_kap_2d(x, k, s, mode, include_pad))


def test_2d_grid_layout_is_row_major():
    assert channel_grid(64) == (8, 8)
    assert channel_grid(12) == (3, 4)
    assert channel_grid(128) == (8, 16)
    assert channel_grid(7) == (1, 7)
    assert channel_grid(1) == (1, 1)
    # A one-hot channel 5 on the 3x4 grid sits at (1, 1): a 3x3 mean spreads it over the 3x3 block
    # of cells (0..2, 0..2), i.e. channels {0,1,2,4,5,6,8,9,10}, each with weight 1/9.
    x = torch.zeros(1, 12, 1, 1)
    x[0, 5] = 9.0
    y = KernelAveragePool(kernel_size=3, dims=2)(x).flatten()
    expected = torch.zeros(12)
    expected[[0, 1, 2, 4, 5, 6, 8, 9, 10]] = 1.0
    torch.testing.assert_close(y, expected)


def test_max_mode_padding_never_wins():
    x = -torch.ones(1, 6, 2, 2) - torch.arange(6.0).view(1, 6, 1, 1)  # all strictly negative
    for dims in (1, 2):
        y = KernelAveragePool(kernel_size=3, dims=dims, mode="max")(x)
        assert (y < 0).all()
    y = KernelAveragePool(kernel_size=3, dims=1, mode="max")(x)
    torch.testing.assert_close(y[0, :, 0, 0], torch.tensor([-1.0, -1.0, -2.0, -3.0, -4.0, -5.0]))


def test_flat_input_and_gradient():
    torch.manual_seed(3)
    x = torch.randn(4, 10, requires_grad=True)
    kap = KernelAveragePool(kernel_size=3, dims=1)
    y = kap(x)
    assert y.shape == (4, 10)
    y.sum().backward()
    # d(sum out)/dx_c = (number of windows containing c) / K: 3/3 inside, 2/3 at the edges.
    expected = torch.ones(10)
    expected[[0, -1]] = 2.0 / 3.0
    torch.testing.assert_close(x.grad, expected.expand(4, 10))


@pytest.mark.parametrize("dims", [1, 2])
def test_gradcheck(dims):
    torch.manual_seed(4)
    x = torch.randn(1, 12, 1, 2, dtype=torch.float64, requires_grad=True)
    for k, s in ((3, 1), (2, 2), (4, 1)):
        for include_pad in (True, False):
            kap = KernelAveragePool(kernel_size=k, stride=s, dims=dims, count_include_pad=include_pad)
            if dims == 2 and s == 2:
                x2 = torch.randn(1, 16, 1, 2, dtype=torch.float64, requires_grad=True)
                assert torch.autograd.gradcheck(kap, (x2,))
            else:
                assert torch.autograd.gradcheck(kap, (x,))


def test_out_channels_and_width_factor():
    assert kap_width_factor(1, 1) == 1
    assert kap_width_factor(3, 1) == 3
    assert kap_width_factor(2, 2) == 4
    assert kap_width_factor(3, 2) == 9
    # Widening by the factor restores the width the layer would have had without KAP.
    for target in (16, 32, 64, 128, 256):
        for s in (1, 2):
            for dims in (1, 2):
                assert kap_out_channels(target * kap_width_factor(s, dims), s, dims) == target
    assert KernelAveragePool(kernel_size=3, stride=3, dims=1).out_channels(10) == 4
    assert KernelAveragePool(kernel_size=2, stride=2, dims=2).out_channels(256) == 64


def test_2d_stride_needs_divisible_grid():
    kap = KernelAveragePool(kernel_size=2, stride=2, dims=2)
    # 18 = 1x18, 2x9, 3x6: no grid with both sides even.
    with pytest.raises(ValueError, match="in_channels=18"):
        kap(torch.randn(1, 18, 2, 2))
    with pytest.raises(ValueError, match="in_channels=18"):
        kap.out_channels(18)


def test_2d_strided_grid_is_the_squarest_divisible_one():
    assert channel_grid(12, 2) == (2, 6)  # the squarest 3x4 has an odd side
    assert KernelAveragePool(kernel_size=2, stride=2, dims=2).out_channels(12) == 3
    # small_cnn's first conv (32) widened by 3^2 for stride 3: 16x18 cannot take stride 3, 12x24 can.
    assert channel_grid(288) == (16, 18) and channel_grid(288, 3) == (12, 24)
    assert KernelAveragePool(kernel_size=3, stride=3, dims=2).out_channels(288) == 32
    x = torch.randn(2, 288, 2, 2)
    torch.testing.assert_close(KernelAveragePool(kernel_size=3, stride=3, dims=2)(x), _loop_kap_2d(x, 3, 3, "avg", True))


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"kernel_size": 0}, "kernel_size=0"),
        ({"kernel_size": 2.5}, "kernel_size=2.5"),
        ({"stride": 0}, "stride=0"),
        ({"kernel_size": 2, "stride": 3}, "stride=3"),
        ({"dims": 3}, "dims=3"),
        ({"mode": "median"}, "mode='median'"),
    ],
)
def test_bad_arguments_raise(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        KernelAveragePool(**kwargs)


def test_bad_helper_arguments_raise():
    with pytest.raises(ValueError, match="dims=0"):
        kap_width_factor(2, 0)
    with pytest.raises(ValueError, match="stride=0"):
        kap_width_factor(0, 1)
    with pytest.raises(ValueError, match="channels=0"):
        channel_grid(0)
    with pytest.raises(ValueError, match=r"input shape \(5,\)"):
        KernelAveragePool()(torch.randn(5))


def test_odd_kernel_pools_without_padded_copy_and_keeps_dtype(monkeypatch):
    # With autograd on (training, gradient attacks) a padded copy would be kept for backward; the
    # forward-only "max" path pads a copy it frees at once, see the next test.
    def no_pad(*args, **kwargs):
        raise AssertionError("odd kernel sizes must pool on a view, without F.pad")

    monkeypatch.setattr(kap_module.F, "pad", no_pad)
    x = torch.randn(2, 16, 4, 4, dtype=torch.float64, requires_grad=True)
    for dims in (1, 2):
        for mode in ("avg", "max"):
            for include_pad in (True, False):
                y = KernelAveragePool(kernel_size=3, dims=dims, mode=mode, count_include_pad=include_pad)(x)
                assert y.dtype == torch.float64 and y.shape == x.shape
    assert "kernel_size=3" in repr(KernelAveragePool(kernel_size=3))
    assert "count_include_pad" not in repr(KernelAveragePool(mode="max"))


def test_max_mode_without_autograd_uses_no_max_pool_and_returns_the_same_values(monkeypatch):
    torch.manual_seed(6)
    cases = [(1, 4, 4, 64), (1, 3, 1, 12), (2, 3, 3, 36), (2, 2, 2, 16), (2, 4, 1, 12)]
    x = {c: torch.randn(3, c, 4, 4, dtype=torch.float64) for *_, c in cases}
    with_indices = {case: KernelAveragePool(*case[1:3], dims=case[0], mode="max")(x[case[3]].requires_grad_())
                    for case in cases}

    def no_pool(*args, **kwargs):
        raise AssertionError("a forward pass without autograd must not pay for max indices")

    monkeypatch.setattr(kap_module.F, "max_pool2d", no_pool)
    monkeypatch.setattr(kap_module.F, "max_pool3d", no_pool)
    for dims, k, s, c in cases:
        kap = KernelAveragePool(kernel_size=k, stride=s, dims=dims, mode="max")
        with torch.no_grad():
            fast = kap(x[c])
        assert torch.equal(fast, with_indices[dims, k, s, c].detach())
        assert torch.equal(kap(x[c].detach()), fast)  # an input without grad takes it too
    with pytest.raises(AssertionError, match="max indices"):
        KernelAveragePool(kernel_size=3, mode="max")(torch.randn(1, 9, 2, 2, requires_grad=True))


def test_empty_batch():
    y = KernelAveragePool(kernel_size=2, stride=2, dims=2)(torch.randn(0, 16, 3, 3))
    assert y.shape == (0, 4, 3, 3)


@pytest.mark.parametrize("positions", [(2, 3), (8, 8), (9, 10)])
@pytest.mark.parametrize(("k", "c"), [(3, 64), (5, 12), (3, 7), (1, 16)])
def test_2d_box_path_matches_loop_and_gradcheck(positions, k, c):
    # Odd K, stride 1, pad counted: enough positions per channel select the channels-last pooling
    # path (its backward reuses the forward, the operator being symmetric); fewer take shifted adds.
    assert (math.prod(positions) >= kap_module._BOX_MIN_POSITIONS) == (positions != (2, 3))
    torch.manual_seed(5)
    x = torch.randn(2, c, *positions, dtype=torch.float64, requires_grad=True)
    kap = KernelAveragePool(kernel_size=k, stride=1, dims=2, count_include_pad=True)
    torch.testing.assert_close(kap(x), _loop_kap_2d(x, k, 1, "avg", True))
    assert torch.autograd.gradcheck(kap, (x[:1].detach().requires_grad_(),))
    # The gradient of a weighted sum equals the loop formula's (a second, independent check).
    w = torch.randn_like(x)
    (g,) = torch.autograd.grad((kap(x) * w).sum(), x)
    xr = x.detach().requires_grad_()
    (gr,) = torch.autograd.grad((_loop_kap_2d(xr, k, 1, "avg", True) * w).sum(), xr)
    torch.testing.assert_close(g, gr)
