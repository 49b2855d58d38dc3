"""Channel-wise Activation Suppressing (CAS).

Reference:
    Y. Bai, Y. Zeng, Y. Jiang, S.-T. Xia, X. Ma, Y. Wang, "Improving Adversarial Robustness via
    Channel-wise Activation Suppressing", ICLR 2021.

A CAS module sits on a block's output f (N, C, H, W): an auxiliary linear classifier reads the
globally average-pooled channels, g = GAP(f), aux = W g + b, and the channels are reweighted by one
raw row of W (no softmax; entries may be negative): the row of the true label while training, the
row of the auxiliary classifier's own prediction at test time. Training adds the auxiliary
cross-entropies: loss = CE(main, y) + beta * (1/S) * sum_s CE(aux_s, y) over the S CAS sites.

Unlike the authors' code (whose forward switches train/eval itself and returns a tuple), the mode
here comes from ``module.training``, the labels arrive out of band (:func:`cas_labels`) and
``forward`` returns one tensor, so any attack library can run the model. The auxiliary logits of
the last forward stay on the module (``last_aux_logits``) for the training loss and for the
adaptive attack (loss CE(main) + beta * CE(aux), paper's white-box evaluation).
"""

from __future__ import annotations

import numbers
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from defenses._registry import Example, register_defense
from defenses.backbones import LayerSet

__all__ = [
    "ChannelActivationSuppression",
    "cas_aux_logits",
    "cas_aux_loss",
    "cas_joint_ce",
    "cas_labels",
    "cas_modules",
]


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name}={value!r} must be an int >= {minimum}")
    return int(value)


class ChannelActivationSuppression(nn.Module):
    """CAS module (Bai et al., "Improving Adversarial Robustness via Channel-wise Activation
    Suppressing", ICLR 2021).

    forward(f) = f * classifier.weight[row] broadcast over space, with aux = classifier(GAP(f)) and
    row = the labels set by :func:`cas_labels` in training mode, else argmax(aux). Training mode
    without labels (e.g. an attack run on a model left in train mode) also uses argmax(aux): the
    module never fails for lack of labels and never changes its own mode. Gradients flow into the
    classifier through both the auxiliary loss and the reweighting, as in the authors' code.

    Args:
        channels: C >= 1, channels of the feature map.
        num_classes: classes of the auxiliary classifier, >= 2 (the authors' code hard-codes 10).

    Attributes:
        classifier: ``nn.Linear(channels, num_classes)``, the auxiliary classifier.
        last_aux_logits: auxiliary logits (N, num_classes) of the latest forward, or None.

    Shape:
        Input (N, C, H, W) or (N, C); output the same shape.

    Examples::

        >>> cas = ChannelActivationSuppression(512, num_classes=10)
        >>> y = cas.eval()(torch.randn(8, 512, 4, 4))
        >>> cas.last_aux_logits.shape
        torch.Size([8, 10])
    """

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        self.channels = _check_int("channels", channels, 1)
        self.num_classes = _check_int("num_classes", num_classes, 2)
        self.classifier = nn.Linear(self.channels, self.num_classes)
        self.last_aux_logits: Tensor | None = None
        # Set only inside cas_labels(); plain attribute, never a buffer (not model state).
        self._labels: Tensor | None = None

    def forward(self, f: Tensor) -> Tensor:
        if f.dim() not in (2, 4) or f.shape[1] != self.channels:
            raise ValueError(
                f"input shape {tuple(f.shape)} must be (N, {self.channels}, H, W) or "
                f"(N, {self.channels})"
            )
        pooled = f.mean(dim=(2, 3)) if f.dim() == 4 else f
        aux = self.classifier(pooled)
        self.last_aux_logits = aux
        labels = self._labels
        if self.training and labels is not None:
            if labels.shape[0] != f.shape[0]:
                raise ValueError(
                    f"labels batch size {labels.shape[0]} must equal the input batch size "
                    f"{f.shape[0]}"
                )
            row = labels.to(device=f.device)
        else:
            row = aux.argmax(dim=1)
        scale = self.classifier.weight[row]  # (N, C): raw weight rows, no softmax
        if f.dim() == 4:
            scale = scale[:, :, None, None]
        return f * scale

    def __getstate__(self) -> dict[str, object]:
        # Per-batch state is not model state: the latest aux logits are a non-leaf tensor, which
        # would make copy.deepcopy (EMA, best-model snapshots) fail.
        state = dict(super().__getstate__())
        state["last_aux_logits"] = None
        state["_labels"] = None
        return state

    def extra_repr(self) -> str:
        return f"channels={self.channels}, num_classes={self.num_classes}"


def cas_modules(model: nn.Module) -> list[ChannelActivationSuppression]:
    """Every CAS module inside ``model`` (``model`` itself included), in ``modules()`` order."""
    return [m for m in model.modules() if isinstance(m, ChannelActivationSuppression)]


def _check_labels(labels: Tensor) -> None:
    if not isinstance(labels, Tensor) or labels.dim() != 1:
        shape = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
        raise ValueError(f"labels {shape} must be a 1-D tensor of class indices (N,)")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"labels dtype {labels.dtype} must be an integer dtype")


