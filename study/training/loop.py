"""The one training loop.

:func:`fit` trains a model with a recipe from :data:`study.training.recipes.RECIPES`; everything that
differs between recipes and defenses enters through small hooks instead of branches here:

* the recipe's ``batch_loss`` (adversarial-example generation, the loss, CAS's auxiliary loss);
* the defense's epoch hook from the registry (k-WTA's gamma annealing);
* learning-rate schedules from :data:`LR_SCHEDULES`, a pure function of the global step, so a
  resumed run sets exactly the same learning rates as an uninterrupted one;
* optimisers from :data:`OPTIMIZERS`.

Reproducibility: at the start of epoch ``e`` (0-based) the global torch RNG is seeded with
``seed * 1000 + e`` and the shuffling loader is built with the same seed, so every epoch's
randomness (order, augmentation, attack starts, noise layers) depends only on (seed, epoch).
That makes the run deterministic on CPU and makes ``fit(..., resume=checkpoint)`` end with the
same weights as an uninterrupted run.

Failure: a NaN/inf loss (or gradient norm, when clipping) ends training at once with
``status="diverged"``: deep KAF networks do this (Scardapane et al.; the KAF thesis' ResNet-56),
and a study must record it, not crash or hang.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Subset

from defenses import BASELINE, EpochHook, get_defense, make_epoch_hook
from study.config import TrainingConfig
from study.data import DataBundle, eval_loader, train_loader
from study.training.optim_groups import parameter_groups
from study.training.recipes import RECIPES, Recipe, StepContext, linf_pgd

__all__ = [
    "LR_SCHEDULES",
    "OPTIMIZERS",
    "EpochReport",
    "FitResult",
    "epoch_seed",
    "fit",
    "lr_factor",
    "robust_accuracy",
]

log = logging.getLogger(__name__)

CHECKPOINT_VERSION = 1
VAL_ROBUST_SAMPLES = 500
"""Validation samples attacked per epoch for ``val_robust_accuracy`` (Rice et al. use a held-out
set; a fixed 500 keeps the per-epoch cost bounded on large datasets)."""
VAL_PGD_STEPS = 10
"""PGD-10 with step eps/4 and a random start (docs/evaluation.md search setting; Rice et al.)."""
_EVAL_BATCH = 256
_ONECYCLE_PEAK = 0.4
"""Wong et al.'s triangle: 0 -> lr at 2/5 of training -> 0."""


@dataclass
class EpochReport:
    """What the loop reports after each completed epoch.

    Args:
        epoch: Completed epochs (1-based).
        metrics: train_loss, train_accuracy (on the inputs trained on: adversarial for AT
            recipes), lr (at the epoch's last step), seconds, and when available val_accuracy,
            val_robust_accuracy (adversarial recipes or ``val_eps``; at ``val_robust_epochs``), gamma
            (k-WTA).
        checkpoint: Everything :func:`fit` needs to continue (CPU tensors, torch.save-able with
            ``weights_only=True``); pass it back as ``resume=``.
    """

    epoch: int
    metrics: dict[str, float]
    checkpoint: dict[str, Any]


@dataclass
class FitResult:
    """The outcome of :func:`fit`.

    Args:
        status: ``"completed"`` or ``"diverged"``.
        epochs_run: Completed epochs (including those before a resume).
        reason: Why training stopped early (None when completed).
        diverged_epoch: 1-based epoch in which the loss became non-finite.
        history: One metrics dict per completed epoch (with an ``epoch`` key).
        best_epoch: The epoch whose weights were restored by early stopping, else None.
        seconds: Training wall time, summed over resumed segments.
    """

    status: str
    epochs_run: int
    reason: str | None = None
    diverged_epoch: int | None = None
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int | None = None
    seconds: float = 0.0
    reached: dict[str, float] = field(default_factory=dict)
    """What the defense's schedule left in the trained model (k-WTA: ``kwta_gamma_reached``)."""


# --- hooks ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Plan:
    epochs: int
    steps_per_epoch: int
    milestones: tuple[float, ...]

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch


def _onecycle(step: int, plan: _Plan) -> float:
    # Wong et al. set lr(t) at t = (i + 1) / len(loader) epochs: the first step already moves.
    t = (step + 1) / plan.total_steps
    if t <= _ONECYCLE_PEAK:
        return t / _ONECYCLE_PEAK
    return max(0.0, (1.0 - t) / (1.0 - _ONECYCLE_PEAK))


def _multistep(step: int, plan: _Plan) -> float:
    epoch = step // plan.steps_per_epoch
    # A milestone never falls on epoch 0: dividing the LR before training would be a no-op schedule.
    passed = sum(epoch >= max(1, math.floor(m * plan.epochs + 0.5)) for m in plan.milestones)
    return 0.1**passed


