"""Facts derived once: which gates failed, trust, and the CAS beta shared by training and attack."""

from __future__ import annotations

import pytest

from defenses import build_model
from study.attacks import ATTACKS, AttackContext
from study.config import AttackConfig, parse_trial_config
from study.evaluation.checks import Flag, trusted
from study.results.records import failed_gates, is_trusted
from study.training.recipes import StepContext
from study.trial import runtime_defense_params

FLAGS = [
    {"id": "R1", "gate": True, "passed": True},
    {"id": "R7", "gate": False, "passed": False},  # a warning never decides trust
    {"id": "R8", "gate": True, "passed": False},
    {"id": "R11", "gate": True, "passed": False},
]


def test_failed_gates_lists_failed_gates_only_in_order() -> None:
    assert failed_gates(FLAGS) == ["R8", "R11"]
    assert not is_trusted(FLAGS)
    assert failed_gates(FLAGS[:2]) == [] and is_trusted(FLAGS[:2])
    assert failed_gates([]) == [] and is_trusted([])


def test_checks_trusted_agrees_with_the_record_rule_on_flag_objects() -> None:
    objects = [Flag(f["id"], "x", f["passed"], f["gate"], {}, "") for f in FLAGS]
    assert trusted(objects) is False
    assert trusted(objects[:2]) is True


@pytest.mark.parametrize(("defense_beta", "training_beta", "expected"), [
    (3.0, None, 3.0),   # the defense's beta
    (3.0, 7.5, 7.5),    # training.cas_beta overrides it
    (None, None, 2.0),  # neither: the paper's default
])
def test_one_cas_beta_trains_the_model_and_drives_its_adaptive_attack(defense_beta, training_beta, expected) -> None:
    params = {"placement": "last"} | ({"beta": defense_beta} if defense_beta is not None else {})
    training = {"recipe": "pgd_at"} | ({"cas_beta": training_beta} if training_beta is not None else {})
    config = parse_trial_config({"model": {"defense": "cas", "defense_params": params}, "training": training})
    resolved = runtime_defense_params(config)
    model = build_model("small_cnn", num_classes=10, in_channels=1, defense="cas", defense_params=params)
    train_beta = StepContext.for_model(model, config.training, resolved).cas_beta
    ctx = AttackContext(eps=0.1, eps_l2=1.0, num_classes=10, defense_params=resolved)
    attack_beta = ATTACKS["cas_adaptive"].resolve(AttackConfig(name="cas_adaptive"), ctx)["beta"]
    assert train_beta == attack_beta == expected
