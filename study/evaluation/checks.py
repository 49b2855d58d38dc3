"""Integrity checks: named flags that say whether an evaluation can be trusted.

The rules are those of ``docs/evaluation.md`` (after Carlini et al., "On evaluating
adversarial robustness"; Athalye et al., "Obfuscated gradients give a false sense of security";
Croce & Hein's AutoAttack flags; Tramèr et al., "On adaptive attacks to adversarial example
defenses"). Every check returns a :class:`Flag` with its measured values, so a failed gate can
be read off MLflow without rerunning anything. ``trusted`` is True only when every gate passes.

Checks that need no model access are pure functions of measurements the evaluation already has
(``check_eps_curve``, ``check_black_box``, ``check_invariants``, ...); the others attack or probe
the model on the first ``check_samples`` inputs. :func:`run_checks` runs them all in order.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from study.attacks import (
    PGD_STEPS,
    AttackContext,
    AttackOutcome,
    attack_mode,
    model_device,
    run_attack,
)
from study.config import AttackConfig, EvalConfig
from study.results.records import is_trusted

log = logging.getLogger(__name__)

__all__ = [
    "Flag",
    "check_batch_independence",
    "check_black_box",
    "check_black_box_any",
    "check_more_restarts",
    "check_more_steps",
    "check_eps_curve",
    "check_fgsm_vs_pgd",
    "check_gradients",
    "check_harness",
    "check_invariants",
    "check_large_eps",
    "check_logits",
    "check_routing",
    "check_stochastic",
    "check_unbounded",
    "convergence_attack",
    "noise_tolerance",
    "probe_stochastic",
    "routing_defenses",
    "run_checks",
    "trusted",
]

CURVE_TOL = 0.02
"""R1: accuracy may rise by at most 2 points with eps (sampling noise of a seeded attack)."""
LARGE_EPS = 0.5
"""R2: an L-inf budget of 0.5 on [0, 1] lets the attacker turn every image into flat grey."""
LARGE_EPS_MARGIN = 0.1
"""R2: allowed accuracy above chance at LARGE_EPS."""
UNBOUNDED_EPS = 1.0
"""R4: L-inf 1.0 on [0, 1] is no constraint at all."""
UNBOUNDED_STEPS = 50
UNBOUNDED_MAX_ACCURACY = 0.05
"""R4: an unbounded attack must succeed on >= 95% of the samples."""
SQUARE_CHECK_QUERIES = 1000
"""R8: Square's budget when the suite has no black-box attack to reuse."""
R8_MIN_COUNT, R8_MAX_FRACTION = 2, 0.01
"""R8 fails when Square breaks at least 2 samples, and more than 1 %, that every white-box attack
missed. AutoAttack's own check warns at any such sample; as a gate that made nearly every
adversarially trained trial of a cheap search suite untrusted over a single sample (the count is
recorded either way)."""
ZERO_GRAD_MAX_FRACTION = 0.05
"""R11: tolerated fraction of samples with a zero or non-finite input gradient."""
FGSM_TOL = 0.02
"""R7: PGD may exceed FGSM's accuracy by at most 2 points."""
CONVERGENCE_TOL = 0.01
"""R5/R6: twice the steps, or twice the restarts, may lower accuracy by at most 1 point."""
HARNESS_MAX_ACCURACY = 0.1
"""R17: an undefended, standard-trained model must be broken (<= 10%) at the study eps."""


def routing_defenses() -> frozenset[str]:
    """R13: defenses that route by argmax/top-k (piecewise-constant, gradients can mislead)."""
    from defenses import iter_defenses

    return frozenset(entry.name for entry in iter_defenses() if entry.routing)

PROBE_SAMPLES = 64


@dataclass
class Flag:
    """One integrity check's verdict.

    Attributes:
        id: Rule id of docs/evaluation.md ("R1", ...).
        name: Short name.
        passed: The rule holds.
        gate: A failure marks the trial untrusted (warn-only rules have ``gate=False``).
        values: What was measured (JSON-serialisable).
        message: One line: what was checked, and on failure what it suggests.
    """

    id: str
    name: str
    passed: bool
    gate: bool
    values: dict[str, Any] = field(default_factory=dict)
    message: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def trusted(flags: Sequence[Flag | dict[str, Any]]) -> bool:
    """All gate flags passed (``study.results.records.is_trusted`` on the flags' dicts)."""
    return is_trusted(f if isinstance(f, dict) else f.as_dict() for f in flags)


