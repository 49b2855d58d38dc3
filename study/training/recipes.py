"""Training recipes: what one mini-batch contributes to the loss.

A recipe is data in a table (:data:`RECIPES`), not a branch in the training loop. Each one is two
small functions:

* ``perturb(ctx, x, y) -> x_in``: the inputs the model trains on (the clean batch, a noisy copy,
  or adversarial examples generated with the compact L-inf PGD below);
* ``objective(ctx, x, x_in, y) -> (loss, logits)``: the recipe's loss and the logits on ``x_in``
  (so ``train_accuracy`` always means accuracy on the inputs actually trained on).

The training loop (:func:`study.training.loop.fit`) only calls :meth:`Recipe.batch_loss`, which runs both
under CAS's label context and adds CAS's auxiliary loss for every forward whose loss is used.

Mode during adversarial-example generation follows each paper's public code, because it changes
BatchNorm statistics and what the attack sees: ``fast_at`` (Wong et al.) and ``pgd_at`` (Madry et
al.; Rice et al.) attack the model in train mode; ``trades`` (Zhang et al.) and ``mart`` (Wang et
al.) switch to eval mode for the attack and back to train mode for the loss.

A model with CAS modules (Bai et al., "Improving adversarial robustness via channel-wise
activation suppressing") trains as their Algorithm 1 and code do, whatever the recipe: every
training attack runs in eval mode (each CAS site reweights by its predicted class, as at test
time) on the CAS form of the recipe's attack loss, and TRADES/MART add the auxiliary heads' own
TRADES/MART terms (their Table 7; see :func:`cas_trades_objective`, :func:`cas_mart_objective`).

Training-time attacks use the global torch RNG (seeded per epoch by the loop), so a run is
reproducible and resumable. Evaluation attacks live in :mod:`study.attacks` (torchattacks).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from defenses.cas import (
    CAS_BETA,
    cas_aux_logits,
    cas_aux_loss,
    cas_joint_ce,
    cas_labels,
    cas_modules,
)
from study.config import TrainingConfig

__all__ = [
    "RECIPES",
    "Recipe",
    "StepContext",
    "cas_mart_objective",
    "cas_trades_objective",
    "linf_pgd",
    "mart_objective",
    "pgd_step_size",
    "trades_objective",
]

# Constants of the authors' reference code (TRADES, MART): start noise and log/1-p guards.
_KL_START_STD = 0.001
_LOG_GUARD = 1e-12
_MART_ONE = 1.0001
_MART_WEIGHT_ONE = 1.0000001


@dataclass
class StepContext:
    """What a recipe may use for one batch.

    Args:
        model: The network being trained (in train mode on entry).
        cfg: The training configuration (eps, steps, noise sigma, betas).
        cas_beta: Weight of CAS's auxiliary loss; only used when ``cas`` is True.
        cas: Whether the model contains CAS modules (Bai et al., "Improving adversarial
            robustness via channel-wise activation suppressing").
        aux_terms: Weighted auxiliary losses collected by :meth:`forward` for this batch.
    """

    model: nn.Module
    cfg: TrainingConfig
    cas_beta: float = 0.0
    cas: bool = False
    aux_terms: list[Tensor] = field(default_factory=list, init=False)
    _labels: Tensor | None = field(default=None, init=False, repr=False)

    @classmethod
    def for_model(
        cls, model: nn.Module, cfg: TrainingConfig, defense_params: dict | None = None
    ) -> StepContext:
        """Build a context, detecting CAS modules and resolving CAS's beta.

        beta = ``cfg.cas_beta`` if set, else ``defense_params["beta"]``, else the paper's 2.
        """
        params = defense_params or {}
        beta = cfg.cas_beta if cfg.cas_beta is not None else float(params.get("beta", CAS_BETA))
        return cls(model=model, cfg=cfg, cas_beta=beta, cas=bool(cas_modules(model)))

    def forward(self, x: Tensor) -> Tensor:
        """Forward pass whose loss is used; records ``beta * CAS aux loss`` for it.

        A CE objective on this forward becomes CAS's CE + beta/S * sum_s CE(aux_s, y) (Bai et
        al., AT+CAS and standard training). TRADES and MART build their CAS terms themselves
        through :meth:`forward_with_aux`; attack forwards call ``ctx.model`` directly. Neither
        records anything here.
        """
        logits = self.model(x)
        if self.cas:
            if self._labels is None:
                raise RuntimeError("StepContext.forward with CAS outside Recipe.batch_loss")
            self.aux_terms.append(self.cas_beta * cas_aux_loss(self.model, self._labels))
        return logits

    def forward_with_aux(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Forward pass whose loss the caller builds itself from the main and auxiliary logits
        (CAS with TRADES/MART); records no aux term."""
        if self._labels is None:
            raise RuntimeError("StepContext.forward_with_aux outside Recipe.batch_loss")
        logits = self.model(x)
        return logits, cas_aux_logits(self.model)

    def attack_mode(self, training: bool) -> bool:
        """The mode a training attack runs in: the recipe's own, but eval for CAS models (Bai et
        al.'s Algorithm 1 and attack code: sites reweight by the predicted class)."""
        return False if self.cas else training

    @contextlib.contextmanager
    def labels(self, y: Tensor) -> Iterator[None]:
        """Every forward inside sees the true labels (CAS picks its channel weights by them)."""
        self._labels = y
        self.aux_terms = []
        scope = cas_labels(self.model, y) if self.cas else contextlib.nullcontext()
        try:
            with scope:
                yield
        finally:
            self._labels = None