@contextmanager
def cas_labels(model: nn.Module, labels: Tensor) -> Iterator[None]:
    """Give every CAS module in ``model`` the true labels for the duration of the block.

    In training mode the modules then reweight by the label's weight row. The previous labels
    (normally none) are restored on exit, also on exception; nothing is stored globally.

    Args:
        model: a model containing CAS modules (none is fine: then this does nothing).
        labels: class indices (N,), in [0, num_classes) of every CAS module.

    Raises:
        ValueError: labels not a 1-D integer tensor or out of range. A batch-size mismatch is
            reported by the module's forward.

    Examples::

        >>> with cas_labels(model, y):
        ...     logits = model(x)
        >>> loss = F.cross_entropy(logits, y) + beta * cas_aux_loss(model, y)
    """
    _check_labels(labels)
    modules = cas_modules(model)
    if modules and labels.numel() > 0:
        low, high = int(labels.min()), int(labels.max())
        for module in modules:
            if low < 0 or high >= module.num_classes:
                raise ValueError(
                    f"labels in [{low}, {high}] must be in [0, num_classes={module.num_classes})"
                )
    previous = [module._labels for module in modules]
    for module in modules:
        module._labels = labels
    try:
        yield
    finally:
        for module, old in zip(modules, previous, strict=True):
            module._labels = old


def cas_aux_logits(model: nn.Module) -> list[Tensor]:
    """Auxiliary logits of the latest forward, one (N, num_classes) tensor per CAS site.

    Raises:
        RuntimeError: a CAS module has not run a forward yet.
    """
    logits = []
    for module in cas_modules(model):
        if module.last_aux_logits is None:
            raise RuntimeError(f"{module!r} has no auxiliary logits: run a forward pass first")
        logits.append(module.last_aux_logits)
    return logits


def cas_aux_loss(model: nn.Module, labels: Tensor) -> Tensor:
    """CAS auxiliary loss (1/S) * sum_s CE(aux_s, labels) over the S CAS sites of ``model``.

    The training loop adds beta times it to the main loss (paper: beta = 2 with AT); the adaptive
    attack maximises CE(main) + beta * this. Uses the logits of the latest forward, so call it
    right after the forward on the same batch.

    Args:
        model: the model; without CAS modules the loss is a 0-dim zero on ``labels.device``.
        labels: class indices (N,) matching the latest forward's batch.

    Raises:
        ValueError: labels malformed or of another batch size than the auxiliary logits.
    """
    _check_labels(labels)
    logits = cas_aux_logits(model)
    if not logits:
        return torch.zeros((), device=labels.device)
    total: Tensor | None = None
    for aux in logits:
        if aux.shape[0] != labels.shape[0]:
            raise ValueError(
                f"labels batch size {labels.shape[0]} must equal the auxiliary logits' batch "
                f"size {aux.shape[0]}"
            )
        loss = F.cross_entropy(aux, labels.to(aux.device))
        total = loss if total is None else total + loss
    assert total is not None  # logits is not empty
    return total / len(logits)


def cas_joint_ce(logits: Tensor, aux_logits: list[Tensor], labels: Tensor, beta: float) -> Tensor:
    """Per-sample CAS loss ``CE(main) + beta/S * sum_s CE(aux_s)``, the quantity attacks ascend.

    Bai et al.'s Algorithm 1 generates the training examples with PGD on this loss (model in eval
    mode, so every site reweights by its predicted class); their white-box evaluation attacks it
    too. One function serves both, so training and evaluation cannot drift apart.

    Args:
        logits: main-head logits (N, K).
        aux_logits: the S auxiliary logits (N, K_s) of the same forward (:func:`cas_aux_logits`);
            empty gives plain CE.
        labels: class indices (N,).
        beta: weight of the auxiliary mean.

    Shape:
        logits (N, K), aux_logits S x (N, K_s), labels (N,) -> (N,)
    """
    loss = F.cross_entropy(logits, labels, reduction="none")
    if aux_logits:
        aux = torch.stack([F.cross_entropy(a, labels, reduction="none") for a in aux_logits])
        loss = loss + beta * aux.mean(dim=0)
    return loss


# --------------------------------------------------------------------------- registration

CAS_BETA = 2.0
"""Weight of the auxiliary loss when a config gives none (Bai et al.'s default under AT)."""
CAS_PLACEMENTS: dict[str, int] = {"last": 1, "last2": 2, "last3": 3, "last4": 4}
"""placement -> number of last blocks followed by a CAS module. Bai et al.'s sites: ResNet-18
``last2`` = both blocks of layer4 (their best), ``last4`` = layer3 + layer4 (their Block3+Block4
ablation); VGG-16 ``last3`` = the last three conv layers (each VGG conv is a block here)."""
CAS_PLACEMENT = "last2"  # Bai et al.: both blocks of ResNet-18's layer4 works best


def _place_cas(params: Mapping[str, Any], num_classes: int) -> LayerSet:
    """CAS after the last one to four blocks (a backbone with fewer blocks refuses, naming its count)."""
    placement = params.get("placement", CAS_PLACEMENT)
    if placement not in CAS_PLACEMENTS:
        raise ValueError(
            f"placement={placement!r} must be one of {', '.join(map(repr, CAS_PLACEMENTS))}"
        )
    return LayerSet(
        block_out=lambda channels: ChannelActivationSuppression(channels, num_classes),
        n_block_out=CAS_PLACEMENTS[placement],
    )


register_defense(
    "cas", ChannelActivationSuppression, place=_place_cas,
    # beta (aux loss weight) is read by the training recipes; recipe (AT/TRADES/MART) sets the
    # training config's recipe, so CAS's space can search the adversarial training it needs.
    params=("placement", "beta", "recipe"),
    training_fields={"recipe": "recipe"},
    routing=True,
    color="#8c564b",
    cost_budget=(1.1, None),  # issue 2's layer-cost targets (time, memory)
    paper=("Bai, Zeng, Jiang, Xia, Ma, Wang: Improving Adversarial Robustness via Channel-wise "
           "Activation Suppressing (ICLR 2021)"),
    example=Example(lambda: ChannelActivationSuppression(channels=8, num_classes=3), (2, 8, 3, 3), (2, 8, 3, 3),
                    mode_dependent=True, labels=3),
)