# --------------------------------------------------------------------------- pure checks


def noise_tolerance(n: int, passes: int) -> float:
    """Extra slack for comparing two accuracies of a stochastic model scored over ``passes``
    passes on ``n`` samples: three standard errors of their difference at the worst case p = 1/2
    (each estimate's variance at most 1 / (4 n passes)). 0 for one pass (deterministic)."""
    if passes <= 1 or n <= 0:
        return 0.0
    return 3.0 * (2 * 0.25 / (n * passes)) ** 0.5


def check_eps_curve(curve: Sequence[tuple[float, float]], clean_accuracy: float, tol: float = CURVE_TOL) -> Flag:
    """R1: accuracy does not rise with eps, and eps = 0 reproduces the clean accuracy.

    Each point may exceed the lowest accuracy at any smaller eps by at most ``tol``. The eps = 0
    point must be the attack run with a zero budget (``study.evaluation.suite.eps_curve``), not the clean
    pass again. An empty curve (``eval.eps_curve: []``) is reported as skipped.
    """
    if not curve:
        return Flag("R1", "eps_monotone", True, True, {"curve": [], "skipped": "no eps curve (eval.eps_curve: [])"},
                    "skipped: no eps curve")
    points = sorted((float(e), float(a)) for e, a in curve)
    rises = []
    lowest = float("inf")
    for eps, acc in points:
        if acc > lowest + tol:
            rises.append([eps, acc, lowest])
        lowest = min(lowest, acc)
    zero = [a for e, a in points if e == 0.0]
    zero_ok = not zero or abs(zero[0] - clean_accuracy) <= tol
    passed = not rises and zero_ok
    if passed:
        msg = "accuracy does not rise with eps"
    elif rises:
        e, a, low = rises[0]
        msg = (f"accuracy rises with eps ({a:.3f} at eps={e:g} > {low:.3f} at a smaller eps): "
               "attack not converged, or randomness")
    else:
        msg = f"eps=0 accuracy {zero[0]:.3f} differs from clean accuracy {clean_accuracy:.3f}"
    return Flag("R1", "eps_monotone", passed, True,
                {"curve": [list(p) for p in points], "clean_accuracy": clean_accuracy, "rises": rises, "tol": tol}, msg)


def check_fgsm_vs_pgd(outcomes: Sequence[AttackOutcome], tol: float = FGSM_TOL) -> Flag | None:
    """R7 (warn): iterative PGD (or EOT-PGD) is not weaker than single-step FGSM at the same eps."""
    fgsm = [o for o in outcomes if o.name == "fgsm"]
    pgd = [o for o in outcomes if o.name in ("pgd", "eot_pgd")]
    pairs = [(f, p) for f in fgsm for p in pgd if abs(f.settings["eps"] - p.settings["eps"]) < 1e-12]
    if not pairs:
        return None
    f, p = pairs[0]
    passed = p.accuracy <= f.accuracy + tol
    msg = "PGD <= FGSM" if passed else (
        f"PGD accuracy {p.accuracy:.3f} > FGSM {f.accuracy:.3f}: gradient masking or a bad step size")
    return Flag("R7", "pgd_below_fgsm", passed, False,
                {"fgsm": f.accuracy, "pgd": p.accuracy, "pgd_attack": p.name, "eps": f.settings["eps"], "tol": tol,
                 "n": int(p.correct.numel())}, msg)


