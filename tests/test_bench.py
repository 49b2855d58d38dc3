"""The layer benchmark runs end to end at a tiny size and reports sane ratios."""

from __future__ import annotations

import math

import pytest
import torch

from study.bench.layers import bench_layers, format_table, network_rows, targets


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    # One thread: at this toy size OpenMP synchronisation, not compute, would dominate, and it
    # stalls badly when other processes share the two cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return bench_layers(batch=2, device="cpu", repeats=1, image=8, width=0.25)
    finally:
        torch.set_num_threads(threads)


def test_a_row_per_defense_with_finite_ratios(rows: list[dict]) -> None:
    network = [r for r in rows if r["kind"] == "network"]
    assert [r["name"] for r in network] == [r.name for r in network_rows()]
    assert {"kap", "kwta", "kaf", "topkconv", "dynamic_k", "cas", "noise"} <= {r["name"] for r in network}
    for row in rows:
        assert row["time_s"] > 0 and row["act_bytes"] > 0
        assert math.isfinite(row["time_ratio"]) and math.isfinite(row["mem_ratio"])
        assert row["mem_kind"] == "saved_activations" and row["peak_bytes"] is None
    baseline = network[0]
    assert baseline["name"] == "none" and baseline["time_ratio"] == 1.0 == baseline["mem_ratio"]


def test_targets_are_attached_and_judged(rows: list[dict]) -> None:
    for row in rows:
        if row["kind"] == "network" and row["name"] in targets():
            time_target, mem_target = targets()[row["name"]]
            assert row["time_target"] == time_target and row["mem_target"] == mem_target
            assert row["time_ok"] == (row["time_ratio"] <= time_target)
        else:
            assert row["time_ok"] is None


def test_layer_rows_compare_naive_and_lean(rows: list[dict]) -> None:
    layers = {r["name"]: r for r in rows if r["kind"] == "layer"}
    assert set(layers) == {"conv2d", "TopKConv2d lean", "TopKConv2d naive", "relu", "KernelActivation lean", "KernelActivation naive"}
    # The naive forms keep (N, C_out, C_in, H, W) resp. (N, C, H, W, D) for backward.
    assert layers["TopKConv2d naive"]["act_bytes"] > 5 * layers["TopKConv2d lean"]["act_bytes"]
    assert layers["KernelActivation naive"]["act_bytes"] > 5 * layers["KernelActivation lean"]["act_bytes"]


def test_format_table(rows: list[dict]) -> None:
    table = format_table(rows)
    lines = table.splitlines()
    assert lines[0].startswith("| kind | row |")
    assert len([ln for ln in lines if ln.startswith("| network")]) == len(network_rows())
    assert "pass" in table or "FAIL" in table
    assert "saved for backward" in table


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="batch=0"):
        bench_layers(batch=0)


def test_bench_defenses_labels_say_what_trained(monkeypatch) -> None:
    """`bench defenses --defense cas --recipe pgd_at`: the row trains CAS with PGD-AT (the demo spec
    fixes CAS to fast AT) and its label and recipe column say so; unknown names are refused first."""
    from types import SimpleNamespace

    import study.trial
    from study.bench.defenses import UnknownDefense, defense_rows

    ran = []

    def fake_run_trial(config):
        ran.append(config)
        return SimpleNamespace(attacks=[], status="completed", clean_accuracy=1.0, robust_accuracy=0.0,
                               protocol=None, flags=[], trusted=True, reached={})

    monkeypatch.setattr(study.trial, "run_trial", fake_run_trial)
    rows = defense_rows(epochs=1, progress=False, only="cas", recipe="pgd_at")
    assert [c.training.recipe for c in ran] == ["pgd_at"] and [c.model.defense for c in ran] == ["cas"]
    assert rows[0]["recipe"] == "pgd_at" and rows[0]["params"]["recipe"] == "pgd_at"
    assert rows[0]["params"]["adv_steps"] == ran[0].training.adv_steps
    assert rows[0]["params"]["adv_eps"] == ran[0].training.adv_eps
    ran.clear()
    # KAF has a standard and a fast-AT row; both become the same fast-AT trial, trained once.
    rows = defense_rows(epochs=1, progress=False, only="kaf", recipe="fast_at")
    assert len(ran) == len(rows) == 1 and ran[0].training.recipe == "fast_at"
    assert rows[0]["params"]["adv_eps"] == ran[0].training.adv_eps
    ran.clear()
    rows = defense_rows(epochs=1, progress=False, only="none")
    assert [c.training.recipe for c in ran] == [r["params"]["recipe"] for r in rows] == ["standard", "fast_at"]
    # The gamma a k-WTA schedule reached is printed beside the target in the label.
    from study.bench.defenses import format_rows

    row = {**rows[0], "defense": "kwta", "params": {"gamma": 0.1}, "reached": {"kwta_gamma_reached": 0.125},
           "extra": {}, "seconds": 1.0}
    assert "kwta (gamma=0.1, kwta_gamma_reached=0.125)" in format_rows([row])
    for bad in ({"only": "nope"}, {"only": "cas", "recipe": "nope"}):
        with pytest.raises(UnknownDefense):
            defense_rows(progress=False, **bad)
    assert len(ran) == 2  # nothing ran for the refused ones


