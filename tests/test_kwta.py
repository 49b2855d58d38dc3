"""k-Winners-Take-All (Xiao et al.) against the definition, plus the annealing schedule."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from defenses.kwta import KWinnersTakeAll, annealed_gamma, kwta_k, set_gamma


def _reference(x: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest entries of every row (distinct values), by sorting."""
    out = torch.zeros_like(x)
    for i, row in enumerate(x):
        idx = row.argsort(descending=True)[:k]
        out[i, idx] = row[idx]
    return out


def test_volume_mode_keeps_exactly_k_per_sample():
    torch.manual_seed(0)
    x = torch.randn(3, 4, 5, 5)  # 100 distinct values per sample
    y = KWinnersTakeAll(gamma=0.2)(x)
    assert y.shape == x.shape
    assert ((y != 0).flatten(1).sum(1) == 20).all()
    torch.testing.assert_close(y.flatten(1), _reference(x.flatten(1), 20))


def test_winners_are_ranked_per_sample_not_per_batch():
    x = torch.stack([torch.arange(10.0), torch.arange(10.0) - 100.0])  # sample 1 entirely smaller
    y = KWinnersTakeAll(gamma=0.3)(x)
    torch.testing.assert_close(y[0], torch.tensor([0.0] * 7 + [7.0, 8.0, 9.0]))
    # No ReLU inside: negative winners survive.
    torch.testing.assert_close(y[1], torch.tensor([0.0] * 7 + [-93.0, -92.0, -91.0]))


def test_flat_features_input():
    torch.manual_seed(1)
    x = torch.randn(4, 50)
    y = KWinnersTakeAll(gamma=0.1)(x)
    torch.testing.assert_close(y, _reference(x, 5))


def test_channel_mode_ranks_within_each_channel():
    torch.manual_seed(2)
    x = torch.randn(2, 3, 4, 4)
    y = KWinnersTakeAll(gamma=0.25, mode="channel")(x)
    assert ((y != 0).flatten(2).sum(2) == 4).all()
    expected = _reference(x.reshape(6, 16), 4).view_as(x)
    torch.testing.assert_close(y, expected)


def test_k_is_floor_with_minimum_one():
    assert kwta_k(0.2, 100) == 20
    assert kwta_k(0.29, 100) == 29  # 0.29 * 100 = 28.999... in floating point
    assert kwta_k(0.15, 10) == 1
    assert kwta_k(0.01, 10) == 1  # clamped to 1
    assert kwta_k(1.0, 7) == 7
    y = KWinnersTakeAll(gamma=0.01)(torch.arange(10.0).view(1, 10))
    torch.testing.assert_close(y, torch.tensor([[0.0] * 9 + [9.0]]))


def test_ties_at_threshold_are_all_kept():
    x = torch.tensor([[1.0, 5.0, 5.0, 5.0, 0.0]])
    y = KWinnersTakeAll(gamma=0.4)(x)  # k = 2, the 2nd largest is 5 -> all three 5s survive
    torch.testing.assert_close(y, torch.tensor([[0.0, 5.0, 5.0, 5.0, 0.0]]))


def test_gamma_one_is_identity():
    x = torch.randn(2, 3, 2, 2)
    assert torch.equal(KWinnersTakeAll(gamma=1.0)(x), x)


def test_gradient_flows_only_through_winners():
    torch.manual_seed(3)
    x = torch.randn(2, 30, requires_grad=True)
    y = KWinnersTakeAll(gamma=0.2)(x)
    weights = torch.randn_like(y)
    (y * weights).sum().backward()
    winners = y.detach() != 0
    torch.testing.assert_close(x.grad, torch.where(winners, weights, torch.zeros_like(weights)))


def test_autograd_saves_only_a_bool_mask():
    x = torch.randn(2, 4, 3, 3, requires_grad=True)
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        KWinnersTakeAll(gamma=0.2)(x)
    assert saved and all(t.dtype == torch.bool for t in saved)


def test_keeps_dtype_and_threshold_not_in_graph():
    x = torch.randn(2, 12, dtype=torch.float64, requires_grad=True)
    y = KWinnersTakeAll(gamma=0.5)(x)
    assert y.dtype == torch.float64
    assert torch.autograd.gradcheck(KWinnersTakeAll(gamma=0.5), (x,))


def test_set_gamma_sets_every_module():
    model = nn.Sequential(KWinnersTakeAll(0.2), nn.Linear(3, 3), nn.Sequential(KWinnersTakeAll(0.3, mode="channel")))
    assert set_gamma(model, 0.1) == 2
    assert [m.gamma for m in model.modules() if isinstance(m, KWinnersTakeAll)] == [0.1, 0.1]
    with pytest.raises(ValueError, match=r"gamma=1\.5"):
        set_gamma(model, 1.5)
    assert [m.gamma for m in model.modules() if isinstance(m, KWinnersTakeAll)] == [0.1, 0.1]
    assert set_gamma(nn.Linear(2, 2), 0.2) == 0


def test_annealing_schedule_values():
    # start 0.2, -0.005 every 2 epochs until the target 0.1 (Xiao et al.'s fine-tune config)
    values = [annealed_gamma(e, target=0.1) for e in range(45)]
    assert values[:5] == [0.2, 0.2, 0.195, 0.195, 0.19]
    assert values[39] == 0.105 and values[40] == 0.1 and values[44] == 0.1
    assert all(a >= b for a, b in itertools.pairwise(values))
    assert annealed_gamma(3, target=0.05, start=0.3, step=0.01, every=1) == 0.27
    assert annealed_gamma(100, target=0.3) == 0.3  # target above start: constant target
    assert math.isclose(annealed_gamma(7, target=0.01, step=0.0), 0.2)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"epoch": -1, "target": 0.1}, "epoch=-1"),
        ({"epoch": 1.5, "target": 0.1}, "epoch=1.5"),
        ({"epoch": 0, "target": 0.0}, "target=0.0"),
        ({"epoch": 0, "target": 0.1, "start": 1.2}, "start=1.2"),
        ({"epoch": 0, "target": 0.1, "step": -0.1}, "step=-0.1"),
        ({"epoch": 0, "target": 0.1, "every": 0}, "every=0"),
    ],
)
def test_annealing_bad_arguments(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        annealed_gamma(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"gamma": 0.0}, "gamma=0.0"),
        ({"gamma": 1.1}, "gamma=1.1"),
        ({"gamma": -0.2}, "gamma=-0.2"),
        ({"mode": "spatial"}, "mode='spatial'"),
    ],
)
def test_bad_constructor_arguments(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        KWinnersTakeAll(**kwargs)


def test_channel_mode_rejects_flat_input():
    with pytest.raises(ValueError, match="mode='channel'"):
        KWinnersTakeAll(mode="channel")(torch.randn(2, 8))
    assert "gamma=0.2, mode='volume'" in repr(KWinnersTakeAll())


def test_empty_batch():
    assert KWinnersTakeAll()(torch.randn(0, 4, 3, 3)).shape == (0, 4, 3, 3)
