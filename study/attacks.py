"""The one attack table: every attack the study can run, built on torchattacks.

Each entry of :data:`ATTACKS` is an :class:`AttackSpec` that turns an
:class:`~study.config.AttackConfig` into (1) a *settings* dict with every concrete value the
attack uses (the dict that is recorded next to the number) and (2) the torchattacks objects
built from exactly that dict, so what is recorded cannot drift from what ran.

:func:`run_attack` is the one place attacks are executed. It enforces the threat model of
``docs/evaluation.md`` on every batch: the model is in eval mode (and restored after),
inputs stay in [0, 1], ``||x_adv - x||_p <= eps`` (violations are counted, projected back and
reported as R18 instead of crashing), and samples misclassified clean count as not robust for
every attack. Random restarts and the stages of an ensemble (AutoAttack) are chained per sample:
a later restart/stage attacks only the samples every earlier one failed on, which is the
per-sample worst case (torchattacks' ``MultiAttack`` semantics, with our own correctness test).

Stochastic models (KAP noise at test time): a single forward pass is a coin flip, so whether a
sample is "correct" is decided on the mean softmax over ``AttackContext.votes`` forward passes
(Athalye et al., "Obfuscated gradients give a false sense of security": evaluate randomised
defenses in expectation). Deterministic models use one pass.

Faithful settings (Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble
of diverse parameter-free attacks"): AutoAttack runs APGD-CE, APGD-T (9 target classes), FAB-T
(9 target classes) and Square (5000 queries), all with 100 iterations. torchattacks'
``AutoAttack`` class leaves APGD/APGD-T/FAB at 10 steps and uses ``n_classes - 1`` targets, so the
components are built here explicitly.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
import torchattacks
from torch import Tensor, nn
from torchattacks.attack import Attack

from defenses.cas import CAS_BETA
from study.config import AttackConfig

log = logging.getLogger(__name__)

__all__ = [
    "ATTACKS",
    "AttackContext",
    "AttackOutcome",
    "AttackSpec",
    "BoxDeepFool",
    "CASAdaptivePGD",
    "CWLinfPGD",
    "LossPGD",
    "Stage",
    "STOCHASTIC_VOTES",
    "attack_mode",
    "clean_correct",
    "enforce_threat_model",
    "model_device",
    "predict",
    "run_attack",
    "seeded",
]

STOCHASTIC_VOTES = 10
"""Forward passes whose mean softmax decides a stochastic model's prediction."""

LINF_TOL = 1e-6
"""Slack on ``||x_adv - x||_inf <= eps`` (float rounding of ``x + delta``), docs/evaluation.md."""
L2_TOL = 1e-4
"""Slack on ``||x_adv - x||_2 <= eps`` (a norm accumulates rounding over all pixels)."""
BOX_TOL = 1e-6
"""Slack on ``x_adv in [0, 1]``."""

AA_TARGETS = 9
"""Target classes of APGD-T and FAB-T in standard AutoAttack (capped at num_classes - 1)."""
AA_STEPS = 100
"""Iterations of every AutoAttack component in the standard protocol."""
PGD_STEPS = 20
"""Default PGD iterations ("10-20 for search", docs/evaluation.md); use >= 50 for final numbers."""
CW_KAPPA = 50.0
"""Confidence of the CW margin loss (the value used by the TRADES/MART/CAS evaluations)."""
DEEPFOOL_STEPS = 50
DEEPFOOL_OVERSHOOT = 0.02
SQUARE_P_INIT = 0.8


# --------------------------------------------------------------------------- context / outcome


@dataclass(frozen=True)
class AttackContext:
    """What an attack needs to know about the evaluation beyond its own config.

    Args:
        eps: L-inf budget used when the attack config leaves ``eps`` unset.
        eps_l2: L2 budget used by L2 attacks when the attack config leaves ``eps`` unset.
        num_classes: Number of classes (targets of APGD-T / FAB-T).
        seed: Seeds every random start, restart and Square proposal.
        batch_size: Samples attacked at once.
        votes: Forward passes whose mean softmax decides a prediction (1 = deterministic model).
        defense_params: The model's defense parameters (CAS ``beta`` for ``cas_adaptive``).
    """

    eps: float
    eps_l2: float
    num_classes: int
    seed: int = 0
    batch_size: int = 256
    votes: int = 1
    defense_params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not (isinstance(self.eps, (int, float)) and self.eps > 0):
            raise ValueError(f"eps={self.eps!r} must be > 0")
        if not (isinstance(self.eps_l2, (int, float)) and self.eps_l2 > 0):
            raise ValueError(f"eps_l2={self.eps_l2!r} must be > 0")
        if not isinstance(self.num_classes, int) or self.num_classes < 2:
            raise ValueError(f"num_classes={self.num_classes!r} must be an int >= 2")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size!r} must be an int >= 1")
        if not isinstance(self.votes, int) or self.votes < 1:
            raise ValueError(f"votes={self.votes!r} must be an int >= 1")