@contextlib.contextmanager
def _mode(model: nn.Module, training: bool) -> Iterator[None]:
    """Temporarily switch train/eval mode, restoring the previous mode even on error."""
    was_training = model.training
    model.train(training)
    try:
        yield
    finally:
        model.train(was_training)


def _project(x_adv: Tensor, x: Tensor, eps: float) -> Tensor:
    """Clip into the L-inf ball of radius eps around x and into the image box [0, 1]."""
    return torch.clamp(torch.minimum(torch.maximum(x_adv, x - eps), x + eps), 0.0, 1.0)


def linf_pgd(
    model: nn.Module,
    x: Tensor,
    objective: Callable[[Tensor], Tensor],
    *,
    eps: float,
    step_size: float,
    steps: int,
    start: Tensor,
) -> Tensor:
    """Projected gradient ascent on ``objective(model(x_adv))`` in the L-inf ball.

    Madry et al., "Towards deep learning models resistant to adversarial attacks": x_{t+1} =
    Proj(x_t + alpha * sign(grad)). The start point is projected too, so every iterate is a
    valid image. With ``steps=1`` and a uniform start this is FGSM-RS (Wong et al., "Fast is
    better than free"). Runs in whatever mode the model is in; only ``x_adv`` gets gradients
    (parameter ``.grad`` is untouched).

    Args:
        model: Maps inputs to logits.
        x: Clean inputs in [0, 1].
        objective: logits -> scalar to maximise.
        eps: L-inf radius.
        step_size: alpha.
        steps: Number of ascent steps.
        start: Initial perturbation, same shape as ``x``.

    Returns:
        Detached adversarial inputs with ``|x_adv - x|_inf <= eps`` and values in [0, 1].

    Shape:
        x, start: (N, ...) -> (N, ...)
    """
    x = x.detach()
    x_adv = _project(x + start, x, eps)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        with torch.enable_grad():
            loss = objective(model(x_adv))
        (grad,) = torch.autograd.grad(loss, x_adv)
        x_adv = _project(x_adv.detach() + step_size * grad.sign(), x, eps)
    return x_adv.detach()


def pgd_step_size(cfg: TrainingConfig) -> float:
    """``cfg.adv_step_size``, or Madry et al.'s 2.5 * eps / steps."""
    if cfg.adv_step_size is not None:
        return cfg.adv_step_size
    return 2.5 * cfg.adv_eps / cfg.adv_steps


def _uniform_start(x: Tensor, eps: float) -> Tensor:
    return torch.empty_like(x).uniform_(-eps, eps)


def _ce_sum_objective(y: Tensor) -> Callable[[Tensor], Tensor]:
    # Summed, not averaged: sign(grad) is the same, and the per-sample gradient does not
    # shrink with the batch size (keeps float underflow out of tiny gradients).
    return lambda logits: F.cross_entropy(logits, y, reduction="sum")


