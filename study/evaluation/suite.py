"""Attack a trained model with the configured suite, honestly, and check the attacks.

What :func:`evaluate` measures (``docs/evaluation.md``):

* clean accuracy, and per attack its accuracy with every setting used;
* robust accuracy = mean over samples of "correct under *every* attack" (the per-sample worst
  case, Croce & Hein's AutoAttack convention), never the minimum of per-attack means;
* an accuracy-vs-eps curve with PGD (the suite's PGD steps, the same seed) at each
  ``eps_curve`` value and at eps = 0, where the attack runs with a zero budget: that point goes
  through the whole attack path, so R1 can catch a harness that scores attacked inputs
  differently from clean ones;
* the integrity flags of :mod:`study.evaluation.checks`; ``trusted`` = every gate passed.

Honest by default, so a careless suite cannot inflate a number:

* a stochastic model (outputs differ between two eval-mode passes, R12) gets an EOT attack added
  when the suite has none (``autoattack_rand`` next to ``autoattack``, else ``eot_pgd``; off with
  ``eval.add_eot: false``, and R12 then fails). It is scored as deployed: one pass decides a
  prediction, accuracy is the expected accuracy over ``eval.passes`` passes (Athalye et al.,
  "Obfuscated gradients"), every sample some pass gets right is attacked, and the per-sample
  worst point over the suite is scored again with fresh passes. ``eval.randomized: smoothed``
  scores the majority-vote classifier instead, labelled as such;
* a model with CAS modules gets the adaptive attack on CAS's joint loss (Bai et al., "Improving
  adversarial robustness via channel-wise activation suppressing") added;
* KAP protocol (Bashivan et al., "Learning robust kernel ensembles with kernel average pooling"):
  a model with activation noise (sigma > 0) is attacked twice, with the noise switched off (the
  paper's main tables) and with the noise on at test time under EOT (its appendix). The deployed
  model — noisy iff ``defense_params['noise_at_eval']`` (``at_eval`` for the ``noise`` baseline)
  — gets the full suite, the eps curve and the checks, and its number is ``robust_accuracy``; the
  other configuration gets a reduced suite (skipped with ``eval.protocol_arms: deployed``). Both
  numbers land in ``EvalResult.protocol``.

Every addition is recorded (``added`` on the attack's record and a line in ``notes``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from study.attacks import (
    ATTACKS,
    PGD_STEPS,
    AttackContext,
    AttackOutcome,
    attack_mode,
    clean_score,
    expected_correct,
    model_device,
    run_attack,
    seeded,
)
from study.config import AttackConfig, EvalConfig
from study.evaluation.checks import check_invariants, check_stochastic, probe_stochastic, run_checks, trusted
from study.results.records import failed_gates

log = logging.getLogger(__name__)

__all__ = ["EvalResult", "eps_curve", "evaluate", "scoring_label", "worst_case"]


@dataclass
class EvalResult:
    """What an evaluation measured. Accuracies are fractions in [0, 1].

    Attributes:
        clean_accuracy: Accuracy on the unperturbed samples (deployed configuration).
        robust_accuracy: Per-sample worst case over the suite (deployed configuration).
        attacks: Per attack: name, accuracy, settings, seconds, invariant_violations, added.
        eps_curve: (eps, PGD accuracy) pairs, eps = 0 (a zero-budget attack) first; empty when
            ``eval.eps_curve`` is.
        flags: Integrity flags as dicts (id, name, passed, gate, values, message).
        trusted: The checks ran and every gate passed.
        stochastic: The deployed model's forward pass is random.
        protocol: KAP protocol (models with activation noise only): ``deployed`` ("no_noise" |
            "noise_eot"), ``no_noise`` and ``noise_eot`` robust accuracies, their clean
            accuracies (``*_clean``), attack names (``*_attacks``), and the other
            configuration's per-attack records (``other_attacks``). Any stochastic model:
            ``scoring`` (what the accuracies measure) and ``passes``.
        seconds: Wall time of the whole evaluation.
        n_samples: Samples attacked.
        notes: What the harness added or decided on its own (one line each).
    """

    clean_accuracy: float
    robust_accuracy: float
    attacks: list[dict[str, Any]]
    eps_curve: list[tuple[float, float]]
    flags: list[dict[str, Any]]
    trusted: bool
    stochastic: bool
    protocol: dict[str, Any]
    seconds: float
    n_samples: int = 0
    notes: list[str] = field(default_factory=list)

    def failed_gates(self) -> list[str]:
        """Ids of the gate flags that failed."""
        return failed_gates(self.flags)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def worst_case(masks: Sequence[Tensor]) -> Tensor:
    """Per-sample worst case: correct under every mask (logical AND over attacks).

    Shape:
        masks: each (N,) bool -> (N,) bool
    """
    if not masks:
        raise ValueError("worst_case needs at least one mask")
    n = masks[0].shape[0]
    out = torch.ones(n, dtype=torch.bool)
    for mask in masks:
        if mask.shape != (n,):
            raise ValueError(f"mask shape {tuple(mask.shape)} must be ({n},) like the first mask")
        out &= mask.bool().cpu()
    return out


def eps_curve(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    epsilons: Sequence[float],
    ctx: AttackContext,
    *,
    steps: int = PGD_STEPS,
    restarts: int = 1,
    done: Sequence[AttackOutcome] = (),
) -> tuple[list[tuple[float, float]], list[AttackOutcome]]:
    """Accuracy vs eps with PGD L-inf (step eps/4, same seed at every eps).

    The eps = 0 point is the same PGD with a zero budget, run and scored like every other point
    (not the clean pass again): it equals the clean accuracy unless attacking itself changes the
    score (a stateful model, a harness that evaluates attacked inputs differently), which R1
    reports. No epsilons: no curve.

    ``done``: outcomes already computed on the same (x, y) in the same context (the suite's). A
    point whose PGD settings equal one of them reuses it instead of running it again: attacks are
    seeded per call, so the rerun would give the same result (the curve's point at the search eps
    is usually the suite's own PGD).

    Returns:
        The (eps, accuracy) points sorted by eps with 0 first, and the PGD outcomes this call ran
        (for R18; reused ones were counted with the suite).
    """
    points: list[tuple[float, float]] = []
    outcomes = []
    wanted = sorted({float(e) for e in epsilons if e > 0})
    for eps in [0.0, *wanted] if wanted else []:
        # model_construct: a zero budget is no valid user setting, but it is this point's meaning.
        attack = AttackConfig.model_construct(name="pgd", eps=eps, steps=steps, restarts=restarts)
        settings = ATTACKS["pgd"].settings(attack, ctx)
        outcome = next((o for o in done if o.name == "pgd" and o.settings == settings), None)
        if outcome is None:
            outcome = run_attack(model, x, y, attack, ctx, keep_adv=False)
            outcomes.append(outcome)
        points.append((eps, outcome.accuracy))
    return points, outcomes


# --------------------------------------------------------------------------- defense helpers


def _noise_modules(model: nn.Module) -> list[nn.Module]:
    from defenses.noise import ActivationNoise

    return [m for m in model.modules() if isinstance(m, ActivationNoise) and m.sigma > 0]


def _has_cas(model: nn.Module) -> bool:
    from defenses.cas import cas_modules

    return bool(cas_modules(model))


@contextmanager
def _noise_config(model: nn.Module, arm: str) -> Iterator[None]:
    """The model with its activation noise off (``no_noise``) or on at eval (``noise_eot``)."""
    from defenses.noise import noise_disabled, set_noise_at_eval

    if arm == "no_noise":
        with noise_disabled(model):
            yield
        return
    from defenses.noise import ActivationNoise

    modules = [m for m in model.modules() if isinstance(m, ActivationNoise)]
    saved = [m.at_eval for m in modules]
    set_noise_at_eval(model, True)
    try:
        yield
    finally:
        for module, flag in zip(modules, saved):
            module.at_eval = flag


# --------------------------------------------------------------------------- one configuration


@dataclass
class _Arm:
    clean: float
    robust: float
    outcomes: list[AttackOutcome]
    records: list[dict[str, Any]]
    stochastic: bool
    max_abs_diff: float
    ctx: AttackContext
    clean_mask: Tensor
    clean_scores: Tensor


def _suite(
    attacks: Sequence[AttackConfig], *, cas: bool, stochastic: bool, notes: list[str], add_eot: bool = True
) -> list[tuple[AttackConfig, str | None]]:
    """The configured attacks plus the honest-by-default additions, each with why it was added."""
    suite: list[tuple[AttackConfig, str | None]] = [(a, None) for a in attacks]
    names = {a.name for a in attacks}
    if cas and "cas_adaptive" not in names:
        suite.append((AttackConfig(name="cas_adaptive"), "model has CAS modules: adaptive joint-loss attack"))
    if stochastic and not add_eot and not any(ATTACKS[a.name].eot for a in attacks):
        notes.append("stochastic model attacked without EOT (eval.add_eot: false): R12 fails")
    elif stochastic and not any(ATTACKS[a.name].eot for a in attacks):
        # Inherit the budget of the attack it stands next to (a cheap search suite stays cheap).
        name, like = ("autoattack_rand", "autoattack") if "autoattack" in names else ("eot_pgd", "pgd")
        steps = next((a.steps for a in attacks if a.name == like), None)
        suite.append((AttackConfig(name=name, steps=steps), "stochastic model: EOT attack required (R12)"))
    for cfg, why in suite:
        if why:
            notes.append(f"added {cfg.name}: {why}")
    return suite


def _run_arm(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    suite: Sequence[tuple[AttackConfig, str | None]],
    ctx: AttackContext,
    stochastic: bool,
    max_abs_diff: float,
) -> _Arm:
    clean = clean_score(model, x, y, ctx)
    resample = ctx.passes > 1
    outcomes, records = [], []
    for attack, why in suite:
        outcome = run_attack(model, x, y, attack, ctx, keep_adv=resample)
        outcomes.append(outcome)
        record = outcome.as_dict()
        record["added"] = why
        records.append(record)
    if resample:
        robust = _expected_worst_case(model, x, y, clean, outcomes, ctx)
    else:
        robust = worst_case([clean > 0.5] + [o.correct for o in outcomes]).float()
    for o in outcomes:
        o.x_adv = None  # only the worst case needed the points
    return _Arm(
        clean=float(clean.mean()),
        robust=float(robust.mean()),
        outcomes=outcomes,
        records=records,
        stochastic=stochastic,
        max_abs_diff=max_abs_diff,
        ctx=ctx,
        clean_mask=clean > 0.5,
        clean_scores=clean,
    )


def _expected_worst_case(
    model: nn.Module, x: Tensor, y: Tensor, clean: Tensor, outcomes: Sequence[AttackOutcome], ctx: AttackContext
) -> Tensor:
    """Per sample, the expected correctness at the suite's worst point for it, on fresh passes.

    The attacker picks, per sample, the point (clean or one attack's) with the lowest score; taking
    the minimum of the scores themselves would bias the number down (a minimum of noisy
    estimates), so the picked points are scored once more with passes no choice has seen.
    """
    scores = torch.stack([clean] + [o.scores for o in outcomes])  # (1 + attacks, N)
    pick = scores.argmin(dim=0)
    points = x.detach().cpu().clone()
    for k, o in enumerate(outcomes, start=1):
        chosen = pick == k
        if o.x_adv is not None and bool(chosen.any()):
            points[chosen] = o.x_adv[chosen].to(points.dtype)
    device = model_device(model, x.device)
    out = []
    # A seed of its own: these passes must be independent of the ones that chose the points.
    with attack_mode(model), seeded(ctx.seed + 1, device):
        for lo in range(0, x.shape[0], ctx.batch_size):
            xb, yb = points[lo : lo + ctx.batch_size].to(device), y[lo : lo + ctx.batch_size].to(device)
            out.append(expected_correct(model, xb, yb, ctx.passes, ctx.votes).cpu())
    return torch.cat(out)


def _context(cfg: EvalConfig, num_classes: int, seed: int, stochastic: bool, defense_params: dict[str, Any]
             ) -> AttackContext:
    smoothed = stochastic and cfg.randomized == "smoothed"
    return AttackContext(
        eps=cfg.eps,
        eps_l2=cfg.eps_l2,
        num_classes=num_classes,
        seed=seed,
        batch_size=cfg.batch_size,
        votes=cfg.passes if smoothed else 1,
        passes=cfg.passes if stochastic and not smoothed else 1,
        defense_params=dict(defense_params),
    )


def scoring_label(cfg: EvalConfig, stochastic: bool) -> str:
    """What a stochastic model's accuracies measure, for outputs and notes."""
    if not stochastic:
        return "deterministic"
    if cfg.randomized == "smoothed":
        return f"smoothed classifier (majority of the mean softmax over {cfg.passes} passes), not the deployed model"
    return f"deployed single-pass classifier: expected accuracy over {cfg.passes} passes"


# --------------------------------------------------------------------------- entry point


def evaluate(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    cfg: EvalConfig,
    *,
    num_classes: int,
    defense: str,
    defense_params: dict[str, Any],
    recipe: str,
    seed: int,
) -> EvalResult:
    """Attack ``model`` on (x, y) with the suite of ``cfg``, build the eps curve, run the checks.

    Args:
        model: Trained model (inputs in [0, 1], logits out). Attacked in eval mode; its
            training mode and noise settings are restored afterwards.
        x: Inputs (N, C, H, W) in [0, 1].
        y: Labels (N,).
        cfg: Evaluation config (eps, suite, eps curve, checks).
        num_classes: Number of classes.
        defense: The model's defense name ("none", "kap", ...): CAS/KAP handling, R13, R17.
        defense_params: Its parameters (``noise_at_eval``, CAS ``beta``).
        recipe: Training recipe (R17 applies to "standard" only).
        seed: Seeds every attack (the same seed for every attack and eps).

    Returns:
        The :class:`EvalResult`.

    Raises:
        ValueError: x and y disagree in length or are empty, x is outside [0, 1], or the suite
            is empty.
    """
    start = time.perf_counter()
    if x.shape[0] == 0 or x.shape[0] != y.shape[0]:
        raise ValueError(f"x {tuple(x.shape)} and y {tuple(y.shape)} must hold the same, non-zero number of samples")
    if float(x.min()) < 0 or float(x.max()) > 1:
        raise ValueError(f"inputs must lie in [0, 1] (got [{float(x.min()):.3g}, {float(x.max()):.3g}]); "
                         "normalisation belongs inside the model")
    if not cfg.attacks:
        raise ValueError("eval.attacks is empty: robust accuracy needs at least one attack")
    device = model_device(model, x.device)
    x, y = x.to(device), y.to(device)
    notes: list[str] = []
    cas = _has_cas(model)
    noise = _noise_modules(model)

    if not noise:
        deployed = _evaluate_deployed(model, x, y, cfg, num_classes, defense, defense_params, recipe, seed,
                                      cas=cas, force_stochastic=False, notes=notes)
        protocol: dict[str, Any] = {}
    else:
        noisy = bool(defense_params.get("noise_at_eval", defense_params.get("at_eval", False)))
        arm, other = ("noise_eot", "no_noise") if noisy else ("no_noise", "noise_eot")
        both = cfg.protocol_arms == "both"
        notes.append(f"KAP protocol: deployed model = {arm} (noise_at_eval={noisy}); {other} "
                     + ("attacked as well" if both else "not attacked (eval.protocol_arms: deployed)"))
        with _noise_config(model, arm):
            deployed = _evaluate_deployed(model, x, y, cfg, num_classes, defense, defense_params, recipe, seed,
                                          cas=cas, force_stochastic=noisy, notes=notes)
        main_arm = deployed["arm"]
        protocol = {
            "deployed": arm,
            arm: main_arm.robust,
            f"{arm}_clean": main_arm.clean,
            f"{arm}_attacks": [r["name"] for r in main_arm.records],
            "sigma": [float(m.sigma) for m in noise],
        }
        if both:
            with _noise_config(model, other):
                side = _evaluate_other(model, x, y, cfg, num_classes, defense_params, seed, other, cas=cas,
                                       notes=notes)
            protocol.update({other: side.robust, f"{other}_clean": side.clean,
                             f"{other}_attacks": [r["name"] for r in side.records], "other_attacks": side.records})

    main_arm = deployed["arm"]
    if main_arm.stochastic or protocol:
        # Either arm may be random (KAP's noise_eot arm always is): say what its numbers measure.
        protocol["scoring"] = scoring_label(cfg, True)
        protocol["passes"] = cfg.passes
    if main_arm.stochastic:
        notes.append(f"stochastic model scored as the {scoring_label(cfg, True)}")

    result = EvalResult(
        clean_accuracy=main_arm.clean,
        robust_accuracy=main_arm.robust,
        attacks=main_arm.records,
        eps_curve=deployed["curve"],
        flags=[f.as_dict() for f in deployed["flags"]],
        trusted=deployed["trusted"],
        stochastic=main_arm.stochastic,
        protocol=protocol,
        seconds=time.perf_counter() - start,
        n_samples=int(x.shape[0]),
        notes=notes,
    )
    log.info("evaluation: clean %.4f robust %.4f trusted=%s (%.1fs)", result.clean_accuracy,
             result.robust_accuracy, result.trusted, result.seconds)
    return result


def _evaluate_deployed(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    cfg: EvalConfig,
    num_classes: int,
    defense: str,
    defense_params: dict[str, Any],
    recipe: str,
    seed: int,
    *,
    cas: bool,
    force_stochastic: bool,
    notes: list[str],
) -> dict[str, Any]:
    """Full suite + eps curve + checks on the model as deployed."""
    stochastic, max_diff = probe_stochastic(model, x)
    stochastic = stochastic or force_stochastic
    ctx = _context(cfg, num_classes, seed, stochastic, defense_params)
    suite = _suite(cfg.attacks, cas=cas, stochastic=stochastic, notes=notes, add_eot=cfg.add_eot)
    arm = _run_arm(model, x, y, suite, ctx, stochastic, max_diff)

    pgd = next((a for a in cfg.attacks if a.name == "pgd"), None)
    curve, curve_outcomes = eps_curve(
        model, x, y, cfg.eps_curve, ctx, steps=(pgd.steps if pgd and pgd.steps else PGD_STEPS),
        restarts=pgd.restarts if pgd else 1, done=arm.outcomes,
    )
    if cfg.checks:
        flags = run_checks(
            model, x, y, cfg=cfg, ctx=ctx, outcomes=arm.outcomes, clean_accuracy=arm.clean, eps_curve=curve,
            stochastic=stochastic, max_abs_diff=max_diff, defense=defense, recipe=recipe,
            other_outcomes=curve_outcomes,
        )
        ok = trusted(flags)
    else:
        eot = [o.name for o in arm.outcomes if o.eot]
        flags = [check_stochastic(stochastic, max_diff, eot), check_invariants(arm.outcomes + curve_outcomes)]
        ok = False
        notes.append("integrity checks disabled (eval.checks: false): result not trusted")
    return {"arm": arm, "curve": curve, "flags": flags, "trusted": ok}


def _evaluate_other(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    cfg: EvalConfig,
    num_classes: int,
    defense_params: dict[str, Any],
    seed: int,
    arm: str,
    *,
    cas: bool,
    notes: list[str],
) -> _Arm:
    """The KAP configuration that is not deployed, with a reduced suite.

    ``noise_eot``: the EOT attack(s) only (``autoattack_rand`` if in the suite, else the suite's
    ``eot_pgd`` or a default one), predictions over several passes. ``no_noise``: the suite
    without its EOT attacks (the deterministic model makes them plain PGD at 20x the cost).
    """
    stochastic, max_diff = probe_stochastic(model, x)
    if arm == "noise_eot":
        stochastic = True
        rand = [a for a in cfg.attacks if a.name == "autoattack_rand"]
        attacks = rand or [a for a in cfg.attacks if a.name == "eot_pgd"] or [AttackConfig(name="eot_pgd")]
    else:
        attacks = [a for a in cfg.attacks if not ATTACKS[a.name].eot] or [AttackConfig(name="pgd")]
    ctx = _context(cfg, num_classes, seed, stochastic, defense_params)
    side_notes: list[str] = []
    suite = _suite(attacks, cas=cas, stochastic=stochastic, notes=side_notes)
    notes.extend(f"{arm}: {n}" for n in side_notes)
    return _run_arm(model, x, y, suite, ctx, stochastic, max_diff)