@dataclass
class AttackOutcome:
    """One attack's result on a set of samples.

    Attributes:
        name: Attack name (table key).
        correct: Bool tensor (N,) on the CPU: the model is still right on the sample after the
            attack (always False where it was wrong clean).
        x_adv: The evaluated adversarial inputs (N, C, H, W), projected into the threat model,
            or None when not kept.
        settings: Every concrete setting used (name, norm, eps, steps, step_size, restarts,
            queries, eot_samples, ...), JSON-serialisable.
        seconds: Wall time.
        invariant_violations: Samples whose x_adv left the eps-ball or [0, 1] or was not finite
            (each is projected back before evaluation; any count > 0 fails R18).
        white_box_correct: Still correct after the gradient-based part of the attack (for
            ensembles that end with Square); None for purely black-box attacks.
        stages: Accuracy after each stage of an ensemble (cumulative, per-sample worst case).
        stats: Extra measurements (e.g. DeepFool's median perturbation norm).
        white_box: The attack uses gradients (copied from its spec, for the checks).
        black_box: The attack has a gradient-free stage (R8 compares it with the white-box ones).
        eot: The attack averages over the model's randomness (R12).
    """

    name: str
    correct: Tensor
    x_adv: Tensor | None
    settings: dict[str, Any]
    seconds: float
    invariant_violations: int = 0
    white_box_correct: Tensor | None = None
    stages: dict[str, float] = field(default_factory=dict)
    stats: dict[str, float] = field(default_factory=dict)
    white_box: bool = True
    black_box: bool = False
    eot: bool = False

    @property
    def accuracy(self) -> float:
        """Fraction of samples still correctly classified."""
        return float(self.correct.float().mean()) if self.correct.numel() else 0.0

    def as_dict(self) -> dict[str, Any]:
        """The record kept in the trial result (no tensors)."""
        out: dict[str, Any] = {
            "name": self.name,
            "accuracy": self.accuracy,
            "settings": dict(self.settings),
            "seconds": self.seconds,
            "invariant_violations": self.invariant_violations,
            "n_samples": int(self.correct.numel()),
        }
        if self.stages:
            out["stages"] = dict(self.stages)
        if self.stats:
            out["stats"] = dict(self.stats)
        return out


# --------------------------------------------------------------------------- custom attacks


