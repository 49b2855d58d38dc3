"""The built-in reproduction specs of KAF and KAP validate, and each digits twin keeps its
cluster spec's protocol (recipe, defense settings, attacks) while scaling the data down."""

from __future__ import annotations

import pytest

from study.spec import BUILTIN_SPECS, load_spec

PAIRS = [("reproduce_kaf", "reproduce_kaf_digits"), ("reproduce_kap", "reproduce_kap_digits")]


@pytest.mark.parametrize("name", [n for pair in PAIRS for n in pair])
def test_builtin_reproduction_spec_validates(name):
    assert name in BUILTIN_SPECS
    spec = load_spec(name)
    assert spec.name == name and spec.include_baseline


@pytest.mark.parametrize(("cluster", "digits"), PAIRS)
def test_digits_twin_keeps_the_protocol(cluster, digits):
    big, small = load_spec(cluster), load_spec(digits)
    assert big.data.name == "cifar10" and small.data.name == "digits"
    assert big.resources.gpu >= 1 and small.resources.gpu == 0
    assert small.defenses == big.defenses
    for field in ("recipe", "optimizer", "schedule", "momentum", "weight_decay", "defense_weight_decay"):
        assert getattr(small.training, field) == getattr(big.training, field), field
    strip = ("eps", "n_samples")  # scaled with the data
    for a, b in ((big.final_eval, small.final_eval), (big.search_eval, small.search_eval)):
        assert [x.name for x in a.attacks] == [x.name for x in b.attacks]
    assert [x.model_dump(exclude=set(strip)) for x in big.final_eval.attacks] == [
        x.model_dump(exclude=set(strip)) for x in small.final_eval.attacks
    ]
    assert small.num_trials * small.training.epochs <= 30  # minutes on a CPU, not hours


def test_kaf_reproduction_is_the_thesis_protocol():
    spec = load_spec("reproduce_kaf")
    # FBF adversarial training at 8/255 (0.03137 = 8/255 rounded), weight decay on layers only.
    assert spec.training.recipe == "fast_at" and abs(spec.training.adv_eps - 8 / 255) < 1e-4
    assert spec.training.defense_weight_decay is False
    # D = 20 with the thesis bandwidth 1/(6 Delta^2); PGD-50 with 10 restarts at 8/255.
    assert spec.defenses["kaf"] == {"dictionary_size": 20, "boundary": 3.0, "bandwidth": "thesis"}
    (attack,) = spec.final_eval.attacks
    assert (attack.name, attack.steps, attack.restarts) == ("pgd", 50, 10)
    assert abs(spec.final_eval.eps - 8 / 255) < 1e-4


def test_kap_reproduction_is_the_paper_protocol():
    spec = load_spec("reproduce_kap")
    assert spec.model.backbone == "resnet18" and spec.training.recipe == "standard"
    assert spec.defenses["kap"] == {"dims": 2, "mode": "avg", "widen": "area"}
    assert [a.name for a in spec.final_eval.attacks] == ["autoattack"]
    assert abs(spec.final_eval.eps - 8 / 255) < 1e-4
