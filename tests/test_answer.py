"""The demo's answer to "what does each defense buy": per-defense fronts, the short answer at a
clean-accuracy floor, the narrowed training search, and hyperparameter importances.

Expected fronts and answers are worked out by hand from the records written in each test.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from study.results.answer import answer_floor, format_answer, short_answer
from study.results.pareto import defense_fronts
from study.results.plots.defense_fronts import plot_defense_fronts_html, plot_defense_fronts_png

OBJ, DIRS = ["clean_accuracy", "robust_accuracy"], ["max", "max"]


def _rec(number, defense, clean, robust, *, trusted=True, status="completed", final=None, params=None, seconds=10.0):
    r = {"trial_id": f"t{number}", "number": number, "defense": defense, "status": status, "trusted": trusted,
         "val_clean_accuracy": clean, "val_robust_accuracy": robust, "train_seconds": seconds, "flags_failed": [],
         "params": {"defense": defense, **(params or {})}}
    if final is not None:
        r["final"] = final
    return r


RECORDS = [
    _rec(0, "kap", 0.98, 0.10),   # kap front
    _rec(1, "kap", 0.90, 0.40),   # kap front
    _rec(2, "kap", 0.89, 0.35),   # dominated by #1
    _rec(3, "cas", 0.95, 0.50),   # cas front and overall front (dominates kap #1)
    _rec(4, "cas", 0.97, 0.55, trusted=False),  # untrusted: never on a front
    _rec(5, "none", 0.99, 0.00),  # baseline front, overall front (highest clean)
    _rec(6, "kwta", 0.99, 0.30, status="stopped"),  # not completed
]


def test_each_defense_gets_its_own_front():
    # By hand: kap {0, 1} (#2 is dominated by #1); cas {3} (#4 untrusted); none {5}; kwta none completed.
    assert defense_fronts(RECORDS, OBJ, DIRS) == {"cas": [3], "kap": [0, 1], "none": [5]}


def test_short_answer_at_a_floor_picks_the_most_robust_trial_above_it():
    answers = {a.defense: a for a in short_answer(RECORDS, floor=0.90)}
    # kap: #0 (0.98/0.10) and #1 (0.90/0.40) clear 0.90; #1 is more robust.
    assert answers["kap"].number == 1 and answers["kap"].robust_accuracy == 0.40
    assert answers["cas"].number == 3 and answers["none"].number == 5
    assert "kwta" not in answers  # its only trial did not complete
    # At 0.95 kap's only candidate is #0.
    assert {a.defense: a.number for a in short_answer(RECORDS, floor=0.95)}["kap"] == 0
    # At 0.99 only the baseline clears it; kap's line says none reaches the floor.
    high = {a.defense: a for a in short_answer(RECORDS, floor=0.99)}
    assert high["kap"].number is None and high["kap"].trials == 3 and high["none"].number == 5


def test_short_answer_prefers_verified_numbers_and_labels_them():
    records = [
        _rec(0, "kap", 0.95, 0.60),  # search only: a weak attack's number
        _rec(1, "kap", 0.95, 0.50, final={"test_clean_accuracy": 0.94, "test_robust_accuracy": 0.30, "trusted": True}),
        _rec(2, "kap", 0.96, 0.55, final={"test_clean_accuracy": 0.96, "test_robust_accuracy": 0.20, "trusted": False}),
    ]
    (a,) = short_answer(records, floor=0.9)
    # #2's final evaluation failed a gate (its search numbers stand, unverified); #1 is verified.
    assert (a.number, a.verified, a.clean_accuracy, a.robust_accuracy) == (1, True, 0.94, 0.30)
    text = format_answer([a], 0.9, explicit=True)
    assert "robust  30.0% at clean  94.0%" in text and "verified" in text and "trial #1" in text


def test_default_floor_is_five_points_below_the_best_clean_accuracy():
    # Best trusted completed clean accuracy is 0.99 (#5; #6 is stopped), so 0.94.
    assert answer_floor(RECORDS, None) == pytest.approx(0.94)
    assert answer_floor(RECORDS, 0.5) == 0.5
    assert "5 points" in format_answer(short_answer(RECORDS, 0.94), 0.94, explicit=False)


def test_defense_front_plots_are_written(tmp_path: Path):
    png = plot_defense_fronts_png(RECORDS, tmp_path / "f.png", title="t")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = plot_defense_fronts_html(RECORDS, tmp_path / "f.html", title="t").read_text()
    # One legend entry per defense with a completed trial, plus the overall front.
    for name in ("kap", "cas", "undefended (none)", "overall front"):
        assert f'"name":"{name}"' in page
    assert '"name":"kwta"' not in page


# -- the training search narrowed in the spec -----------------------------------------------------


def _demo(**changes):
    from study.spec import load_spec, parse_spec

    data = {**load_spec("demo").model_dump(mode="json"), **changes}
    return parse_spec(data, source="test")


def test_search_training_can_narrow_choices_and_ranges():
    spec = _demo(defenses={"kap": {}, "cas": {"recipe": "fast_at"}},
                 search_training={"recipe": ["standard", "fast_at"], "adv_eps": [0.05, 0.2], "adv_steps": None})
    training = spec.conditional_space().training
    by_name = {p.name: p for p in training.params}
    assert by_name["recipe"].choices == ("standard", "fast_at")
    assert (by_name["adv_eps"].low, by_name["adv_eps"].high) == (0.05, 0.2)
    # adv_steps is only active for pgd_at/trades/mart, none of which is searched: it drops out.
    assert "adv_steps" not in by_name
    assert by_name["adv_eps"].when == ("recipe", ("fast_at",))


@pytest.mark.parametrize("narrowing, words", [
    ({"recipe": ["pgd"]}, "non-empty subset"),
    ({"adv_eps": [0.5, 0.6]}, "0.01 <= low <= high <= 0.3"),
    ({"adv_eps": [0.2]}, "[low, high]"),
    # An epoch count is an integer: 5.5 is not truncated to 5.
    ({"epochs": [5.5, 10]}, "training.epochs: [5.5, 10] must be [low, high] with integers 5 <= low <= high <= 60"),
    ({"nope": None}, "unknown training parameter"),
])
def test_bad_narrowing_is_one_clear_line(narrowing, words):
    from study.config import ConfigError

    with pytest.raises(ConfigError) as err:
        _demo(search_training=narrowing)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_a_list_of_names_still_works_and_default_moves_inside_a_narrowed_range():
    spec = _demo(defenses=["kap"], search_training=["lr", "adv_eps"])
    assert spec.search_training == {"lr": None, "adv_eps": None}
    # Nothing stated in the spec: the space's default adv_eps (0.1) lies outside [0.25, 0.3],
    # so the enqueued default is the low end; a stated value inside the range is kept.
    spec = _demo(defenses=["kap"], training={"recipe": "fast_at"}, search_training={"adv_eps": [0.25, 0.3]})
    assert spec.conditional_space().training.defaults["adv_eps"] == 0.25
    spec = _demo(defenses=["kap"], training={"recipe": "fast_at", "adv_eps": 0.28},
                 search_training={"adv_eps": [0.25, 0.3]})
    assert spec.conditional_space().training.defaults["adv_eps"] == 0.28
    # A stated value outside the range gives way to the space's default (0.1) where that is inside;
    # the recipe, not searched, is fixed to the stated one.
    spec = _demo(defenses=["kap"], training={"recipe": "fast_at", "adv_eps": 0.28},
                 search_training={"adv_eps": [0.05, 0.2]})
    training = spec.conditional_space().training
    assert training.defaults == {"recipe": "fast_at", "adv_eps": 0.1}
    assert training.param("recipe").to_dict() == {"type": "fixed", "name": "recipe", "value": "fast_at"}


# -- importances ---------------------------------------------------------------------------------


def test_importance_finds_the_parameter_that_drives_an_objective(tmp_path: Path):
    import optuna

    from study.orchestration.importance import format_importances, study_importances
    from study.orchestration.searcher import optuna_storage_url

    spec = _demo(storage=str(tmp_path), name="imp")
    spec.study_dir().mkdir(parents=True)
    study = optuna.create_study(study_name="imp", storage=optuna_storage_url(spec.study_dir()),
                                directions=["maximize", "maximize"], sampler=optuna.samplers.RandomSampler(seed=0))
    rng = __import__("random").Random(0)
    for _ in range(40):
        t = study.ask()
        t.suggest_categorical("defense", ["kap", "kwta"])
        a = t.suggest_float("training.adv_eps", 0.0, 0.3)
        lr = t.suggest_float("training.lr", 0.01, 0.1)
        # robust accuracy is driven by adv_eps alone, clean accuracy by the learning rate alone.
        study.tell(t, [0.9 + lr + 0.001 * rng.random(), 2 * a + 0.001 * rng.random()])
    data = study_importances(spec)
    for scope in ("all defenses", "kap", "kwta"):
        robust = data[scope]["val_robust_accuracy"]
        assert max(robust, key=robust.get) == "training.adv_eps", (scope, robust)
        clean = data[scope]["val_clean_accuracy"]
        assert max(clean, key=clean.get) == "training.lr", (scope, clean)
    assert data["kap"]["trials"] + data["kwta"]["trials"] == 40
    assert "adv_eps" in format_importances(data, ["kap"], ["val_robust_accuracy"])


def test_importance_counts_the_recipe_cas_sets_for_itself(tmp_path: Path):
    # CAS is never asked for a recipe (it sets training.recipe from cas.recipe, fast_at in the demo)
    # while every other defense searches it. Robust accuracy here follows the recipe the trial ran
    # with and nothing else, so by hand the recipe explains all of its variance and the defense none.
    # fANOVA compares only parameters every trial has: counting CAS's recipe as unknown, a single
    # CAS trial used to leave the defense as the only parameter, with importance 1.0.
    import optuna

    from study.orchestration.importance import study_importances
    from study.orchestration.searcher import optuna_storage_url

    spec = _demo(storage=str(tmp_path), name="imp_cas")
    space = spec.conditional_space()
    spec.study_dir().mkdir(parents=True)
    study = optuna.create_study(study_name="imp_cas", storage=optuna_storage_url(spec.study_dir()),
                                directions=["maximize", "maximize"], sampler=optuna.samplers.RandomSampler(seed=1))
    rng = __import__("random").Random(1)
    ran = []
    for _ in range(40):
        t = study.ask()
        params = space.suggest(t)
        ran.append(params)
        robust = 0.4 if params["training.recipe"] == "fast_at" else 0.0
        study.tell(t, [0.95 + 0.001 * rng.random(), robust + 0.001 * rng.random()])
    cas = [p for p in ran if p["defense"] == "cas"]
    assert cas and all(p["training.recipe"] == "fast_at" for p in cas)
    assert not any("training.recipe" in ft.params for ft in study.trials if ft.params["defense"] == "cas")
    robust = study_importances(spec)["all defenses"]["val_robust_accuracy"]
    assert robust["training.recipe"] >= 0.9 and robust["defense"] <= 0.1, robust


def test_printed_answer_says_what_mattered_over_the_whole_study_first(tmp_path: Path, capsys):
    # The demo's lesson lives in the overall scope: with one or three trials per defense no defense
    # gets importances of its own, but over all trials the recipe drives robust accuracy.
    import json
    from types import SimpleNamespace

    from study.results.report import _print_answer

    data = {  # the shape study_importances writes (importances.json)
        "all defenses": {"trials": 9, "val_clean_accuracy": {"defense": 0.77, "training.recipe": 0.23},
                         "val_robust_accuracy": {"training.recipe": 0.94, "defense": 0.06}},
        "kap": {"trials": 3}, "cas": {"trials": 1}, "kwta": {"trials": 2},
    }
    (tmp_path / "importances.json").write_text(json.dumps(data))
    front = [r for r in RECORDS if r["number"] in (3, 5)]
    outcome = SimpleNamespace(records=RECORDS, study_dir=tmp_path, front=front, final_front=None)
    _print_answer(outcome, SimpleNamespace(clean_floor=None, objectives=OBJ))
    lines = capsys.readouterr().out.splitlines()
    start = lines.index("Hyperparameter importance (fANOVA on the search's validation numbers; rough with few trials)")
    assert [line.split() for line in lines[start + 1:]] == [
        ["all", "defenses", "val_clean_accuracy", "defense", "0.77,", "recipe", "0.23", "(9", "trials)"],
        ["all", "defenses", "val_robust_accuracy", "recipe", "0.94,", "defense", "0.06", "(9", "trials)"],
        ["cas", "1", "completed", "trial(s):", "too", "few", "(need", "4)"],  # on the front: cas and none
    ]


def test_paper_defaults_per_recipe_enqueue_each_defense_with_each_recipe():
    spec = _demo()  # the demo: recipes [standard, fast_at], training.adv_eps 0.2 stated in the spec
    firsts = [(c["defense"], c["training.recipe"], c.get("training.adv_eps"))
              for c in spec.conditional_space().paper_default_configs()]
    plain = ["none", "kap", "kwta", "kaf", "topkconv", "dynamic_k"]
    # By hand: every defense but CAS at standard (no eps), then at fast_at with the spec's eps 0.2;
    # CAS decides its own recipe (fast_at) and appears once.
    assert firsts == ([(d, "standard", None) for d in plain] + [(d, "fast_at", 0.2) for d in plain]
                      + [("cas", "fast_at", 0.2)])
    assert len(firsts) <= spec.num_trials
    once = _demo(paper_defaults_per_recipe=False).conditional_space().paper_default_configs()
    assert [c["training.recipe"] for c in once] == ["standard"] * 6 + ["fast_at"]
