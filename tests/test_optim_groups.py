"""Weight decay only on the network's layers when asked (the KAF thesis' recipe).

The exempt parameters are declared by the defense's registration (KAF: alpha, dictionary,
bandwidth); the training loop's optimiser gets them in a group with weight decay 0.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import study.training.loop as train_module
from defenses import build_model
from study.config import TrainingConfig
from study.training.loop import OPTIMIZERS
from study.training.optim_groups import parameter_groups

KAF_FREE = {"trainable_dictionary": True, "per_channel": True, "dictionary_size": 5}


def _kaf_model() -> nn.Module:
    torch.manual_seed(0)
    return build_model("small_cnn", num_classes=10, in_channels=1, defense="kaf", defense_params=KAF_FREE)


def _by_name(model: nn.Module, suffixes: tuple[str, ...]) -> set[int]:
    return {id(p) for name, p in model.named_parameters() if name.rsplit(".", 1)[-1] in suffixes}


def test_thesis_recipe_decays_only_the_layers_by_identity():
    model = _kaf_model()
    cfg = TrainingConfig(defense_weight_decay=False, weight_decay=0.1)
    opt = OPTIMIZERS["sgd"](parameter_groups(model, cfg, "kaf"), cfg)
    decayed, exempt = opt.param_groups
    kaf_ids = _by_name(model, ("alpha", "dictionary", "raw_gamma"))
    layer_ids = _by_name(model, ("weight", "bias"))  # convs, BatchNorms, the classifier
    # small_cnn: three conv blocks, each followed by one KAF with 3 parameter tensors (alpha,
    # dictionary, raw_gamma); the head is a single Linear without activation: 9 exempt tensors.
    assert len(kaf_ids) == 9
    assert {id(p) for p in exempt["params"]} == kaf_ids and exempt["weight_decay"] == 0.0
    assert {id(p) for p in decayed["params"]} == layer_ids and decayed["weight_decay"] == 0.1
    assert kaf_ids | layer_ids == {id(p) for p in model.parameters()}


def test_a_step_with_zero_gradients_shrinks_only_the_decayed_parameters():
    # SGD without momentum, lr 1, wd 0.1, gradient 0: p <- p - lr * wd * p = 0.9 p (decayed),
    # p unchanged (exempt).
    model = _kaf_model()
    cfg = TrainingConfig(defense_weight_decay=False, weight_decay=0.1, lr=1.0, momentum=0.0)
    opt = OPTIMIZERS["sgd"](parameter_groups(model, cfg, "kaf"), cfg)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    exempt = ("alpha", "dictionary", "raw_gamma")
    for name, p in model.named_parameters():
        factor = 1.0 if name.rsplit(".", 1)[-1] in exempt else 0.9
        torch.testing.assert_close(p.detach(), factor * before[name], msg=name)


@pytest.mark.parametrize(("defense", "params", "flag"), [("kaf", KAF_FREE, True), ("none", {}, False)])
def test_everything_is_decayed_otherwise(defense, params, flag):
    model = build_model("small_cnn", num_classes=10, in_channels=1, defense=defense, defense_params=params)
    cfg = TrainingConfig(defense_weight_decay=flag)
    opt = OPTIMIZERS["sgd"](parameter_groups(model, cfg, defense), cfg)
    assert len(opt.param_groups) == 1
    assert {id(p) for p in opt.param_groups[0]["params"]} == {id(p) for p in model.parameters()}


def test_a_defense_without_a_declaration_is_decayed_whole():
    model = build_model("small_cnn", num_classes=10, in_channels=1, defense="kwta", defense_params={})
    cfg = TrainingConfig(defense_weight_decay=False)
    groups = list(parameter_groups(model, cfg, "kwta"))
    assert {id(p) for p in groups} == {id(p) for p in model.parameters()}


def test_fit_builds_its_optimiser_from_the_groups(monkeypatch):
    seen = {}

    class Stop(Exception):
        pass

    def capture(params, cfg):
        seen["groups"] = list(params)
        raise Stop

    monkeypatch.setitem(train_module.OPTIMIZERS, "sgd", capture)
    model = _kaf_model()
    cfg = TrainingConfig(defense_weight_decay=False)
    with pytest.raises(Stop):
        train_module.fit(
            model,
            None,
            cfg,
            defense="kaf",
            defense_params=KAF_FREE,  # type: ignore[arg-type]
            device=torch.device("cpu"),
            seed=0,
        )
    exempt = seen["groups"][1]
    assert exempt["weight_decay"] == 0.0
    assert {id(p) for p in exempt["params"]} == _by_name(model, ("alpha", "dictionary", "raw_gamma"))
