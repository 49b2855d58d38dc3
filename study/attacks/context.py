"""What every attack shares: the faithful defaults, the evaluation context, an attack's outcome."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

STOCHASTIC_VOTES = 10
"""Forward passes per estimate on a stochastic model: the passes whose share of correct
predictions is its expected accuracy (default), or whose mean softmax decides the smoothed
classifier (``eval.randomized: smoothed``)."""

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
"""Square's initial fraction of pixels changed per query (AutoAttack's value for L-inf)."""
SQUARE_RAW = "piecewise on the query count"
"""AutoAttack's Square (5000 queries): p_init halves at queries 10, 50, 200, 500, 1000, 2000,
4000, 6000, 8000 (Andriushchenko et al.'s schedule, ``resc_schedule=False`` in the reference)."""
SQUARE_RESCALED = "piecewise on the query count rescaled to 10000"
"""A standalone Square: the same schedule on ``query / n_queries * 10000`` (the Square paper's
code), so a small budget still reaches the small squares."""


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
        votes: Forward passes whose mean softmax decides a prediction: > 1 scores the smoothed
            (majority-vote) classifier, not the deployed one.
        passes: Independent forward passes per score: a sample's score is the share of passes
            that classify it correctly, so accuracy is the expected accuracy of the single-pass
            (deployed) classifier. 1 for deterministic models.
        defense_params: The model's defense parameters (CAS ``beta`` for ``cas_adaptive``).
    """

    eps: float
    eps_l2: float
    num_classes: int
    seed: int = 0
    batch_size: int = 256
    votes: int = 1
    passes: int = 1
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
        if not isinstance(self.passes, int) or self.passes < 1:
            raise ValueError(f"passes={self.passes!r} must be an int >= 1")


@dataclass
class AttackOutcome:
    """One attack's result on a set of samples.

    Attributes:
        name: Attack name (table key).
        correct: Bool tensor (N,) on the CPU: the model is still right on the sample after the
            attack (always False where it was wrong clean); on a stochastic model scored over
            several passes, right in most of them (``score > 0.5``).
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
        score: Float tensor (N,) on the CPU: share of ``passes`` forward passes that classify the
            sample's final point correctly (scored afresh, not the passes that chose the point);
            None when one pass decides (then ``correct`` is the score).
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
    score: Tensor | None = None

    @property
    def scores(self) -> Tensor:
        """Per-sample expected correctness in [0, 1] (float, CPU)."""
        return self.score if self.score is not None else self.correct.float()

    @property
    def accuracy(self) -> float:
        """Fraction of samples still correctly classified (expected over passes when scored so)."""
        return float(self.scores.mean()) if self.correct.numel() else 0.0

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