class LossPGD(Attack):
    r"""L-inf PGD with a pluggable per-sample loss (Madry et al., "Towards deep learning models
    resistant to adversarial attacks"), the base of CW-L-inf and the CAS adaptive attack.

    Arguments:
        model (nn.Module): model to attack (inputs in [0, 1], returns logits).
        loss_fn: ``loss_fn(logits, labels) -> Tensor (N,)``, maximised by the attack.
        eps (float): L-inf budget.
        alpha (float): step size.
        steps (int): iterations.
        random_start (bool): start uniformly in the eps-ball.
        eot_samples (int): Expectation over Transformation (Athalye et al., "Obfuscated gradients
            give a false sense of security"): each step's gradient is summed over this many
            stochastic forward passes (torchattacks' EOTPGD estimate).
        max_batch (int): inputs per forward/backward when EOT copies of the batch are run
            together; 0 (default) runs one copy per pass. Measured on CPU, stacking copies into
            ~1000-input passes made a widened KAP model's EOT-PGD 1.4x slower (memory-bound), so
            batching is opt-in (it may pay on a GPU; not measured here).

    Shape:
        - images: (N, C, H, W) in [0, 1]; labels: (N,); output: (N, C, H, W) in [0, 1].
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Tensor, Tensor], Tensor],
        eps: float,
        alpha: float,
        steps: int,
        random_start: bool = True,
        name: str = "LossPGD",
        eot_samples: int = 1,
        max_batch: int = 0,
    ) -> None:
        super().__init__(name, model)
        self.loss_fn = loss_fn
        self.eps = eps
        self.alpha = alpha
        self.steps = steps
        self.random_start = random_start
        self.eot_samples = eot_samples
        self.max_batch = max_batch
        self.supported_mode = ["default"]

    def _gradient(self, adv: Tensor, labels: Tensor) -> Tensor:
        """Gradient of the summed loss, summed over the EOT passes (one pass without EOT)."""
        copies_per_pass = max(1, self.max_batch // max(1, adv.shape[0]))
        grad = torch.zeros_like(adv)
        left = self.eot_samples
        while left > 0:
            k = min(copies_per_pass, left)
            # Each copy draws its own randomness in the model (noise layers sample per element).
            batch = adv if k == 1 else adv.repeat(k, *([1] * (adv.dim() - 1)))
            loss = self.loss_fn(self.get_logits(batch), labels if k == 1 else labels.repeat(k)).sum()
            grad += torch.autograd.grad(loss, adv)[0]
            left -= k
        return grad

    def forward(self, images: Tensor, labels: Tensor) -> Tensor:  # noqa: D102 - torchattacks API
        images = images.clone().detach().to(self.device)
        labels = labels.clone().detach().to(self.device)
        adv = images.clone()
        if self.random_start:
            adv = (adv + torch.empty_like(adv).uniform_(-self.eps, self.eps)).clamp(0, 1)
        for _ in range(self.steps):
            adv.requires_grad_(True)
            grad = self._gradient(adv, labels)
            adv = adv.detach() + self.alpha * grad.sign()
            adv = (images + (adv - images).clamp(-self.eps, self.eps)).clamp(0, 1).detach()
        return adv


def cw_margin_loss(logits: Tensor, labels: Tensor, kappa: float = CW_KAPPA) -> Tensor:
    """Carlini & Wagner's margin loss as a quantity to maximise: ``min(max_{j!=y} z_j - z_y, kappa)``.

    Carlini & Wagner, "Towards evaluating the robustness of neural networks": the attacker
    minimises ``f(x') = max(z_y - max_{j!=y} z_j, -kappa)``; we maximise ``-f``.

    Shape:
        logits (N, K), labels (N,) -> (N,)
    """
    true = logits.gather(1, labels[:, None]).squeeze(1)
    others = logits.masked_fill(F.one_hot(labels, logits.shape[1]).bool(), float("-inf"))
    return (others.amax(dim=1) - true).clamp(max=kappa)


class CWLinfPGD(LossPGD):
    """PGD under an L-inf budget on the CW margin loss ("CW-inf" of the TRADES/MART/CAS papers)."""

    def __init__(self, model: nn.Module, eps: float, alpha: float, steps: int, kappa: float = CW_KAPPA) -> None:
        super().__init__(model, lambda z, y: cw_margin_loss(z, y, kappa), eps, alpha, steps, True, "CWLinfPGD")
        self.kappa = kappa


class CASAdaptivePGD(LossPGD):
    """The adaptive white-box attack on CAS models: PGD on ``CE(main) + beta/S * sum_s CE(aux_s)``.

    Bai et al., "Improving adversarial robustness via channel-wise activation suppressing"
    (ICLR 2021), attack the joint training objective so the auxiliary classifiers that decide
    which channels are suppressed are fooled together with the main head. ``aux_s`` are the
    logits of each CAS site from the same forward pass (``defenses.cas.cas_aux_logits``).
    """

    def __init__(self, model: nn.Module, eps: float, alpha: float, steps: int, beta: float = CAS_BETA) -> None:
        super().__init__(model, self._joint_loss, eps, alpha, steps, True, "CASAdaptivePGD")
        self.beta = beta

    def _joint_loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        from defenses.cas import cas_aux_logits

        loss = F.cross_entropy(logits, labels, reduction="none")
        aux = cas_aux_logits(self.model)
        if aux:
            aux_ce = torch.stack([F.cross_entropy(a, labels, reduction="none") for a in aux])
            loss = loss + self.beta * aux_ce.mean(dim=0)
        return loss


class BoxDeepFool(torchattacks.DeepFool):
    r"""DeepFool (Moosavi-Dezfooli et al., "DeepFool: a simple and accurate method to fool deep
    neural networks"), batched and aware of the [0, 1] box.

    torchattacks' ``DeepFool`` loops over samples with a full Jacobian per step (minutes for a
    few hundred CIFAR images) and clamps after every step, which stalls on pixels already at 0
    or 1 (a third of the 8x8 digits never flip). This version keeps the algorithm and its
    arguments and changes only how it runs: all samples of a batch at once; the paper's
    candidate set (the true class and the top ``candidates - 1`` others by clean logit, 10 in the
    reference code); the accumulated perturbation ``r_tot`` with the overshoot applied to the
    total (Algorithm 2 of the paper); and gradient components that would push a pixel at a bound
    out of [0, 1] removed before the linearised step (an active-set projection), so the step
    uses only feasible directions.

    Arguments:
        model (nn.Module): model to attack.
        steps (int): maximum iterations. (Default: 50)
        overshoot (float): overshoot of the total perturbation. (Default: 0.02)
        candidates (int): classes considered (true class included). (Default: 10)

    Shape:
        - images: (N, C, H, W) in [0, 1]; labels: (N,); output: (N, C, H, W) in [0, 1].
    """

    def __init__(self, model: nn.Module, steps: int = DEEPFOOL_STEPS, overshoot: float = DEEPFOOL_OVERSHOOT,
                 candidates: int = 10) -> None:
        super().__init__(model, steps=steps, overshoot=overshoot)
        self.candidates = candidates

    def forward(self, images: Tensor, labels: Tensor) -> Tensor:  # noqa: D102 - torchattacks API
        x0 = images.clone().detach().to(self.device)
        y = labels.clone().detach().to(self.device)
        n = x0.shape[0]
        x = x0.clone()
        r_tot = torch.zeros_like(x0)
        active = torch.ones(n, dtype=torch.bool, device=x0.device)
        cand: Tensor | None = None
        for _ in range(self.steps):
            idx = active.nonzero().flatten()
            if idx.numel() == 0:
                break
            xi = x[idx].clone().requires_grad_(True)
            logits = self.get_logits(xi)
            if cand is None:
                # True class first, then the most likely others (the reference's candidate set).
                k = min(self.candidates, logits.shape[1])
                others = logits.detach().scatter(1, y[:, None], float("-inf")).topk(k - 1, dim=1).indices
                cand = torch.cat([y[:, None], others], dim=1)
            fooled = logits.argmax(dim=1) != y[idx]
            active[idx[fooled]] = False
            if bool(fooled.all()):
                break
            c = cand[idx]
            z = logits.gather(1, c)  # (m, k), column 0 = true class
            grads = torch.stack(
                [torch.autograd.grad(z[:, j].sum(), xi, retain_graph=j < z.shape[1] - 1)[0]
                 for j in range(z.shape[1])], dim=1,
            )  # (m, k, C, H, W); rows are independent because the model is in eval mode
            keep = ~fooled
            z, grads, xk, rows = z.detach()[keep], grads[keep], xi.detach()[keep], idx[keep]
            f_prime = z[:, 1:] - z[:, :1]  # <= 0 while still correct
            w_prime = grads[:, 1:] - grads[:, :1]
            xe = xk[:, None]
            blocked = ((xe <= 0) & (w_prime < 0)) | ((xe >= 1) & (w_prime > 0))
            w_prime = w_prime.masked_fill(blocked, 0.0)
            norms = w_prime.flatten(2).norm(dim=2)
            ratio = (f_prime.abs() / norms.clamp_min(1e-12)).masked_fill(norms <= 1e-12, float("inf"))
            best = ratio.argmin(dim=1)
            arange = torch.arange(rows.numel(), device=x0.device)
            dist = ratio[arange, best]
            stuck = ~torch.isfinite(dist)  # no feasible direction left: give up on the sample
            active[rows[stuck]] = False
            w_best = w_prime[arange, best]
            step = (dist + 1e-4).masked_fill(stuck, 0.0) / norms[arange, best].clamp_min(1e-12)
            r_tot[rows] += step.view(-1, *[1] * (x0.dim() - 1)) * w_best
            x[rows] = (x0[rows] + (1 + self.overshoot) * r_tot[rows]).clamp(0, 1)
        return x.detach()


# --------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class Stage:
    """One component of an attack: a torchattacks object plus whether it uses gradients."""

    name: str
    attack: Attack
    white_box: bool = True


Resolver = Callable[[AttackConfig, AttackContext], dict[str, Any]]
Builder = Callable[[nn.Module, dict[str, Any]], list[Stage]]


@dataclass(frozen=True)
class AttackSpec:
    """One row of the attack table.

    Attributes:
        name: Table key (an entry of ``study.config.ATTACKS``).
        norm: Threat model, ``"Linf"`` or ``"L2"``.
        resolve: ``(AttackConfig, AttackContext) -> settings``: every concrete value, defaults
            filled in (the dict recorded with the number).
        build: ``(model, settings) -> [Stage]``: the torchattacks objects, built from settings only.
        white_box: Uses the model's gradients (in at least one stage).
        black_box: Has a gradient-free stage (Square), i.e. can expose gradient masking (R8, R13).
        eot: Averages gradients over random forward passes (Expectation over Transformation);
            counts as the EOT evaluation a stochastic model needs (R12).
        bounded: The attack itself respects the eps budget. DeepFool does not (minimal
            perturbation, unbounded); its output is projected onto the budget before scoring.
        loop_restarts: Restarts are done by :func:`run_attack` re-running the attack on the
            still-robust samples (PGD family); otherwise the attack restarts natively.
        description: One line for listings.
    """

    name: str
    norm: str
    resolve: Resolver
    build: Builder
    white_box: bool = True
    black_box: bool = False
    eot: bool = False
    bounded: bool = True
    loop_restarts: bool = True
    description: str = ""

    def settings(self, cfg: AttackConfig, ctx: AttackContext) -> dict[str, Any]:
        """The concrete settings of ``cfg`` in ``ctx`` (defaults filled in)."""
        return self.resolve(cfg, ctx)

    def make(self, model: nn.Module, cfg: AttackConfig, ctx: AttackContext) -> tuple[list[Stage], dict[str, Any]]:
        """Settings and the torchattacks stages built from them."""
        settings = self.resolve(cfg, ctx)
        return self.build(model, settings), settings


def _settings(name: str, norm: str, cfg: AttackConfig, ctx: AttackContext, **values: Any) -> dict[str, Any]:
    eps = cfg.eps if cfg.eps is not None else (ctx.eps if norm == "Linf" else ctx.eps_l2)
    base: dict[str, Any] = {
        "name": name,
        "norm": norm,
        "eps": float(eps),
        "steps": None,
        "step_size": None,
        "restarts": 1,
        "queries": None,
        "eot_samples": None,
        "random_start": None,
        "loss": None,
        "seed": int(ctx.seed),
        "votes": int(ctx.votes),
    }
    base.update(values)
    return base


def _pgd_like(cfg: AttackConfig, ctx: AttackContext, name: str, norm: str, loss: str, **extra: Any) -> dict[str, Any]:
    s = _settings(name, norm, cfg, ctx, loss=loss, random_start=True, restarts=cfg.restarts, **extra)
    s["steps"] = cfg.steps or PGD_STEPS
    # eps/4 with 20 steps can cross the ball several times: the docs/evaluation.md rule for L-inf,
    # used for L2 as well so both norms follow one convention.
    s["step_size"] = float(cfg.step_size) if cfg.step_size is not None else s["eps"] / 4
    return s


def _need_classes(name: str, ctx: AttackContext, minimum: int) -> None:
    if ctx.num_classes < minimum:
        # The DLR losses divide by the gap between the 1st and 3rd/4th largest logits.
        raise ValueError(f"attack {name!r} needs num_classes >= {minimum}, got {ctx.num_classes}")


def _resolve_fgsm(cfg: AttackConfig, ctx: AttackContext) -> dict[str, Any]:
    s = _settings("fgsm", "Linf", cfg, ctx, loss="ce", random_start=False, steps=1)
    s["step_size"] = s["eps"]
    return s


def _resolve_square(cfg: AttackConfig, ctx: AttackContext) -> dict[str, Any]:
    return _settings(
        "square", "Linf", cfg, ctx, queries=cfg.queries, restarts=cfg.restarts, p_init=SQUARE_P_INIT,
        loss="margin", random_start=True,
    )


def _resolve_deepfool(cfg: AttackConfig, ctx: AttackContext) -> dict[str, Any]:
    return _settings(
        "deepfool", "L2", cfg, ctx, steps=cfg.steps or DEEPFOOL_STEPS, overshoot=DEEPFOOL_OVERSHOOT,
        candidates=min(10, ctx.num_classes), random_start=False, bounded=False, loss="linearised margin",
        scoring="perturbation projected onto the L2 ball of radius eps before scoring",
    )


def _resolve_autoattack(cfg: AttackConfig, ctx: AttackContext) -> dict[str, Any]:
    _need_classes("autoattack", ctx, 4)
    targets = min(AA_TARGETS, ctx.num_classes - 1)
    return _settings(
        "autoattack", "Linf", cfg, ctx, version="standard", steps=cfg.steps or AA_STEPS,
        restarts=cfg.restarts, queries=cfg.queries, n_target_classes=targets, p_init=SQUARE_P_INIT,
        components=["apgd-ce", "apgd-t", "fab-t", "square"], loss="ce, dlr-targeted, fab, margin",
        random_start=True,
    )


def _resolve_autoattack_rand(cfg: AttackConfig, ctx: AttackContext) -> dict[str, Any]:
    _need_classes("autoattack_rand", ctx, 3)
    return _settings(
        "autoattack_rand", "Linf", cfg, ctx, version="rand", steps=cfg.steps or AA_STEPS,
        restarts=cfg.restarts, eot_samples=cfg.eot_samples, components=["apgd-ce", "apgd-dlr"],
        loss="ce, dlr", random_start=True,
    )


def _resolve_cas(cfg: AttackConfig, ctx: AttackContext) -> dict[str, Any]:
    beta = float(ctx.defense_params.get("beta", CAS_BETA))
    return _pgd_like(cfg, ctx, "cas_adaptive", "Linf", "ce + beta/S * sum_s ce_aux_s", beta=beta)


def _build_fgsm(model: nn.Module, s: dict[str, Any]) -> list[Stage]:
    return [Stage("fgsm", torchattacks.FGSM(model, eps=s["eps"]))]


def _build_pgd(model: nn.Module, s: dict[str, Any]) -> list[Stage]:
    atk = torchattacks.PGD(model, eps=s["eps"], alpha=s["step_size"], steps=s["steps"], random_start=True)
    return [Stage("pgd", atk)]


def _build_pgd_l2(model: nn.Module, s: dict[str, Any]) -> list[Stage]:
    atk = torchattacks.PGDL2(model, eps=s["eps"], alpha=s["step_size"], steps=s["steps"], random_start=True)
    return [Stage("pgd_l2", atk)]


def _build_cw(model: nn.Module, s: dict[str, Any]) -> list[Stage]:
    return [Stage("cw_linf", CWLinfPGD(model, eps=s["eps"], alpha=s["step_size"], steps=s["steps"], kappa=s["kappa"]))]


def _build_deepfool(model: nn.Module, s: dict[str, Any]) -> list[Stage]:
    return [Stage("deepfool", BoxDeepFool(model, steps=s["steps"], overshoot=s["overshoot"],
                                          candidates=s["candidates"]))]


def _build_square(model: nn.Module, s: dict[str, Any]) -> list[Stage]:
    atk = torchattacks.Square(
        model, norm="Linf", eps=s["eps"], n_queries=s["queries"], n_restarts=s["restarts"],
        p_init=s["p_init"], loss="margin", resc_schedule=True, seed=s["seed"],
    )
    return [Stage("square", atk, white_box=False)]


def _build_autoattack(model: nn.Module, s: dict[str, Any]) -> list[Stage]:
    eps, steps, seed, restarts, targets = s["eps"], s["steps"], s["seed"], s["restarts"], s["n_target_classes"]
    apgd_ce = torchattacks.APGD(model, norm="Linf", eps=eps, steps=steps, n_restarts=restarts, seed=seed, loss="ce")
    apgd_t = torchattacks.APGDT(model, norm="Linf", eps=eps, steps=steps, n_restarts=restarts, seed=seed,
                                n_classes=targets + 1)
    fab_t = torchattacks.FAB(model, norm="Linf", eps=eps, steps=steps, n_restarts=restarts, seed=seed,
                             multi_targeted=True, n_classes=targets + 1)
    square = torchattacks.Square(model, norm="Linf", eps=eps, n_queries=s["queries"], n_restarts=restarts,
                                 p_init=s["p_init"], loss="margin", seed=seed)
    # torchattacks derives the number of targets as n_classes - 1; passing targets + 1 caps it at 9
    # for datasets with more classes (CIFAR-100) exactly as the reference AutoAttack does.
    return [
        Stage("apgd-ce", apgd_ce),
        Stage("apgd-t", apgd_t),
        Stage("fab-t", fab_t),
        Stage("square", square, white_box=False),
    ]


def _build_autoattack_rand(model: nn.Module, s: dict[str, Any]) -> list[Stage]:
    common = dict(norm="Linf", eps=s["eps"], steps=s["steps"], n_restarts=s["restarts"], seed=s["seed"],
                  eot_iter=s["eot_samples"])
    return [
        Stage("apgd-ce", torchattacks.APGD(model, loss="ce", **common)),
        Stage("apgd-dlr", torchattacks.APGD(model, loss="dlr", **common)),
    ]


def _ce_per_sample(logits: Tensor, labels: Tensor) -> Tensor:
    return F.cross_entropy(logits, labels, reduction="none")


def _build_eot_pgd(model: nn.Module, s: dict[str, Any]) -> list[Stage]:
    # The same estimate as torchattacks' EOTPGD (sign of the gradient summed over the passes), one
    # batch per pass: larger stacked passes measured slower on CPU (README, "Profile of one demo
    # trial").
    atk = LossPGD(model, _ce_per_sample, eps=s["eps"], alpha=s["step_size"], steps=s["steps"],
                  random_start=True, name="EOTPGD", eot_samples=s["eot_samples"])
    return [Stage("eot_pgd", atk)]


def _build_cas(model: nn.Module, s: dict[str, Any]) -> list[Stage]:
    return [Stage("cas_adaptive", CASAdaptivePGD(model, eps=s["eps"], alpha=s["step_size"], steps=s["steps"],
                                                 beta=s["beta"]))]


ATTACKS: dict[str, AttackSpec] = {
    spec.name: spec
    for spec in (
        AttackSpec("fgsm", "Linf", _resolve_fgsm, _build_fgsm, loop_restarts=False,
                   description="FGSM (Goodfellow et al.), one signed-gradient step of size eps"),
        AttackSpec("pgd", "Linf", lambda c, x: _pgd_like(c, x, "pgd", "Linf", "ce"), _build_pgd,
                   description="PGD L-inf (Madry et al.), random start, step eps/4, restarts"),
        AttackSpec("pgd_l2", "L2", lambda c, x: _pgd_like(c, x, "pgd_l2", "L2", "ce"), _build_pgd_l2,
                   description="PGD L2 (Madry et al.), eps = eval eps_l2 unless set"),
        AttackSpec("cw_linf", "Linf", lambda c, x: _pgd_like(c, x, "cw_linf", "Linf", "cw_margin", kappa=CW_KAPPA),
                   _build_cw, description="PGD on the Carlini-Wagner margin loss under an L-inf budget"),
        AttackSpec("deepfool", "L2", _resolve_deepfool, _build_deepfool, bounded=False, loop_restarts=False,
                   description="DeepFool (Moosavi-Dezfooli et al.), minimal L2, batched, scored within eps_l2"),
        AttackSpec("square", "Linf", _resolve_square, _build_square, white_box=False, black_box=True,
                   loop_restarts=False, description="Square (Andriushchenko et al.), score-based black box"),
        AttackSpec("autoattack", "Linf", _resolve_autoattack, _build_autoattack, black_box=True,
                   loop_restarts=False,
                   description="AutoAttack standard: APGD-CE, APGD-T, FAB-T, Square; 100 steps, 9 targets"),
        AttackSpec("autoattack_rand", "Linf", _resolve_autoattack_rand, _build_autoattack_rand, eot=True,
                   loop_restarts=False, description="AutoAttack rand: APGD-CE + APGD-DLR with EOT (20)"),
        AttackSpec("eot_pgd", "Linf",
                   lambda c, x: _pgd_like(c, x, "eot_pgd", "Linf", "ce", eot_samples=c.eot_samples),
                   _build_eot_pgd, eot=True, description="PGD with gradients averaged over EOT samples"),
        AttackSpec("cas_adaptive", "Linf", _resolve_cas, _build_cas,
                   description="Adaptive PGD on CAS's joint loss CE + beta * CE_aux (Bai et al.)"),
    )
}


# --------------------------------------------------------------------------- running


@contextmanager
def attack_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode with frozen parameters for the duration of an attack; both restored after.

    Eval mode keeps BatchNorm statistics fixed (docs/evaluation.md). Freezing the parameters keeps
    attacks that call ``backward()`` (DeepFool, FAB) from leaving gradients on the weights and
    saves the weight-gradient computation.
    """
    was_training = model.training
    grads = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in grads:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, flag in grads:
            p.requires_grad_(flag)
        model.train(was_training)


@contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Seed torch's RNGs inside, leaving the caller's RNG state untouched after."""
    devices = []
    if device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


@torch.no_grad()
def predict(model: nn.Module, x: Tensor, votes: int = 1) -> Tensor:
    """Predicted labels; a stochastic model is decided on its mean softmax over ``votes`` passes.

    Shape:
        x (N, C, H, W) -> (N,) long
    """
    if votes <= 1:
        return model(x).argmax(dim=1)
    probs = sum(F.softmax(model(x).float(), dim=1) for _ in range(votes))
    return probs.argmax(dim=1)


def model_device(model: nn.Module, fallback: torch.device) -> torch.device:
    """The device of the model's first parameter or buffer (``fallback`` when it has none)."""
    for tensor in list(model.parameters()) + list(model.buffers()):
        return tensor.device
    return fallback


def clean_correct(model: nn.Module, x: Tensor, y: Tensor, ctx: AttackContext) -> Tensor:
    """Per-sample clean correctness (mean softmax over ``ctx.votes`` passes), seeded; on the CPU."""
    device = model_device(model, x.device)
    out = []
    with attack_mode(model), seeded(ctx.seed, device):
        for lo in range(0, x.shape[0], ctx.batch_size):
            xb, yb = x[lo : lo + ctx.batch_size].to(device), y[lo : lo + ctx.batch_size].to(device)
            out.append((predict(model, xb, ctx.votes) == yb).cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.bool)


def enforce_threat_model(
    x_adv: Tensor, x: Tensor, norm: str, eps: float, *, bounded: bool = True
) -> tuple[Tensor, Tensor]:
    """Check x_adv against the threat model; return (violating mask, projected x_adv).

    A violation is a sample outside [0, 1], beyond the eps-ball (L-inf: ``eps + 1e-6``, L2:
    ``eps + 1e-4``) or not finite. Projection makes the evaluated point admissible, so a buggy
    attack can only make the reported robustness *higher* (never lower) than the truth, and R18
    reports it. ``bounded=False`` (DeepFool) projects onto the ball without counting a violation.

    Shape:
        x_adv, x (N, C, H, W) -> (N,) bool, (N, C, H, W)
    """
    if x_adv.shape != x.shape:
        raise RuntimeError(f"attack returned shape {tuple(x_adv.shape)} for inputs {tuple(x.shape)}")
    x_adv = x_adv.detach().to(dtype=x.dtype, device=x.device)
    n = x.shape[0]
    finite = torch.isfinite(x_adv).reshape(n, -1).all(dim=1)
    x_adv = torch.where(torch.isfinite(x_adv), x_adv, x)
    flat = x_adv.reshape(n, -1)
    out_of_box = (flat.amin(dim=1) < -BOX_TOL) | (flat.amax(dim=1) > 1 + BOX_TOL)
    delta = x_adv - x
    if norm == "Linf":
        dist, tol = delta.reshape(n, -1).abs().amax(dim=1), LINF_TOL
        delta = delta.clamp(-eps, eps)
    elif norm == "L2":
        dist, tol = delta.reshape(n, -1).norm(dim=1), L2_TOL
        scale = (eps / dist.clamp_min(1e-12)).clamp(max=1.0)
        delta = delta * scale.view(n, *[1] * (x.dim() - 1))
    else:
        raise ValueError(f"norm={norm!r} must be 'Linf' or 'L2'")
    outside_ball = dist > eps + tol if bounded else torch.zeros_like(finite)
    projected = (x + delta).clamp(0, 1)
    return (~finite) | out_of_box | outside_ball, projected


def run_attack(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    attack: AttackConfig,
    ctx: AttackContext,
    *,
    keep_adv: bool = True,
    spec: AttackSpec | None = None,
) -> AttackOutcome:
    """Run one attack of the table on (x, y) under the threat model and score it per sample.

    Args:
        model: The model (inputs in [0, 1], logits out). Put in eval mode with frozen
            parameters for the attack; its mode is restored after.
        x: Inputs (N, C, H, W) in [0, 1].
        y: Labels (N,).
        attack: The attack's config.
        ctx: Budgets, classes, seed, batch size, votes (see :class:`AttackContext`).
        keep_adv: Return the adversarial inputs (CPU) in the outcome.
        spec: Override the table row (tests and experiments); default ``ATTACKS[attack.name]``.

    Returns:
        The per-sample outcome (robust = still correct), the settings and the invariant count.
    """
    spec = spec or ATTACKS.get(attack.name)
    if spec is None:
        raise ValueError(f"attack {attack.name!r} is not in the table; choose one of {', '.join(ATTACKS)}")
    if x.dim() < 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"x {tuple(x.shape)} and y {tuple(y.shape)} must have the same number of samples")
    start = time.perf_counter()
    device = model_device(model, x.device)
    settings: dict[str, Any] = {}
    correct_all, adv_all, wb_all = [], [], []
    violations = 0
    stage_correct: dict[str, int] = {}
    raw_norms: list[Tensor] = []
    with attack_mode(model), seeded(ctx.seed, device):
        stages, settings = spec.make(model, attack, ctx)
        eps = settings["eps"]
        restarts = settings["restarts"] if spec.loop_restarts else 1
        for lo in range(0, x.shape[0], ctx.batch_size):
            xb = x[lo : lo + ctx.batch_size].to(device)
            yb = y[lo : lo + ctx.batch_size].to(device)
            correct = predict(model, xb, ctx.votes) == yb
            adv = xb.clone()
            wb_correct = correct.clone()
            for stage in stages:
                for _ in range(restarts):
                    idx = correct.nonzero().flatten()
                    if idx.numel() == 0:
                        break
                    raw = stage.attack(xb[idx], yb[idx])
                    bad, x_eval = enforce_threat_model(raw, xb[idx], spec.norm, eps, bounded=spec.bounded)
                    violations += int(bad.sum())
                    if not spec.bounded:
                        raw_norms.append((raw.detach().to(xb.dtype) - xb[idx]).flatten(1).norm(dim=1).cpu())
                    broken = predict(model, x_eval, ctx.votes) != yb[idx]
                    adv[idx[broken]] = x_eval[broken]
                    correct[idx[broken]] = False
                stage_correct[stage.name] = stage_correct.get(stage.name, 0) + int(correct.sum())
                if stage.white_box:
                    wb_correct = correct.clone()
            correct_all.append(correct.cpu())
            wb_all.append(wb_correct.cpu())
            if keep_adv:
                adv_all.append(adv.detach().cpu())
    correct = torch.cat(correct_all) if correct_all else torch.zeros(0, dtype=torch.bool)
    n = max(int(correct.numel()), 1)
    outcome = AttackOutcome(
        name=attack.name,
        correct=correct,
        x_adv=torch.cat(adv_all) if keep_adv and adv_all else None,
        settings=settings,
        seconds=time.perf_counter() - start,
        invariant_violations=violations,
        white_box_correct=torch.cat(wb_all) if spec.white_box and wb_all else None,
        stages={k: v / n for k, v in stage_correct.items()} if len(stage_correct) > 1 else {},
        white_box=spec.white_box,
        black_box=spec.black_box,
        eot=spec.eot,
    )
    if raw_norms:
        norms = torch.cat(raw_norms)
        outcome.stats["median_l2_unbounded"] = float(norms.median())
        outcome.stats["fraction_within_eps"] = float((norms <= eps + L2_TOL).float().mean())
    if violations:
        log.warning("attack %s: %d sample(s) violated the threat model (projected back; R18)", attack.name, violations)
    log.info("attack %s: accuracy %.4f in %.1fs", attack.name, outcome.accuracy, outcome.seconds)
    return outcome