def test_recipes_that_label_a_budget_follow_the_training_space() -> None:
    """Which rows state adv_eps / adv_steps comes from the training space's ``when`` relations."""
    from search_spaces import TRAINING_SPACE
    from study.bench.defenses import recipes_using

    for param in ("adv_eps", "adv_steps"):
        when = TRAINING_SPACE.param(param).when
        assert when is not None and when[0] == "recipe"
        assert recipes_using(param) == set(when[1])
    # Today's recipes, by hand: fast AT takes one FGSM step, so it has an eps but no step count.
    assert recipes_using("adv_eps") == {"fast_at", "pgd_at", "trades", "mart"}
    assert recipes_using("adv_steps") == {"pgd_at", "trades", "mart"}
    assert recipes_using("lr") == set(TRAINING_SPACE.param("recipe").choices)  # no relation: every recipe


def test_a_recipe_added_to_the_space_is_labelled_with_its_budget(monkeypatch) -> None:
    import dataclasses

    import study.bench.defenses
    from search_spaces import TRAINING_SPACE, Categorical

    def with_recipe(p):
        if p.name == "recipe":
            return dataclasses.replace(p, choices=(*p.choices, "new_at"))
        if p.name == "adv_eps":
            return dataclasses.replace(p, when=("recipe", (*p.when[1], "new_at")))
        return p

    space = dataclasses.replace(TRAINING_SPACE, params=tuple(with_recipe(p) for p in TRAINING_SPACE.params))
    assert isinstance(space.param("recipe"), Categorical)
    monkeypatch.setattr(study.bench.defenses, "TRAINING_SPACE", space)
    assert "new_at" in study.bench.defenses.recipes_using("adv_eps")
    assert "new_at" not in study.bench.defenses.recipes_using("adv_steps")


def _no_training(monkeypatch) -> list:
    """Replace run_trial with a stub that records the configs it was given."""
    from types import SimpleNamespace

    import study.trial

    ran: list = []

    def fake_run_trial(config):
        ran.append(config)
        return SimpleNamespace(
            attacks=[],
            status="completed",
            clean_accuracy=1.0,
            robust_accuracy=0.0,
            protocol=None,
            flags=[],
            trusted=True,
            reached={},
        )

    monkeypatch.setattr(study.trial, "run_trial", fake_run_trial)
    return ran


def test_bench_defenses_labels_state_the_budget_of_the_recipe_that_ran(monkeypatch) -> None:
    from study.bench.defenses import defense_rows

    _no_training(monkeypatch)
    standard, fast_at = defense_rows(epochs=1, progress=False, only="none")
    assert standard["recipe"] == "standard" and not {"adv_eps", "adv_steps"} & set(standard["params"])
    assert fast_at["recipe"] == "fast_at" and "adv_eps" in fast_at["params"] and "adv_steps" not in fast_at["params"]
    (trades,) = defense_rows(epochs=1, progress=False, only="none", recipe="trades")
    assert {"adv_eps", "adv_steps"} <= set(trades["params"])


@pytest.mark.parametrize("recipe", [None, "pgd_at"])
def test_points_that_build_the_same_trial_give_one_row(monkeypatch, recipe: str | None) -> None:
    """Equal points, and points that differ only in stating the spec's own adv_eps, are one trial,
    trained once; a different adv_eps is a row of its own."""
    from search_spaces import ConditionalSpace
    from study.bench.defenses import defense_rows
    from study.spec import load_spec

    spec_eps = load_spec("demo").training.adv_eps
    other_eps = spec_eps / 2
    points = [
        {"defense": "none", "training.recipe": "fast_at"},
        {"defense": "none", "training.recipe": "fast_at"},
        {"defense": "none", "training.recipe": "fast_at", "training.adv_eps": spec_eps},
        {"defense": "none", "training.recipe": "fast_at", "training.adv_eps": other_eps},
    ]
    monkeypatch.setattr(ConditionalSpace, "paper_default_configs", lambda self: [dict(p) for p in points])
    ran = _no_training(monkeypatch)
    rows = defense_rows(epochs=1, progress=False, recipe=recipe)
    assert len(rows) == len(ran) == 2
    assert [c.training.adv_eps for c in ran] == [spec_eps, other_eps]
    assert [r["params"]["adv_eps"] for r in rows] == [spec_eps, other_eps]
    assert [r["recipe"] for r in rows] == [c.training.recipe for c in ran] == [recipe or "fast_at"] * 2
