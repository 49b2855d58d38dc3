"""Running an attack under the threat model: eval mode, seeding, projection, per-sample chaining."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from study.attacks.context import BOX_TOL, L2_TOL, LINF_TOL, AttackContext, AttackOutcome
from study.attacks.table import ATTACKS, AttackSpec
from study.config import AttackConfig

log = logging.getLogger(__name__)

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


@torch.no_grad()
def expected_correct(model: nn.Module, x: Tensor, y: Tensor, passes: int = 1, votes: int = 1) -> Tensor:
    """Per sample, the share of ``passes`` independent predictions (each decided by ``votes``
    passes) that are correct: the expected correctness of the classifier (float, on x's device).

    Shape:
        x (N, C, H, W), y (N,) -> (N,) float
    """
    hits = torch.zeros(x.shape[0], device=x.device)
    for _ in range(passes):
        hits += (predict(model, x, votes) == y).float()
    return hits / passes


def model_device(model: nn.Module, fallback: torch.device) -> torch.device:
    """The device of the model's first parameter or buffer (``fallback`` when it has none)."""
    for tensor in list(model.parameters()) + list(model.buffers()):
        return tensor.device
    return fallback


def clean_score(model: nn.Module, x: Tensor, y: Tensor, ctx: AttackContext) -> Tensor:
    """Per-sample clean expected correctness over ``ctx.passes`` passes (each a prediction by
    ``ctx.votes``), seeded; float on the CPU. 0/1 for a deterministic model."""
    device = model_device(model, x.device)
    out = []
    with attack_mode(model), seeded(ctx.seed, device):
        for lo in range(0, x.shape[0], ctx.batch_size):
            xb, yb = x[lo : lo + ctx.batch_size].to(device), y[lo : lo + ctx.batch_size].to(device)
            out.append(expected_correct(model, xb, yb, ctx.passes, ctx.votes).cpu())
    return torch.cat(out) if out else torch.zeros(0)


def clean_correct(model: nn.Module, x: Tensor, y: Tensor, ctx: AttackContext) -> Tensor:
    """Per-sample clean correctness, bool on the CPU: :func:`clean_score` > 0.5 (right in most
    passes; exactly the prediction's correctness when one pass decides)."""
    return clean_score(model, x, y, ctx) > 0.5


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
    correct_all: list[Tensor] = []
    adv_all: list[Tensor] = []
    wb_all: list[Tensor] = []
    score_all: list[Tensor] = []
    violations = 0
    stage_correct: dict[str, float] = {}
    raw_norms: list[Tensor] = []
    with attack_mode(model), seeded(ctx.seed, device):
        stages, settings = spec.make(model, attack, ctx)
        eps = settings["eps"]
        restarts = settings["restarts"] if spec.loop_restarts else 1
        for lo in range(0, x.shape[0], ctx.batch_size):
            xb = x[lo : lo + ctx.batch_size].to(device)
            yb = y[lo : lo + ctx.batch_size].to(device)
            # The attacker's running estimate per sample; a deterministic model gives 0/1 and this
            # is "attack the samples still correct, keep the first point that breaks them".
            best = expected_correct(model, xb, yb, ctx.passes, ctx.votes)
            adv = xb.clone()
            wb_best = best.clone()
            for stage in stages:
                for _ in range(restarts):
                    # Every sample some pass still gets right is attacked (a stochastic model's
                    # expected accuracy counts it), not only those one noisy pass gets right.
                    idx = (best > 0).nonzero().flatten()
                    if idx.numel() == 0:
                        break
                    raw = stage.attack(xb[idx], yb[idx])
                    bad, x_eval = enforce_threat_model(raw, xb[idx], spec.norm, eps, bounded=spec.bounded)
                    violations += int(bad.sum())
                    if not spec.bounded:
                        raw_norms.append((raw.detach().to(xb.dtype) - xb[idx]).flatten(1).norm(dim=1).cpu())
                    found = expected_correct(model, x_eval, yb[idx], ctx.passes, ctx.votes)
                    better = found < best[idx]
                    adv[idx[better]] = x_eval[better]
                    best[idx[better]] = found[better]
                stage_correct[stage.name] = stage_correct.get(stage.name, 0) + float(best.sum())
                if stage.white_box:
                    wb_best = best.clone()
            if ctx.passes > 1:
                # The passes that chose a point favour the attacker (a minimum over noisy
                # estimates): the reported score comes from fresh passes at the chosen points.
                score_all.append(expected_correct(model, adv, yb, ctx.passes, ctx.votes).cpu())
            correct_all.append((best > 0.5).cpu() if ctx.passes == 1 else (score_all[-1] > 0.5))
            wb_all.append((wb_best > 0.5).cpu())
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
        score=torch.cat(score_all) if score_all else None,
    )
    if raw_norms:
        norms = torch.cat(raw_norms)
        outcome.stats["median_l2_unbounded"] = float(norms.median())
        outcome.stats["fraction_within_eps"] = float((norms <= eps + L2_TOL).float().mean())
    if violations:
        log.warning("attack %s: %d sample(s) violated the threat model (projected back; R18)", attack.name, violations)
    log.info("attack %s: accuracy %.4f in %.1fs", attack.name, outcome.accuracy, outcome.seconds)
    return outcome
