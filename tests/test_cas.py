"""CAS (Bai et al., ICLR 2021): reweighting rows, out-of-band labels, auxiliary loss."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from defenses.cas import (
    ChannelActivationSuppression,
    cas_aux_logits,
    cas_aux_loss,
    cas_labels,
    cas_modules,
)

# Auxiliary classifier of a 3-channel, 2-class CAS with hand-picked weights.
WEIGHT = torch.tensor([[1.0, 2.0, 3.0], [-1.0, 0.5, -2.0]])
BIAS = torch.tensor([0.0, 0.25])


def _cas() -> ChannelActivationSuppression:
    cas = ChannelActivationSuppression(3, 2)
    with torch.no_grad():
        cas.classifier.weight.copy_(WEIGHT)
        cas.classifier.bias.copy_(BIAS)
    return cas


def _features() -> torch.Tensor:
    # Sample 0 has GAP g = [1, 0, 0] -> aux = [1, -0.75] -> argmax 0.
    # Sample 1 has GAP g = [-1, 0, 0] -> aux = [-1, 1.25] -> argmax 1.
    f = torch.zeros(2, 3, 2, 2)
    f[0, 0] = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    f[1, 0] = torch.tensor([[-1.0, -1.0], [-1.0, -1.0]])
    f[:, 1] = torch.tensor([[1.0, -1.0], [-1.0, 1.0]])  # GAP 0, nonzero values to scale
    return f


def test_eval_uses_argmax_row() -> None:
    cas = _cas().eval()
    f = _features()
    y = cas(f)
    assert isinstance(y, torch.Tensor) and y.shape == f.shape
    torch.testing.assert_close(cas.last_aux_logits, torch.tensor([[1.0, -0.75], [-1.0, 1.25]]))
    expected = torch.stack([f[0] * WEIGHT[0].view(3, 1, 1), f[1] * WEIGHT[1].view(3, 1, 1)])
    torch.testing.assert_close(y, expected)
    # Labels are ignored in eval mode: the deployed model routes by its own prediction.
    with cas_labels(cas, torch.tensor([1, 0])):
        torch.testing.assert_close(cas(f), expected)
    assert not cas.training


def test_training_uses_label_row() -> None:
    cas = _cas().train()
    f = _features()
    labels = torch.tensor([1, 0])  # the opposite of the argmax rows
    with cas_labels(cas, labels):
        y = cas(f)
    expected = torch.stack([f[0] * WEIGHT[1].view(3, 1, 1), f[1] * WEIGHT[0].view(3, 1, 1)])
    torch.testing.assert_close(y, expected)
    torch.testing.assert_close(cas.last_aux_logits, torch.tensor([[1.0, -0.75], [-1.0, 1.25]]))
    assert cas.training


def test_training_without_labels_falls_back_to_argmax() -> None:
    cas = _cas().train()
    f = _features()
    expected = torch.stack([f[0] * WEIGHT[0].view(3, 1, 1), f[1] * WEIGHT[1].view(3, 1, 1)])
    torch.testing.assert_close(cas(f), expected)


def test_flat_features() -> None:
    cas = _cas().eval()
    g = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])  # aux [1, -0.75], [3, -1.75]
    torch.testing.assert_close(cas(g), g * WEIGHT[0])
    with cas_labels(cas, torch.tensor([1, 1])):
        torch.testing.assert_close(cas.train()(g), g * WEIGHT[1])


def test_gradient_reaches_classifier_through_reweighting() -> None:
    cas = _cas().eval()
    cas(_features()).sum().backward()
    assert cas.classifier.weight.grad is not None
    assert cas.classifier.weight.grad.abs().sum() > 0


def test_aux_loss_is_mean_of_site_cross_entropies() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        ChannelActivationSuppression(4, 5),
        nn.Conv2d(4, 6, 3, padding=1),
        ChannelActivationSuppression(6, 5),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 5),
    )
    x, y = torch.randn(7, 3, 6, 6), torch.randint(0, 5, (7,))
    with cas_labels(model, y):
        model(x)
    sites = cas_modules(model)
    assert len(sites) == 2
    aux = cas_aux_logits(model)
    assert [a.shape for a in aux] == [(7, 5), (7, 5)]
    expected = (F.cross_entropy(aux[0], y) + F.cross_entropy(aux[1], y)) / 2
    torch.testing.assert_close(cas_aux_loss(model, y), expected)
    # The same logits as each module's own GAP -> classifier (eval mode, no labels).
    model.eval()
    h = model[0](x)
    model(x)
    torch.testing.assert_close(cas_aux_logits(model)[0], sites[0].classifier(h.mean(dim=(2, 3))))


def test_no_cas_gives_zero_loss() -> None:
    model = nn.Sequential(nn.Linear(3, 2))
    loss = cas_aux_loss(model, torch.tensor([0, 1]))
    assert loss.dim() == 0 and loss.item() == 0.0 and loss.device == torch.device("cpu")
    assert cas_aux_logits(model) == []
    with cas_labels(model, torch.tensor([0, 1])):  # harmless without CAS
        model(torch.randn(2, 3))


def test_aux_loss_before_forward_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="run a forward pass"):
        cas_aux_loss(ChannelActivationSuppression(3, 2), torch.tensor([0]))


def test_context_manager_clears_labels_even_on_exception() -> None:
    model = nn.Sequential(ChannelActivationSuppression(3, 2), ChannelActivationSuppression(3, 2))
    labels = torch.tensor([0, 1])
    with pytest.raises(KeyError), cas_labels(model, labels):
        assert all(m._labels is labels for m in cas_modules(model))
        raise KeyError("boom")
    assert all(m._labels is None for m in cas_modules(model))


def test_context_manager_nests() -> None:
    cas = _cas()
    outer, inner = torch.tensor([0, 0]), torch.tensor([1, 1])
    with cas_labels(cas, outer):
        with cas_labels(cas, inner):
            assert cas._labels is inner
        assert cas._labels is outer
    assert cas._labels is None


def test_label_batch_mismatch() -> None:
    cas = _cas().train()
    with pytest.raises(ValueError, match="labels batch size 3 must equal the input batch size 2"):
        with cas_labels(cas, torch.tensor([0, 1, 0])):
            cas(_features())
    cas(_features())
    with pytest.raises(ValueError, match="labels batch size 3"):
        cas_aux_loss(cas, torch.tensor([0, 1, 0]))


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (torch.tensor([0, 2]), r"labels in \[0, 2\] must be in \[0, num_classes=2\)"),
        (torch.tensor([-1, 0]), r"labels in \[-1, 0\]"),
        (torch.tensor([0.0, 1.0]), "integer dtype"),
        (torch.tensor([[0, 1]]), r"labels \(1, 2\) must be a 1-D tensor"),
    ],
)
def test_bad_labels(labels: torch.Tensor, message: str) -> None:
    with pytest.raises(ValueError, match=message), cas_labels(_cas(), labels):
        pass


@pytest.mark.parametrize(
    ("channels", "num_classes", "message"),
    [(0, 10, "channels=0 must be an int >= 1"), (8, 1, "num_classes=1 must be an int >= 2"),
     (8.0, 10, "channels=8.0"), (True, 10, "channels=True")],
)
def test_bad_arguments(channels: object, num_classes: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ChannelActivationSuppression(channels, num_classes)  # type: ignore[arg-type]


def test_bad_input_shape() -> None:
    with pytest.raises(ValueError, match=r"input shape \(2, 4, 2, 2\)"):
        _cas()(torch.randn(2, 4, 2, 2))


def test_deepcopy_after_training_forward() -> None:
    """The latest aux logits (a non-leaf tensor) must not break copy.deepcopy of the model."""
    model = nn.Sequential(ChannelActivationSuppression(3, 2)).train()
    with cas_labels(model, torch.tensor([0, 1])):
        model(torch.randn(2, 3, 4, 4))
        clone = copy.deepcopy(model)
    assert clone[0].last_aux_logits is None and clone[0]._labels is None
    assert model[0].last_aux_logits is not None
    torch.testing.assert_close(clone[0].classifier.weight, model[0].classifier.weight)
    clone.eval()
    assert clone(torch.randn(2, 3, 4, 4)).shape == (2, 3, 4, 4)
