"""The one attack table: each entry turns an AttackConfig into recorded settings and the attack
objects built from exactly those settings."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch.nn.functional as F
import torchattacks
from torch import Tensor, nn
from torchattacks.attack import Attack

from defenses.cas import CAS_BETA
from study.attacks.context import (
    AA_STEPS,
    AA_TARGETS,
    CW_KAPPA,
    DEEPFOOL_OVERSHOOT,
    DEEPFOOL_STEPS,
    PGD_STEPS,
    SQUARE_P_INIT,
    SQUARE_RAW,
    SQUARE_RESCALED,
    AttackContext,
)
from study.attacks.losses import BoxDeepFool, CASAdaptivePGD, CWLinfPGD, EveryAPGD, LossPGD
from study.config import AttackConfig

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
        "passes": int(ctx.passes),
        "scoring": _scoring(ctx),
    }
    base.update(values)
    return base


def _scoring(ctx: AttackContext) -> str:
    if ctx.votes > 1:
        return f"smoothed classifier (mean softmax of {ctx.votes} passes)"
    if ctx.passes > 1:
        return f"single-pass classifier, expected accuracy over {ctx.passes} passes"
    return "single pass"


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
        p_schedule=SQUARE_RESCALED, loss="margin", random_start=True,
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
        p_schedule=SQUARE_RAW, components=["apgd-ce", "apgd-t", "fab-t", "square"], loss="ce, dlr-targeted, fab, margin",
        random_start=True,
    )


def _resolve_autoattack_rand(cfg: AttackConfig, ctx: AttackContext) -> dict[str, Any]:
    _need_classes("autoattack_rand", ctx, 3)
    return _settings(
        "autoattack_rand", "Linf", cfg, ctx, version="rand", steps=cfg.steps or AA_STEPS,
        restarts=cfg.restarts, eot_samples=cfg.eot_samples, components=["apgd-ce", "apgd-dlr"],
        loss="ce, dlr", random_start=True, samples="all given; highest-loss point per restart (best_loss)",
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
        p_init=s["p_init"], loss="margin", resc_schedule=s["p_schedule"] == SQUARE_RESCALED, seed=s["seed"],
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
                                 p_init=s["p_init"], loss="margin", seed=seed,
                                 resc_schedule=s["p_schedule"] == SQUARE_RESCALED)
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
        Stage("apgd-ce", EveryAPGD(model, loss="ce", **common)),
        Stage("apgd-dlr", EveryAPGD(model, loss="dlr", **common)),
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