def _cosine(step: int, plan: _Plan) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * step / plan.total_steps))


def _constant(step: int, plan: _Plan) -> float:
    return 1.0


LR_SCHEDULES: dict[str, Callable[[int, _Plan], float]] = {
    "onecycle": _onecycle,
    "multistep": _multistep,
    "cosine": _cosine,
    "constant": _constant,
}
"""schedule name -> factor(global step, plan); lr = cfg.lr * factor, set before every step."""


def lr_factor(schedule: str, step: int, epochs: int, steps_per_epoch: int,
              milestones: tuple[float, ...] = (0.5, 0.75)) -> float:
    """The LR multiplier of ``schedule`` at 0-based global ``step``."""
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"schedule={schedule!r} must be one of {', '.join(LR_SCHEDULES)}")
    return LR_SCHEDULES[schedule](step, _Plan(epochs, steps_per_epoch, tuple(milestones)))


OPTIMIZERS: dict[str, Callable[[Any, TrainingConfig], torch.optim.Optimizer]] = {
    "sgd": lambda params, cfg: torch.optim.SGD(
        params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=False
    ),
    "adam": lambda params, cfg: torch.optim.Adam(
        params, lr=cfg.lr, weight_decay=cfg.weight_decay
    ),
}


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of 0-based ``epoch``'s randomness (global RNG and shuffling)."""
    return seed * 1000 + epoch


# --- evaluation during training -------------------------------------------------------------


def _eval_batches(dataset: Any, limit: int | None = None) -> Any:
    if limit is not None and len(dataset) > limit:
        dataset = Subset(dataset, range(limit))
    return eval_loader(dataset, _EVAL_BATCH)


def _clean_accuracy(model: nn.Module, dataset: Any, device: torch.device) -> float:
    correct = total = 0
    with torch.no_grad():
        for x, y in _eval_batches(dataset):
            x, y = x.to(device), y.to(device)
            correct += int((model(x).argmax(1) == y).sum())
            total += len(y)
    return correct / max(total, 1)


def robust_accuracy(
    model: nn.Module, x: Tensor, y: Tensor, eps: float, steps: int = VAL_PGD_STEPS
) -> float:
    """Accuracy under L-inf PGD (random start, step eps/4, CE) in the model's current mode.

    Shape:
        x: (N, C, H, W) in [0, 1]; y: (N,) -> fraction in [0, 1]
    """
    start = torch.empty_like(x).uniform_(-eps, eps)
    x_adv = linf_pgd(
        model, x,
        lambda logits: nn.functional.cross_entropy(logits, y, reduction="sum"),
        eps=eps, step_size=eps / 4, steps=steps, start=start,
    )
    with torch.no_grad():
        return float((model(x_adv).argmax(1) == y).float().mean())


def _val_robust_accuracy(model: nn.Module, dataset: Any, eps: float, device: torch.device) -> float:
    correct = total = 0.0
    for x, y in _eval_batches(dataset, VAL_ROBUST_SAMPLES):
        x, y = x.to(device), y.to(device)
        correct += robust_accuracy(model, x, y, eps) * len(y)
        total += len(y)
    return correct / max(total, 1)


# --- checkpoints ----------------------------------------------------------------------------