def _ce_attack_objective(ctx: StepContext, y: Tensor) -> Callable[[Tensor], Tensor]:
    """CE, or for a CAS model CE + beta/S * sum_s CE(aux_s) (Bai et al.'s attack loss), summed.

    The auxiliary logits are those of the forward that produced ``logits`` (linf_pgd calls the
    objective right after it)."""
    if not ctx.cas:
        return _ce_sum_objective(y)
    model, beta = ctx.model, ctx.cas_beta
    return lambda logits: cas_joint_ce(logits, cas_aux_logits(model), y, beta).sum()


# --- perturb: the inputs a recipe trains on -------------------------------------------------


def _clean(ctx: StepContext, x: Tensor, y: Tensor) -> Tensor:
    return x


def _gaussian_noise(ctx: StepContext, x: Tensor, y: Tensor) -> Tensor:
    """x + N(0, sigma^2), clamped to the image box (Gaussian data augmentation baseline)."""
    return torch.clamp(x + ctx.cfg.noise_sigma * torch.randn_like(x), 0.0, 1.0)


def _fgsm_rs(ctx: StepContext, x: Tensor, y: Tensor) -> Tensor:
    """Wong et al., "Fast is better than free": uniform start in [-eps, eps], one FGSM step of
    1.25 eps, clipped back to the ball. Train mode, as in the authors' code (CAS: eval mode and
    the CAS loss, as for every CAS training attack)."""
    eps = ctx.cfg.adv_eps
    with _mode(ctx.model, ctx.attack_mode(True)):
        return linf_pgd(
            ctx.model, x, _ce_attack_objective(ctx, y),
            eps=eps, step_size=1.25 * eps, steps=1, start=_uniform_start(x, eps),
        )


def _pgd_ce(ctx: StepContext, x: Tensor, y: Tensor) -> Tensor:
    """Madry et al. PGD-k with a uniform random start; train mode as in Madry's and Rice et
    al.'s code. CAS (Bai et al.'s AT+CAS): eval mode, PGD on CE + beta/S * sum_s CE(aux_s)."""
    cfg = ctx.cfg
    with _mode(ctx.model, ctx.attack_mode(True)):
        return linf_pgd(
            ctx.model, x, _ce_attack_objective(ctx, y),
            eps=cfg.adv_eps, step_size=pgd_step_size(cfg), steps=cfg.adv_steps,
            start=_uniform_start(x, cfg.adv_eps),
        )


def _pgd_kl(ctx: StepContext, x: Tensor, y: Tensor) -> Tensor:
    """Zhang et al., "Theoretically principled trade-off between robustness and accuracy"
    (TRADES): maximise KL(p(x) || p(x_adv)) from x + 0.001 N(0, 1), in eval mode (authors' code).

    CAS (Bai et al.'s TRADES+CAS code): maximise KL(p(x) || p(x_adv)) + beta/S * sum_s
    KL(q_s(x) || q_s(x_adv)) over the auxiliary distributions q_s, all in eval mode."""
    cfg = ctx.cfg
    model = ctx.model
    with _mode(model, False):
        with torch.no_grad():
            p_clean = F.softmax(model(x), dim=1)
            q_clean = [F.softmax(a, dim=1) for a in cas_aux_logits(model)] if ctx.cas else []

        def kl(logits: Tensor) -> Tensor:
            loss = F.kl_div(F.log_softmax(logits, dim=1), p_clean, reduction="sum")
            if q_clean:
                aux = cas_aux_logits(model)
                aux_kl = sum(
                    F.kl_div(F.log_softmax(a, dim=1), q, reduction="sum")
                    for a, q in zip(aux, q_clean, strict=True)
                )
                loss = loss + ctx.cas_beta * aux_kl / len(q_clean)
            return loss

        return linf_pgd(
            model, x, kl,
            eps=cfg.adv_eps, step_size=pgd_step_size(cfg), steps=cfg.adv_steps,
            start=_KL_START_STD * torch.randn_like(x),
        )