def _convergence(what: str, base: AttackOutcome, stronger: AttackOutcome,
                 tol: float) -> tuple[bool, bool, dict[str, Any], str]:
    drop = base.accuracy - stronger.accuracy
    passed = drop <= tol + 1e-12
    s, b = stronger.settings, base.settings
    msg = (f"{what} lowers accuracy by {max(drop, 0.0):.3f} (<= {tol:.3f})" if passed else
           f"{what} lowers accuracy from {base.accuracy:.3f} to {stronger.accuracy:.3f}: the attack has not "
           "converged; quote the stronger attack or raise its budget")
    values = {"attack": base.name, "base": base.accuracy, "stronger": stronger.accuracy, "drop": drop, "tol": tol,
              "steps": [b["steps"], s["steps"]], "restarts": [b["restarts"], s["restarts"]],
              "n": int(base.correct.numel())}
    return passed, False, values, msg


def check_more_steps(base: AttackOutcome, stronger: AttackOutcome, tol: float = CONVERGENCE_TOL) -> Flag:
    """R5 (warn): the same attack with twice the steps does not lower accuracy by more than ``tol``."""
    return Flag("R5", "more_steps_converged", *_convergence("twice the steps", base, stronger, tol))


def check_more_restarts(base: AttackOutcome, stronger: AttackOutcome, tol: float = CONVERGENCE_TOL) -> Flag:
    """R6 (warn): the same attack with twice the restarts does not lower accuracy by more than ``tol``."""
    return Flag("R6", "more_restarts_converged", *_convergence("twice the restarts", base, stronger, tol))


def check_black_box(
    outcomes: Sequence[AttackOutcome],
    extra: AttackOutcome | None = None,
    *,
    min_count: int = R8_MIN_COUNT,
    max_fraction: float = R8_MAX_FRACTION,
) -> Flag:
    """R8: the black-box attack finds no points that every white-box attack missed.

    A black-box success counts where the black-box attack broke a sample that had survived
    the gradient-based attacks: Square's own failures, or, for an ensemble ending with Square
    (AutoAttack), the samples only its Square stage broke. Compared on the first ``n`` samples,
    ``n`` the fewest any mask covers (a check-only Square runs on the first check_samples).
    Fails when such samples number ``>= min_count`` and ``> max_fraction`` of ``n``.
    """
    pool = list(outcomes) + ([extra] if extra is not None else [])
    white = [o.white_box_correct for o in outcomes if o.white_box and o.white_box_correct is not None]
    black = [o for o in pool if o.black_box]
    if not white or not black:
        what = "no white-box attack" if not white else "no black-box attack"
        return Flag("R8", "black_box_below_white_box", True, True, {"count": 0, "n": 0, "skipped": what},
                    f"skipped: {what} to compare")
    n = min([int(m.numel()) for m in white] + [int(o.correct.numel()) for o in black])
    all_white_fail = torch.ones(n, dtype=torch.bool)
    for mask in white:
        all_white_fail &= mask[:n].cpu()
    black_success = torch.zeros(n, dtype=torch.bool)
    for o in black:
        base = o.white_box_correct[:n].cpu() if o.white_box_correct is not None else torch.ones(n, dtype=torch.bool)
        black_success |= base & ~o.correct[:n].cpu()
    found = all_white_fail & black_success
    count = int(found.sum())
    fraction = count / n if n else 0.0
    passed = not (count >= min_count and fraction > max_fraction)
    msg = ("black box found nothing the white-box attacks missed" if passed else
           f"black-box attack broke {count}/{n} samples every white-box attack missed: gradient masking")
    return Flag("R8", "black_box_below_white_box", passed, True,
                {"count": count, "n": n, "fraction": fraction, "black_box": [o.name for o in black],
                 "white_box": [o.name for o in outcomes if o.white_box]}, msg)


def check_black_box_any(r8: Flag) -> Flag:
    """R8a (warn): AutoAttack's own threshold -- not a single sample broken only by the black box.

    Derived from R8's count so both read the same comparison: the gate (R8) tolerates one sample,
    sampling noise in a cheap suite; this warning keeps the reference's stricter line visible in
    every trial's flags without letting one sample empty a front.
    """
    count, n = int(r8.values.get("count", 0)), int(r8.values.get("n", 0))
    if "skipped" in r8.values:
        return Flag("R8a", "black_box_any_sample", True, False, {"count": 0, "n": 0, "skipped": r8.values["skipped"]},
                    f"skipped: {r8.values['skipped']} to compare")
    passed = count == 0
    msg = ("no sample broken only by the black-box attack" if passed else
           f"black-box attack broke {count}/{n} sample(s) every white-box attack missed (AutoAttack would warn)")
    return Flag("R8a", "black_box_any_sample", passed, False, {"count": count, "n": n}, msg)