def _to_cpu(obj: Any) -> Any:
    """Deep copy with every tensor cloned to CPU (the live state keeps changing after a report)."""
    if isinstance(obj, Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def _config_fingerprint(cfg: TrainingConfig) -> dict[str, Any]:
    # checkpoint_every only says how often the caller writes, val_robust_epochs when a number is
    # measured (in eval mode, between reseeded epochs); everything else shapes the run. Leaving the
    # latter out also resumes checkpoints written before the field existed.
    return cfg.model_dump(mode="json", exclude={"checkpoint_every", "val_robust_epochs"})


@dataclass
class _State:
    epoch: int = 0
    global_step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    best: dict[str, Any] | None = None
    seconds: float = 0.0


def _checkpoint(
    model: nn.Module, optimizer: torch.optim.Optimizer, state: _State, cfg: TrainingConfig,
    seed: int,
) -> dict[str, Any]:
    rng: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return _to_cpu({
        "version": CHECKPOINT_VERSION,
        "epoch": state.epoch,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": {"global_step": state.global_step},
        "best": state.best,
        "history": [dict(h) for h in state.history],
        "seconds": state.seconds,
        "seed": seed,
        "training": _config_fingerprint(cfg),
        "rng": rng,
    })


def _restore(
    ck: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer, cfg: TrainingConfig,
    seed: int,
) -> _State:
    if not isinstance(ck, dict) or ck.get("version") != CHECKPOINT_VERSION:
        raise ValueError(
            f"resume checkpoint version {ck.get('version') if isinstance(ck, dict) else ck!r} "
            f"is not {CHECKPOINT_VERSION}; pass a checkpoint from an EpochReport"
        )
    if ck["seed"] != seed:
        raise ValueError(f"resume checkpoint seed={ck['seed']} differs from seed={seed}")
    now = _config_fingerprint(cfg)
    changed = sorted(k for k in now if ck["training"].get(k) != now[k])
    if changed:
        k = changed[0]
        raise ValueError(
            f"resume checkpoint was trained with training.{k}={ck['training'].get(k)!r}, "
            f"not {now[k]!r}; a resumed run must use the same training config"
        )
    if not 0 <= ck["epoch"] <= cfg.epochs:
        raise ValueError(f"resume checkpoint epoch={ck['epoch']} must be in [0, {cfg.epochs}]")
    model.load_state_dict(ck["model"])
    optimizer.load_state_dict(ck["optimizer"])
    torch.set_rng_state(ck["rng"]["torch"])
    if "cuda" in ck["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(ck["rng"]["cuda"])
    return _State(
        epoch=int(ck["epoch"]),
        global_step=int(ck["scheduler"]["global_step"]),
        history=[dict(h) for h in ck["history"]],
        best=ck["best"],
        seconds=float(ck["seconds"]),
    )


# --- the loop -------------------------------------------------------------------------------


def _finetune_phase(hooks: list[EpochHook]) -> tuple[int, float] | None:
    """(first epoch, LR) of a hook's constant-LR fine-tune phase (k-WTA's), else None."""
    for hook in hooks:
        phase = getattr(hook, "finetune", None)
        if callable(phase) and (found := phase()) is not None:
            return int(found[0]), float(found[1])
    return None


def _reached(hooks: list[EpochHook], model: nn.Module) -> dict[str, float]:
    out: dict[str, float] = {}
    for hook in hooks:
        reached = getattr(hook, "reached", None)
        if callable(reached):
            out.update(reached(model))
    return out



class _Diverged(Exception):
    def __init__(self, what: str, value: float, epoch: int, step: int) -> None:
        super().__init__(f"{what} became {value} at epoch {epoch}, step {step}")
        self.epoch = epoch


def _train_epoch(
    model: nn.Module,
    recipe: Recipe,
    ctx: StepContext,
    optimizer: torch.optim.Optimizer,
    loader: Any,
    cfg: TrainingConfig,
    plan: _Plan,
    state: _State,
    device: torch.device,
    fixed_lr: float | None = None,
) -> dict[str, float]:
    model.train()
    schedule = LR_SCHEDULES[cfg.schedule]
    loss_sum = correct = seen = 0.0
    lr = cfg.lr
    for i, (x, y) in enumerate(loader):
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        lr = fixed_lr if fixed_lr is not None else cfg.lr * schedule(state.global_step, plan)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        loss, logits, _ = recipe.batch_loss(ctx, x, y)
        # One host sync per step: the price of stopping at the exact step that went non-finite.
        value = float(loss.detach())
        if not math.isfinite(value):
            raise _Diverged("loss", value, state.epoch + 1, i + 1)
        loss.backward()
        if cfg.grad_clip is not None:
            norm = float(nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip))
            if not math.isfinite(norm):
                raise _Diverged("gradient norm", norm, state.epoch + 1, i + 1)
        optimizer.step()
        state.global_step += 1
        loss_sum += value * len(y)
        correct += float((logits.detach().argmax(1) == y).sum())
        seen += len(y)
    return {
        "train_loss": loss_sum / max(seen, 1),
        "train_accuracy": correct / max(seen, 1),
        "lr": lr,
    }


def fit(
    model: nn.Module,
    bundle: DataBundle,
    cfg: TrainingConfig,
    *,
    defense: str,
    defense_params: dict[str, Any],
    device: torch.device,
    seed: int,
    on_epoch: Callable[[EpochReport], None] | None = None,
    resume: dict[str, Any] | None = None,
    num_workers: int = 0,
) -> FitResult:
    """Train ``model`` in place with the recipe ``cfg.recipe``.

    Args:
        model: The network (moved to ``device``); left in train mode, holding the final weights
            or, with early stopping, the best epoch's.
        bundle: Data with ``train``, ``val`` (may be None) and ``test`` datasets.
        cfg: Recipe, optimiser, schedule, epochs, batch size, adversarial settings.
        defense: Defense name (selects epoch hooks, e.g. k-WTA annealing).
        defense_params: The defense's parameters (k-WTA gamma schedule, CAS beta).
        device: Where model and batches live.
        seed: Seeds shuffling and all training randomness per epoch (see module docstring).
        on_epoch: Called after every epoch with metrics and a resumable checkpoint.
        resume: A checkpoint from an :class:`EpochReport`; training continues at the next epoch.
        num_workers: DataLoader worker processes.

    Returns:
        A :class:`FitResult`. A non-finite loss gives ``status="diverged"``; it never raises for
        that.

    Raises:
        ValueError: for an unknown recipe/optimiser/schedule or a checkpoint that does not match
            this run (different seed or training config).
    """
    t_start = time.perf_counter()
    for what, name, table in (
        ("recipe", cfg.recipe, RECIPES),
        ("optimizer", cfg.optimizer, OPTIMIZERS),
        ("schedule", cfg.schedule, LR_SCHEDULES),
    ):
        if name not in table:
            raise ValueError(f"training.{what}={name!r} must be one of {', '.join(table)}")
    recipe = RECIPES[cfg.recipe]
    model.to(device)
    optimizer = OPTIMIZERS[cfg.optimizer](parameter_groups(model, cfg, defense), cfg)
    hook_factory = get_defense(defense).epoch_hook if defense and defense != BASELINE else None
    hooks: list[EpochHook] = [make_epoch_hook(hook_factory, defense_params, cfg.epochs)] if hook_factory else []
    finetune = _finetune_phase(hooks)
    ctx = StepContext.for_model(model, cfg, defense_params)
    state = _restore(resume, model, optimizer, cfg, seed) if resume is not None else _State()
    seconds_before = state.seconds

    has_val = bundle.val is not None and len(bundle.val) > 0
    early_stopping = recipe.early_stopping and cfg.early_stopping
    if early_stopping and not has_val:
        log.warning("early stopping needs a validation set (data.val_fraction > 0); disabled")
        early_stopping = False
    plan: _Plan | None = None

    try:
        while state.epoch < cfg.epochs:
            t_epoch = time.perf_counter()
            epoch = state.epoch
            torch.manual_seed(epoch_seed(seed, epoch))
            metrics: dict[str, float] = {}
            for hook in hooks:
                metrics.update(hook.start_epoch(model, epoch))
            loader = train_loader(
                bundle, cfg.batch_size, seed=epoch_seed(seed, epoch), num_workers=num_workers
            )
            if plan is None:
                # A fine-tune phase runs at its own constant LR: the main schedule ends before it.
                main_epochs = min(cfg.epochs, max(1, finetune[0])) if finetune else cfg.epochs
                plan = _Plan(main_epochs, len(loader), tuple(cfg.milestones))
            fixed_lr = finetune[1] if finetune and epoch >= finetune[0] else None
            metrics.update(_train_epoch(model, recipe, ctx, optimizer, loader, cfg, plan, state,
                                        device, fixed_lr))
            if has_val:
                model.eval()
                metrics["val_accuracy"] = _clean_accuracy(model, bundle.val, device)
                if (recipe.adversarial or cfg.val_eps is not None) and (
                    early_stopping or cfg.val_robust_epochs is None or epoch + 1 in cfg.val_robust_epochs
                ):
                    metrics["val_robust_accuracy"] = _val_robust_accuracy(
                        model, bundle.val, cfg.val_eps or cfg.adv_eps, device
                    )
                model.train()
            state.epoch += 1
            if early_stopping and (
                state.best is None or metrics["val_robust_accuracy"] > state.best["score"]
            ):
                state.best = {
                    "epoch": state.epoch,
                    "score": metrics["val_robust_accuracy"],
                    "model": _to_cpu(model.state_dict()),
                }
            metrics["seconds"] = time.perf_counter() - t_epoch
            state.history.append({"epoch": state.epoch, **metrics})
            state.seconds = seconds_before + time.perf_counter() - t_start
            log.info("epoch %d/%d %s", state.epoch, cfg.epochs,
                     " ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
            if on_epoch is not None:
                on_epoch(EpochReport(state.epoch, dict(metrics),
                                     _checkpoint(model, optimizer, state, cfg, seed)))
    except _Diverged as err:
        log.warning("training diverged: %s", err)
        return FitResult(
            status="diverged",
            epochs_run=state.epoch,
            reason=str(err),
            diverged_epoch=err.epoch,
            history=state.history,
            seconds=seconds_before + time.perf_counter() - t_start,
            reached=_reached(hooks, model),
        )

    best_epoch = None
    if state.best is not None:
        model.load_state_dict(state.best["model"])
        best_epoch = int(state.best["epoch"])
        log.info("early stopping: restored epoch %d (val robust accuracy %.4f)",
                 best_epoch, state.best["score"])
    return FitResult(
        status="completed",
        epochs_run=state.epoch,
        history=state.history,
        best_epoch=best_epoch,
        seconds=seconds_before + time.perf_counter() - t_start,
        reached=_reached(hooks, model),
    )
