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

Stochastic models (KAP noise at test time) are scored as deployed: one forward pass decides a
prediction, and a sample's score is the share of ``AttackContext.passes`` independent passes that
get it right, so accuracy is the expected accuracy of the single-pass classifier (Athalye et al.,
"Obfuscated gradients give a false sense of security": evaluate randomised defenses in
expectation). Every sample some pass gets right is attacked; the point an attack keeps is scored
again with fresh passes. ``AttackContext.votes`` > 1 scores the smoothed classifier instead (mean
softmax over the votes). Deterministic models use one pass.

Faithful settings (Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble
of diverse parameter-free attacks"): AutoAttack runs APGD-CE, APGD-T (9 target classes), FAB-T
(9 target classes) and Square (5000 queries), all with 100 iterations. torchattacks'
``AutoAttack`` class leaves APGD/APGD-T/FAB at 10 steps and uses ``n_classes - 1`` targets, so the
components are built here explicitly.
"""

from __future__ import annotations

from study.attacks.context import (
    AA_STEPS,
    AA_TARGETS,
    BOX_TOL,
    CW_KAPPA,
    DEEPFOOL_OVERSHOOT,
    DEEPFOOL_STEPS,
    LINF_TOL,
    PGD_STEPS,
    SQUARE_P_INIT,
    STOCHASTIC_VOTES,
    AttackContext,
    AttackOutcome,
)
from study.attacks.losses import BoxDeepFool, CASAdaptivePGD, CWLinfPGD, EveryAPGD, LossPGD, cw_margin_loss
from study.attacks.run import (
    attack_mode,
    clean_correct,
    clean_score,
    enforce_threat_model,
    expected_correct,
    model_device,
    predict,
    run_attack,
    seeded,
)
from study.attacks.table import ATTACKS, AttackSpec, Stage

__all__ = [
    "SQUARE_P_INIT",
    "LINF_TOL",
    "DEEPFOOL_STEPS",
    "DEEPFOOL_OVERSHOOT",
    "CW_KAPPA",
    "BOX_TOL",
    "AA_TARGETS",
    "AA_STEPS",
    "ATTACKS",
    "AttackContext",
    "AttackOutcome",
    "AttackSpec",
    "BoxDeepFool",
    "CASAdaptivePGD",
    "CWLinfPGD",
    "EveryAPGD",
    "LossPGD",
    "Stage",
    "PGD_STEPS",
    "cw_margin_loss",
    "STOCHASTIC_VOTES",
    "attack_mode",
    "clean_correct",
    "clean_score",
    "enforce_threat_model",
    "expected_correct",
    "model_device",
    "predict",
    "run_attack",
    "seeded",
]
