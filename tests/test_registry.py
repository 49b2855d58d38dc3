"""The defense registry: names, duplicates, argument checking (timm create_act style)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from torch import nn

import defenses
from defenses import _registry, create_defense, list_defenses, register_defense

BUILTINS = {"kap", "kwta", "kaf", "topkconv", "dynamic_k", "cas", "noise"}


@pytest.fixture
def clean_registry() -> Iterator[None]:
    """Let a test register names without leaking them into other tests."""
    saved = dict(_registry._REGISTRY)
    try:
        yield
    finally:
        _registry._REGISTRY.clear()
        _registry._REGISTRY.update(saved)


class _Scale(nn.Module):
    def __init__(self, factor: float = 2.0, *, bias: float = 0.0) -> None:
        super().__init__()
        self.factor, self.bias = factor, bias


def test_builtins_registered_and_sorted() -> None:
    names = list_defenses()
    assert BUILTINS <= set(names)
    assert names == sorted(names)


def test_builtins_map_to_public_classes() -> None:
    expected = {
        "kap": defenses.KernelAveragePool,
        "kwta": defenses.KWinnersTakeAll,
        "kaf": defenses.KernelActivation,
        "topkconv": defenses.TopKConv2d,
        "dynamic_k": defenses.DynamicKLinear,
        "cas": defenses.ChannelActivationSuppression,
        "noise": defenses.ActivationNoise,
    }
    for name, cls in expected.items():
        assert _registry._REGISTRY[name].layer is cls


def test_duplicate_name_rejected(clean_registry: None) -> None:
    with pytest.raises(ValueError, match="'kap' is already registered"):
        register_defense("kap", _Scale)
    register_defense("scale", _Scale)
    with pytest.raises(ValueError, match="'scale' is already registered"):
        register_defense("scale", _Scale)
    assert _registry._REGISTRY["kap"].layer is defenses.KernelAveragePool


@pytest.mark.parametrize("bad", ["", None, 3])
def test_bad_name_rejected(clean_registry: None, bad: object) -> None:
    with pytest.raises(ValueError, match="non-empty string"):
        register_defense(bad, _Scale)  # type: ignore[arg-type]


def test_non_callable_rejected(clean_registry: None) -> None:
    with pytest.raises(ValueError, match="must be a callable"):
        register_defense("thing", 42)  # type: ignore[arg-type]


def test_register_then_create(clean_registry: None) -> None:
    assert register_defense("scale", _Scale) is _Scale
    assert "scale" in list_defenses()
    layer = create_defense("scale", factor=3.0, bias=1.0)
    assert isinstance(layer, _Scale) and (layer.factor, layer.bias) == (3.0, 1.0)


def test_unknown_name_lists_allowed() -> None:
    with pytest.raises(ValueError) as err:
        create_defense("kwat")
    message = str(err.value)
    assert "'kwat'" in message
    for name in BUILTINS:
        assert name in message


def test_unknown_kwargs_named_with_allowed() -> None:
    with pytest.raises(ValueError) as err:
        create_defense("kwta", gama=0.1, sparsity=0.2)
    message = str(err.value)
    assert "gama" in message and "sparsity" in message
    assert "allowed: gamma, mode" in message


def test_missing_required_kwargs_named() -> None:
    with pytest.raises(ValueError, match="requires argument\\(s\\) channels"):
        create_defense("kaf")


def test_layer_value_errors_pass_through() -> None:
    with pytest.raises(ValueError, match="dictionary_size"):
        create_defense("kaf", channels=4, dictionary_size=1)


def test_each_call_returns_a_fresh_instance() -> None:
    a = create_defense("kaf", channels=4)
    b = create_defense("kaf", channels=4)
    assert a is not b and a.alpha is not b.alpha