def check_stochastic(stochastic: bool, max_abs_diff: float, eot_attacks: Sequence[str]) -> Flag:
    """R12: a model whose outputs differ across forward passes must be evaluated with EOT."""
    passed = (not stochastic) or bool(eot_attacks)
    if not stochastic:
        msg = "deterministic forward pass"
    elif passed:
        msg = f"stochastic model evaluated with EOT ({', '.join(eot_attacks)})"
    else:
        msg = "stochastic model evaluated without an EOT attack: add autoattack_rand or eot_pgd"
    return Flag("R12", "randomness_needs_eot", passed, True,
                {"stochastic": stochastic, "max_abs_diff": max_abs_diff, "eot_attacks": list(eot_attacks)}, msg)


def check_routing(defense: str, attack_names: Sequence[str]) -> Flag | None:
    """R13 (warn): argmax/top-k routing defenses need a gradient-free attack in the suite."""
    if defense not in routing_defenses():
        return None
    black = [n for n in attack_names if n in ("square", "autoattack")]
    passed = bool(black)
    msg = (f"gradient-free attack in the suite ({', '.join(black)})" if passed else
           f"{defense} routes by argmax/top-k: add square or autoattack to the suite")
    return Flag("R13", "routing_needs_black_box", passed, False, {"defense": defense, "black_box": black}, msg)


def check_harness(defense: str, recipe: str, pgd_accuracy: float | None, eps: float) -> Flag | None:
    """R17 (recorded, not a gate): an undefended, standard-trained model is broken by PGD at eps."""
    if defense != "none" or recipe != "standard" or pgd_accuracy is None:
        return None
    passed = pgd_accuracy <= HARNESS_MAX_ACCURACY
    msg = (f"PGD breaks the undefended model at eps={eps:g} ({pgd_accuracy:.3f})" if passed else
           f"undefended model keeps {pgd_accuracy:.3f} under PGD at eps={eps:g}: harness bug or eps too small")
    return Flag("R17", "harness_sanity", passed, False,
                {"pgd_accuracy": pgd_accuracy, "eps": eps, "max_accuracy": HARNESS_MAX_ACCURACY}, msg)


def check_invariants(outcomes: Sequence[AttackOutcome]) -> Flag:
    """R18: no attack left the threat model (eps-ball, [0, 1], finite) on any sample."""
    per_attack = {o.name: o.invariant_violations for o in outcomes if o.invariant_violations}
    total = sum(o.invariant_violations for o in outcomes)
    passed = total == 0
    msg = ("threat-model invariants held on every batch" if passed else
           f"{total} adversarial example(s) left the threat model ({per_attack}); they were projected back")
    return Flag("R18", "threat_model_invariants", passed, True,
                {"violations": total, "per_attack": per_attack, "attacks_checked": len(outcomes)}, msg)


# --------------------------------------------------------------------------- checks on the model


def probe_stochastic(model: nn.Module, x: Tensor, n: int = PROBE_SAMPLES) -> tuple[bool, float]:
    """Two forward passes in eval mode on the first ``n`` inputs: (outputs differ?, max |diff|)."""
    xs = x[:n].to(model_device(model, x.device))
    with attack_mode(model), torch.no_grad():
        a, b = model(xs).float(), model(xs).float()
    diff = (a - b).abs()
    max_diff = float(diff.max()) if diff.numel() else 0.0
    if not torch.isfinite(torch.tensor(max_diff)):
        return True, max_diff
    # Tolerance above float noise of non-deterministic GPU kernels, far below any injected noise.
    return not torch.allclose(a, b, rtol=1e-4, atol=1e-5), max_diff