def _pgd_ce_small_start(ctx: StepContext, x: Tensor, y: Tensor) -> Tensor:
    """Wang et al., "Improving adversarial robustness requires revisiting misclassified
    examples" (MART): PGD on CE from x + 0.001 N(0, 1), in eval mode (authors' code); CAS
    (Bai et al.'s MART+CAS code): on CE + beta/S * sum_s CE(aux_s)."""
    cfg = ctx.cfg
    with _mode(ctx.model, False):
        return linf_pgd(
            ctx.model, x, _ce_attack_objective(ctx, y),
            eps=cfg.adv_eps, step_size=pgd_step_size(cfg), steps=cfg.adv_steps,
            start=_KL_START_STD * torch.randn_like(x),
        )


# --- objective: the loss on the chosen inputs ----------------------------------------------


def _ce(ctx: StepContext, x: Tensor, x_in: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    logits = ctx.forward(x_in)
    return F.cross_entropy(logits, y), logits


def trades_objective(
    logits_clean: Tensor, logits_adv: Tensor, y: Tensor, beta: float
) -> Tensor:
    """TRADES loss: CE(f(x), y) + beta * KL(p(x) || p(x_adv)), KL averaged over the batch.

    The KL direction is the authors' code's ``KLDivLoss(log_softmax(f(x_adv)), softmax(f(x)))``
    (sum / batch size); gradients flow through both arguments, as there.

    Shape:
        logits_*: (N, K); y: (N,) -> scalar
    """
    kl = F.kl_div(
        F.log_softmax(logits_adv, dim=1), F.softmax(logits_clean, dim=1), reduction="batchmean"
    )
    return F.cross_entropy(logits_clean, y) + beta * kl


def mart_objective(
    logits_clean: Tensor, logits_adv: Tensor, y: Tensor, beta: float,
    weight_logits: Tensor | None = None,
) -> Tensor:
    """MART loss (Wang et al. 2020), as computed by the authors' code.

    BCE(p(x_adv), y) = -log p_y(x_adv) - log(1 - max_{k != y} p_k(x_adv)), plus
    beta * mean_i [ KL(p(x_i) || p(x_adv_i)) * (1 - p_{y_i}(x_i)) ]; the guards 1.0001, 1e-12
    and 1.0000001 are the code's. ``weight_logits`` gives p_y of the weight (default
    ``logits_clean``; CAS's auxiliary terms weight by the main head, see
    :func:`cas_mart_objective`).

    Shape:
        logits_*: (N, K); y: (N,) -> scalar
    """
    p_adv = F.softmax(logits_adv, dim=1)
    top2 = torch.argsort(p_adv, dim=1)[:, -2:]
    # The most likely wrong class: the top class unless that is y, then the runner-up.
    wrong = torch.where(top2[:, -1] == y, top2[:, -2], top2[:, -1])
    bce = F.cross_entropy(logits_adv, y) + F.nll_loss(
        torch.log(_MART_ONE - p_adv + _LOG_GUARD), wrong
    )
    p_clean = F.softmax(logits_clean, dim=1)
    p_weight = p_clean if weight_logits is None else F.softmax(weight_logits, dim=1)
    p_true = p_weight.gather(1, y.unsqueeze(1)).squeeze(1)
    kl = F.kl_div(torch.log(p_adv + _LOG_GUARD), p_clean, reduction="none").sum(1)
    return bce + beta * (kl * (_MART_WEIGHT_ONE - p_true)).mean()


def cas_trades_objective(
    logits_clean: Tensor, logits_adv: Tensor, aux_clean: list[Tensor], aux_adv: list[Tensor],
    y: Tensor, beta: float, cas_beta: float,
) -> Tensor:
    """TRADES+CAS (Bai et al., Table 7; their ``trades_reg.py``).

    CE(f(x), y) + cas_beta/S * sum_s CE(aux_s(x), y)
    + beta * [KL(p(x) || p(x_adv)) + cas_beta/S * sum_s KL(q_s(x) || q_s(x_adv))]:
    the auxiliary heads get TRADES' own natural + KL terms, so the whole is
    ``trades(main) + cas_beta/S * sum_s trades(aux_s)``. No auxiliary CE on x_adv.

    Shape:
        logits_*: (N, K); aux_*: S x (N, K); y: (N,) -> scalar
    """
    loss = trades_objective(logits_clean, logits_adv, y, beta)
    if aux_clean:
        aux = sum(trades_objective(c, a, y, beta) for c, a in zip(aux_clean, aux_adv, strict=True))
        loss = loss + cas_beta * aux / len(aux_clean)
    return loss


def cas_mart_objective(
    logits_clean: Tensor, logits_adv: Tensor, aux_clean: list[Tensor], aux_adv: list[Tensor],
    y: Tensor, beta: float, cas_beta: float,
) -> Tensor:
    """MART+CAS (Bai et al., Table 7; their ``mart_reg.py``).

    BCE(f(x_adv)) + cas_beta/S * sum_s BCE(aux_s(x_adv))
    + beta * [mean_i KL_i(p || p_adv) w_i + cas_beta/S * sum_s mean_i KL_i(q_s || q_s,adv) w_i]
    with w_i = 1 - p_{y_i}(x_i) of the *main* head for every term, as the authors' code computes
    it (it reuses the main head's natural probabilities for the auxiliary weights).

    Shape:
        logits_*: (N, K); aux_*: S x (N, K); y: (N,) -> scalar
    """
    loss = mart_objective(logits_clean, logits_adv, y, beta)
    if aux_clean:
        aux = sum(
            mart_objective(c, a, y, beta, weight_logits=logits_clean)
            for c, a in zip(aux_clean, aux_adv, strict=True)
        )
        loss = loss + cas_beta * aux / len(aux_clean)
    return loss


def _trades(ctx: StepContext, x: Tensor, x_in: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    if ctx.cas:
        (logits_clean, aux_clean), (logits_adv, aux_adv) = map(ctx.forward_with_aux, (x, x_in))
        loss = cas_trades_objective(logits_clean, logits_adv, aux_clean, aux_adv, y,
                                    ctx.cfg.trades_beta, ctx.cas_beta)
        return loss, logits_adv
    logits_clean = ctx.forward(x)
    logits_adv = ctx.forward(x_in)
    return trades_objective(logits_clean, logits_adv, y, ctx.cfg.trades_beta), logits_adv


def _mart(ctx: StepContext, x: Tensor, x_in: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    if ctx.cas:
        (logits_clean, aux_clean), (logits_adv, aux_adv) = map(ctx.forward_with_aux, (x, x_in))
        loss = cas_mart_objective(logits_clean, logits_adv, aux_clean, aux_adv, y,
                                  ctx.cfg.trades_beta, ctx.cas_beta)
        return loss, logits_adv
    logits_clean = ctx.forward(x)
    logits_adv = ctx.forward(x_in)
    return mart_objective(logits_clean, logits_adv, y, ctx.cfg.trades_beta), logits_adv


Perturb = Callable[[StepContext, Tensor, Tensor], Tensor]
Objective = Callable[[StepContext, Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]


@dataclass(frozen=True)
class Recipe:
    """One training recipe.

    Args:
        name: Table key.
        perturb: ``(ctx, x, y) -> x_in``, the inputs trained on.
        objective: ``(ctx, x, x_in, y) -> (loss, logits on x_in)``.
        adversarial: Trains on adversarial examples; the loop then measures validation robust
            accuracy each epoch.
        early_stopping: Honour ``cfg.early_stopping`` (keep the epoch with the best validation
            robust accuracy; Rice et al., "Overfitting in adversarially robust deep learning").
    """

    name: str
    perturb: Perturb
    objective: Objective
    adversarial: bool = False
    early_stopping: bool = False

    def batch_loss(self, ctx: StepContext, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The full loss of one batch, CAS auxiliary terms included.

        Returns:
            ``(loss, logits on x_in, x_in)``.
        """
        with ctx.labels(y):
            x_in = self.perturb(ctx, x, y)
            loss, logits = self.objective(ctx, x, x_in, y)
            if ctx.aux_terms:
                loss = loss + torch.stack(ctx.aux_terms).sum()
        return loss, logits, x_in


RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe("standard", _clean, _ce),
        Recipe("noise", _gaussian_noise, _ce),
        Recipe("fast_at", _fgsm_rs, _ce, adversarial=True),
        Recipe("pgd_at", _pgd_ce, _ce, adversarial=True, early_stopping=True),
        Recipe("trades", _pgd_kl, _trades, adversarial=True),
        Recipe("mart", _pgd_ce_small_start, _mart, adversarial=True),
    )
}
