"""Contract tests generated from the registry: every registered defense is a drop-in layer.

Each registration carries a small example of its layer (a defense without one fails
``test_every_registered_defense_has_a_case``), in the spirit of timm's registry-driven tests.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from torch import Tensor, nn

from defenses import Example, cas_aux_loss, cas_labels, get_defense, list_defenses

# Every registered defense declares a tiny example of itself (``register_defense(example=...)``),
# so a new defense, a plug-in included, is covered here without editing this file.
Case = Example


def _cases() -> dict[str, Case]:
    return {name: get_defense(name).example for name in list_defenses() if get_defense(name).example}


CASES: dict[str, Case] = _cases()

NAMES = list_defenses()


def _case(name: str) -> Case:
    if name not in CASES:
        pytest.fail(f"registered defense {name!r} declares no example (register_defense(example=...))")
    return CASES[name]


def _make(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return _case(name).make()


def _inputs(case: Case, seed: int = 1) -> tuple[Tensor, Tensor | None]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(case.in_shape, generator=gen)
    y = torch.randint(0, case.labels, (case.in_shape[0],), generator=gen) if case.labels else None
    return x, y


def _labels_ctx(module: nn.Module, y: Tensor | None) -> contextlib.AbstractContextManager:
    return cas_labels(module, y) if y is not None else contextlib.nullcontext()


def _forward(module: nn.Module, x: Tensor, y: Tensor | None) -> Tensor:
    with _labels_ctx(module, y):
        return module(x)


def test_every_registered_defense_has_a_case() -> None:
    assert set(NAMES) <= set(CASES), sorted(set(NAMES) - set(CASES))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("training", [True, False])
def test_output_shape_dtype_and_finite(name: str, training: bool) -> None:
    case, layer = _case(name), _make(name)
    layer.train(training)
    x, y = _inputs(case)
    out = _forward(layer, x, y)
    assert isinstance(out, Tensor)
    assert tuple(out.shape) == case.out_shape
    assert out.dtype == x.dtype and bool(torch.isfinite(out).all())


@pytest.mark.parametrize("name", NAMES)
def test_respects_float64(name: str) -> None:
    case, layer = _case(name), _make(name).double()
    layer.eval()
    x, y = _inputs(case)
    out = _forward(layer, x.double(), y)
    assert out.dtype == torch.float64


@pytest.mark.parametrize("name", NAMES)
def test_every_parameter_and_the_input_receive_a_gradient(name: str) -> None:
    case, layer = _case(name), _make(name)
    layer.train()
    x, y = _inputs(case)
    x.requires_grad_(True)
    with _labels_ctx(layer, y):
        out = layer(x)
        loss = (out * torch.randn_like(out)).sum()
        if y is not None:
            loss = loss + cas_aux_loss(layer, y)
    loss.backward()
    assert x.grad is not None and bool(x.grad.abs().sum() > 0)
    for pname, p in layer.named_parameters():
        assert p.grad is not None, f"{name}.{pname} got no gradient"
        assert bool(torch.isfinite(p.grad).all()), f"{name}.{pname} has a non-finite gradient"
        assert bool(p.grad.abs().sum() > 0), f"{name}.{pname} got an all-zero gradient"


@pytest.mark.parametrize("name", NAMES)
def test_eval_is_deterministic(name: str) -> None:
    case, layer = _case(name), _make(name)
    layer.eval()
    x, _ = _inputs(case)
    with torch.no_grad():
        torch.manual_seed(5)
        a = layer(x)
        torch.manual_seed(6)
        b = layer(x)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_train_determinism_and_mode_dependence(name: str) -> None:
    case, layer = _case(name), _make(name)
    x, y = _inputs(case)
    with torch.no_grad():
        layer.train()
        torch.manual_seed(5)
        a = _forward(layer, x, y)
        torch.manual_seed(6)
        b = _forward(layer, x, y)
        layer.eval()
        c = layer(x)
    if case.stochastic_train:
        assert not torch.equal(a, b)
    else:
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    if not case.mode_dependent:
        torch.testing.assert_close(a, c)


def test_noise_train_vs_eval() -> None:
    layer = _make("noise")
    x, _ = _inputs(CASES["noise"])
    layer.train()
    assert not torch.equal(layer(x), x)
    layer.eval()
    torch.testing.assert_close(layer(x), x, rtol=0, atol=0)


def test_cas_train_uses_labels_eval_uses_prediction() -> None:
    """Bai et al.: f * W[y] in training, f * W[argmax aux(GAP f)] at test time."""
    layer = _make("cas")
    x, y = _inputs(CASES["cas"])
    weight = layer.classifier.weight
    with torch.no_grad():
        layer.train()
        torch.testing.assert_close(_forward(layer, x, y), x * weight[y][:, :, None, None])
        layer.eval()
        pred = layer.classifier(x.mean(dim=(2, 3))).argmax(1)
        torch.testing.assert_close(layer(x), x * weight[pred][:, :, None, None])


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip(name: str) -> None:
    case = _case(name)
    source = _make(name, seed=0)
    with torch.no_grad():
        for p in source.parameters():  # move away from any deterministic init
            p.add_(0.1 * torch.randn_like(p))
    target = _make(name, seed=123)
    target.load_state_dict(source.state_dict())
    source.eval()
    target.eval()
    x, _ = _inputs(case)
    with torch.no_grad():
        torch.testing.assert_close(target(x), source(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_repr_names_the_class(name: str) -> None:
    layer = _make(name)
    assert repr(layer).startswith(type(layer).__name__)


@pytest.mark.parametrize("name", NAMES)
def test_deepcopy_after_a_training_forward(name: str) -> None:
    """Training loops copy models (best checkpoint, EMA): forward state must not block it."""
    case, layer = _case(name), _make(name)
    layer.train()
    x, y = _inputs(case)
    x.requires_grad_(True)
    _forward(layer, x, y)
    clone = copy.deepcopy(layer)
    clone.eval()
    layer.eval()
    with torch.no_grad():
        torch.testing.assert_close(clone(x), layer(x), rtol=0, atol=0)