def check_gradients(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 256,
                    max_fraction: float = ZERO_GRAD_MAX_FRACTION) -> Flag:
    """R11: input gradients of the CE loss at the clean points are neither zero nor non-finite."""
    zero = nonfinite = 0
    device = model_device(model, x.device)
    with attack_mode(model):
        for lo in range(0, x.shape[0], batch_size):
            xb = x[lo : lo + batch_size].detach().to(device).clone().requires_grad_(True)
            loss = F.cross_entropy(model(xb), y[lo : lo + batch_size].to(xb.device), reduction="sum")
            if loss.requires_grad:
                grad = torch.autograd.grad(loss, xb, allow_unused=True)[0]
            else:
                grad = None
            if grad is None:  # the output does not depend on the input through autograd at all
                zero += xb.shape[0]
                continue
            flat = grad.flatten(1)
            bad = ~torch.isfinite(flat).all(dim=1)
            nonfinite += int(bad.sum())
            zero += int(((flat == 0).all(dim=1) & ~bad).sum())
    n = max(x.shape[0], 1)
    fraction = (zero + nonfinite) / n
    passed = fraction <= max_fraction
    msg = (f"input gradients informative on {1 - fraction:.1%} of samples" if passed else
           f"{zero} zero and {nonfinite} non-finite input gradients of {n}: gradient masking")
    return Flag("R11", "input_gradients", passed, True,
                {"zero": zero, "nonfinite": nonfinite, "n": n, "fraction": fraction, "max_fraction": max_fraction},
                msg)


def check_logits(model: nn.Module, x: Tensor) -> Flag:
    """R15: the forward pass returns logits, not probabilities (attacks' CE would be wrong)."""
    with attack_mode(model), torch.no_grad():
        out = model(x[:PROBE_SAMPLES].to(model_device(model, x.device))).float()
    finite = bool(torch.isfinite(out).all())
    nonneg = bool((out >= 0).all())
    sums_to_one = bool(torch.allclose(out.sum(dim=1), torch.ones(out.shape[0], device=out.device), atol=1e-3))
    probabilities = finite and nonneg and sums_to_one
    passed = finite and not probabilities
    if not finite:
        msg = "model outputs are not finite"
    elif probabilities:
        msg = "model outputs are probabilities (rows >= 0 summing to 1): return logits"
    else:
        msg = "model outputs are logits"
    return Flag("R15", "outputs_are_logits", passed, True,
                {"finite": finite, "nonnegative": nonneg, "rows_sum_to_one": sums_to_one}, msg)


def check_batch_independence(model: nn.Module, x: Tensor, stochastic: bool, n: int = 8) -> Flag:
    """R19 (warn): a sample's output does not depend on the rest of its batch."""
    if stochastic:
        return Flag("R19", "batch_independence", True, False, {"skipped": "stochastic model"},
                    "skipped: outputs of a stochastic model cannot be compared")
    xs = x[:n].to(model_device(model, x.device))
    with attack_mode(model), torch.no_grad():
        together = model(xs).float()
        alone = torch.cat([model(xs[i : i + 1]) for i in range(xs.shape[0])]).float()
    max_diff = float((together - alone).abs().max()) if together.numel() else 0.0
    passed = bool(torch.allclose(together, alone, rtol=1e-3, atol=1e-4))
    msg = "outputs independent of the batch" if passed else (
        f"outputs change with the batch (max |diff| {max_diff:.2e}): batch-dependent layers in eval mode")
    return Flag("R19", "batch_independence", passed, False, {"max_abs_diff": max_diff, "n": int(xs.shape[0])}, msg)


def check_large_eps(model: nn.Module, x: Tensor, y: Tensor, ctx: AttackContext,
                    steps: int = PGD_STEPS) -> tuple[Flag, AttackOutcome]:
    """R2: at L-inf eps 0.5 on [0, 1] PGD brings accuracy to chance (+ 0.1)."""
    outcome = run_attack(model, x, y, AttackConfig(name="pgd", eps=LARGE_EPS, steps=steps), ctx, keep_adv=False)
    limit = 1.0 / ctx.num_classes + LARGE_EPS_MARGIN
    passed = outcome.accuracy <= limit
    msg = (f"accuracy {outcome.accuracy:.3f} at eps={LARGE_EPS} is near chance" if passed else
           f"accuracy {outcome.accuracy:.3f} at eps={LARGE_EPS} > {limit:.3f}: the attack cannot reach a trivial "
           "solution, gradients are masked or broken")
    return Flag("R2", "large_eps_chance", passed, True,
                {"accuracy": outcome.accuracy, "eps": LARGE_EPS, "limit": limit, "steps": steps,
                 "n": int(outcome.correct.numel())}, msg), outcome


def check_unbounded(model: nn.Module, x: Tensor, y: Tensor, ctx: AttackContext) -> tuple[Flag, AttackOutcome]:
    """R4: an unbounded attack (L-inf eps = 1, 50 PGD steps) succeeds on >= 95% of the samples."""
    cfg = AttackConfig(name="pgd", eps=UNBOUNDED_EPS, steps=UNBOUNDED_STEPS)
    outcome = run_attack(model, x, y, cfg, ctx, keep_adv=False)
    passed = outcome.accuracy <= UNBOUNDED_MAX_ACCURACY
    msg = (f"unbounded attack succeeds on {1 - outcome.accuracy:.1%}" if passed else
           f"unbounded attack leaves {outcome.accuracy:.3f} accuracy (> {UNBOUNDED_MAX_ACCURACY}): "
           "the attack is broken or gradients are masked")
    return Flag("R4", "unbounded_succeeds", passed, True,
                {"accuracy": outcome.accuracy, "eps": UNBOUNDED_EPS, "steps": UNBOUNDED_STEPS,
                 "max_accuracy": UNBOUNDED_MAX_ACCURACY, "n": int(outcome.correct.numel())}, msg), outcome


# --------------------------------------------------------------------------- all of them


def convergence_attack(attacks: Sequence[AttackConfig], outcomes: Sequence[AttackOutcome],
                       stochastic: bool) -> AttackConfig:
    """The iterative attack R5/R6 strengthen and R7 compares with FGSM: on a stochastic model whose
    suite averages over its randomness (``outcomes`` has an EOT attack, added ones included),
    EOT-PGD with the suite's EOT samples; otherwise PGD. The configured one when the suite has it."""
    eot = [o for o in outcomes if o.eot]
    name = "eot_pgd" if stochastic and eot else "pgd"
    found = next((a for a in attacks if a.name == name), None)
    if found is not None:
        return found
    if name == "eot_pgd":
        return AttackConfig(name="eot_pgd", eot_samples=eot[0].settings.get("eot_samples") or 20)
    return AttackConfig(name="pgd")


def run_checks(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    cfg: EvalConfig,
    ctx: AttackContext,
    outcomes: Sequence[AttackOutcome],
    clean_accuracy: float,
    eps_curve: Sequence[tuple[float, float]],
    stochastic: bool,
    max_abs_diff: float,
    defense: str,
    recipe: str,
    other_outcomes: Sequence[AttackOutcome] = (),
) -> list[Flag]:
    """Every integrity check of docs/evaluation.md that this harness implements, in rule order.

    Costly checks (R2, R4, R5-R7's attacks, R8's own Square, R17's PGD when the suite has none at
    the eval eps) run on the first ``cfg.check_samples`` inputs with the same seed, votes and
    passes as the suite. On a stochastic model scored over several passes, comparisons of two
    accuracies (R1, R5, R6, R7) get :func:`noise_tolerance` on top of their threshold.

    Args:
        model: The model as evaluated (same noise configuration as the suite).
        x, y: The evaluation samples (the suite ran on them).
        cfg: Evaluation config (eps, check_samples, batch size, the suite).
        ctx: The suite's attack context (seed, votes, classes).
        outcomes: The suite's outcomes.
        clean_accuracy: Clean accuracy on ``x``.
        eps_curve: (eps, accuracy) points including eps = 0.
        stochastic, max_abs_diff: The randomness probe's verdict.
        defense, recipe: For R13 and R17.
        other_outcomes: Further attacks that ran (the eps curve's PGD): counted by R18 only.

    Returns:
        The flags; ``trusted(flags)`` is the gate verdict.
    """
    xc, yc = x[: cfg.check_samples], y[: cfg.check_samples]
    pgd_steps = next((o.settings["steps"] for o in outcomes if o.name == "pgd"), PGD_STEPS)
    slack = noise_tolerance(int(x.shape[0]), ctx.passes)
    flags: list[Flag] = [check_eps_curve(eps_curve, clean_accuracy, tol=CURVE_TOL + slack)]
    check_outcomes: list[AttackOutcome] = []

    flag, outcome = check_large_eps(model, xc, yc, ctx, steps=pgd_steps)
    flags.append(flag)
    check_outcomes.append(outcome)
    flag, outcome = check_unbounded(model, xc, yc, ctx)
    flags.append(flag)
    check_outcomes.append(outcome)

    # R5/R6/R7 compare attacks on the same check samples with the same seed.
    check_slack = noise_tolerance(int(xc.shape[0]), ctx.passes)
    base_cfg = convergence_attack(cfg.attacks, outcomes, stochastic)
    base = run_attack(model, xc, yc, base_cfg, ctx, keep_adv=False)
    steps = base.settings["steps"]
    longer = run_attack(model, xc, yc, base_cfg.model_copy(update={"steps": 2 * steps}), ctx, keep_adv=False)
    more = run_attack(model, xc, yc, base_cfg.model_copy(update={"restarts": 2 * base.settings["restarts"]}), ctx,
                      keep_adv=False)
    check_outcomes += [base, longer, more]
    flags.append(check_more_steps(base, longer, tol=CONVERGENCE_TOL + check_slack))
    flags.append(check_more_restarts(base, more, tol=CONVERGENCE_TOL + check_slack))

    flag = check_fgsm_vs_pgd(outcomes, tol=FGSM_TOL + slack)
    if flag is None:  # the suite has no FGSM/PGD pair: the check brings its own single step
        fgsm = run_attack(model, xc, yc, AttackConfig(name="fgsm", eps=base_cfg.eps), ctx, keep_adv=False)
        check_outcomes.append(fgsm)
        flag = check_fgsm_vs_pgd([fgsm, base], tol=FGSM_TOL + check_slack)
    if flag is not None:
        flags.append(flag)

    extra = None
    if not any(o.black_box for o in outcomes) and any(o.white_box for o in outcomes):
        queries = min(next((a.queries for a in cfg.attacks if a.name == "square"), SQUARE_CHECK_QUERIES),
                      SQUARE_CHECK_QUERIES)
        extra = run_attack(model, xc, yc, AttackConfig(name="square", queries=queries), ctx, keep_adv=False)
        check_outcomes.append(extra)
    r8 = check_black_box(outcomes, extra)
    flags += [r8, check_black_box_any(r8)]

    flags.append(check_gradients(model, xc, yc, batch_size=ctx.batch_size))
    eot = [o.name for o in outcomes if o.eot]
    flags.append(check_stochastic(stochastic, max_abs_diff, eot))
    flag = check_routing(defense, [o.name for o in outcomes])
    if flag is not None:
        flags.append(flag)
    flags.append(check_logits(model, xc))

    if defense == "none" and recipe == "standard":
        pgd_acc = next((o.accuracy for o in outcomes if o.name == "pgd" and abs(o.settings["eps"] - ctx.eps) < 1e-12),
                       None)
        if pgd_acc is None:
            pgd_acc = next((a for e, a in eps_curve if abs(e - ctx.eps) < 1e-12), None)
        if pgd_acc is None:
            outcome = run_attack(model, xc, yc, AttackConfig(name="pgd"), ctx, keep_adv=False)
            check_outcomes.append(outcome)
            pgd_acc = outcome.accuracy
        flag = check_harness(defense, recipe, pgd_acc, ctx.eps)
        if flag is not None:
            flags.append(flag)

    flags.append(check_invariants(list(outcomes) + list(other_outcomes) + check_outcomes))
    flags.append(check_batch_independence(model, xc, stochastic))
    for f in flags:
        if not f.passed:
            log.warning("integrity %s %s %s: %s", f.id, "FAILED" if f.gate else "warns", f.name, f.message)
    return flags

