"""MO-ASHA's promotion rule (study.orchestration.mo_asha) against rungs worked out by hand, and its Ray Tune
scheduler (study.orchestration.scheduler) driven without starting Ray.

The rule (Schmucker et al. 2021 with ASHA's stop-or-continue decisions): order a rung by
non-dominated sorting, ties in a front broken by NSGA-II crowding distance (Deb et al. 2002);
a trial goes on when fewer than ceil(n / rf) of the rung's n trials come strictly before it.
"""

from __future__ import annotations

import math
import pickle
from types import SimpleNamespace

import pytest
import yaml

from study.orchestration.mo_asha import Rungs, crowding_distances, milestones, non_dominated_ranks, promoted

MAX2 = ["max", "max"]

# (clean, robust), both maximised:
#   A (0.9, 0.1)  B (0.5, 0.5)  C (0.2, 0.8)  nobody dominates these three -> front 0
#   D (0.4, 0.4)  dominated by B;  E (0.8, 0.05) dominated by A; D, E incomparable -> front 1
#   F (0.1, 0.1)  dominated by D (and A, B) -> front 2
RUNG = {"A": (0.9, 0.1), "B": (0.5, 0.5), "C": (0.2, 0.8), "D": (0.4, 0.4), "E": (0.8, 0.05), "F": (0.1, 0.1)}


def test_non_dominated_ranks_by_hand() -> None:
    assert non_dominated_ranks(list(RUNG.values()), MAX2) == [0, 0, 0, 1, 1, 2]


def test_a_minimised_objective_flips_domination() -> None:
    # (clean max, train_seconds min): (0.9, 50 s) dominates (0.9, 100 s); (0.8, 10 s) trades off.
    assert non_dominated_ranks([(0.9, 100.0), (0.9, 50.0), (0.8, 10.0)], ["max", "min"]) == [1, 0, 0]


def test_crowding_distance_by_hand() -> None:
    # Front 0 = A, B, C. Clean sorted C 0.2 < B 0.5 < A 0.9: ends C, A infinite; B adds
    # (0.9 - 0.2) / (0.9 - 0.2) = 1. Robust sorted A 0.1 < B 0.5 < C 0.8: B adds (0.8 - 0.1) / 0.7 = 1.
    assert crowding_distances([RUNG["A"], RUNG["B"], RUNG["C"]], MAX2) == [math.inf, 2.0, math.inf]
    # Four points on a line x + y = 1: interior ones add their neighbours' gap over the range per
    # objective: P2 (0.3,0.7): (0.6-0)/1 + (1-0.4)/1 = 1.2; P3 (0.6,0.4): (1-0.3)/1 + (0.7-0)/1 = 1.4.
    line = [(0.0, 1.0), (0.3, 0.7), (0.6, 0.4), (1.0, 0.0)]
    assert crowding_distances(line, MAX2) == pytest.approx([math.inf, 1.2, 1.4, math.inf])


def test_promotion_breaks_a_front_by_crowding() -> None:
    # rf 3, n 6: quota ceil(6/3) = 2. A and C (crowding inf) come first, tied; B (front 0,
    # crowding 2) has both ahead of it: B stops although non-dominated, the front's ends go on.
    assert promoted(list(RUNG.values()), MAX2, 3) == [0, 2]


def test_promotion_by_fronts_alone() -> None:
    # rf 2, n 4: quota 2. P and Q form front 0 (both ends, nothing strictly ahead); R is
    # dominated by Q, S by everyone.
    rung = [(0.9, 0.2), (0.6, 0.6), (0.5, 0.5), (0.3, 0.1)]
    assert promoted(rung, MAX2, 2) == [0, 1]
    # rf 2, n 5 (quota 3) with a NaN robust number: though its clean 0.95 is the best, a trial
    # missing a number goes behind every complete one; R (front 1, 2 ahead) now goes on.
    assert promoted([*rung, (0.95, math.nan)], MAX2, 2) == [0, 1, 2]


def test_milestones_lie_strictly_below_the_last_epoch() -> None:
    assert milestones(1, 3, 9) == [1, 3]
    assert milestones(2, 3, 6) == [2]
    assert milestones(3, 3, 9) == [3]
    assert milestones(1, 2, 8) == [1, 2, 4]
    assert milestones(5, 3, 5) == []


def test_rungs_decide_each_trial_once_on_arrival() -> None:
    rungs = Rungs(MAX2, grace=1, reduction_factor=3, last=9)  # rungs at epochs 1 and 3
    # a: first at rung 1, quota ceil(1/3) = 1, nothing ahead -> on.
    assert rungs.decide("a", 1, (0.5, 0.5))
    # b dominates a; n 2, quota 1, nothing ahead -> on.
    assert rungs.decide("b", 1, (0.6, 0.6))
    # c is dominated by a and b: fronts b | a | c; n 3, quota 1, 2 ahead -> stop.
    assert not rungs.decide("c", 1, (0.4, 0.4))
    # d (0.9, 0.1) joins b in front 0, both ends (inf); n 4, quota 2, nothing strictly ahead -> on.
    assert rungs.decide("d", 1, (0.9, 0.1))
    # e (0.55, 0.55): dominated by b only, dominates a: fronts {b, d} | e | a | c; n 5,
    # quota 2, 2 ahead -> stop.
    assert not rungs.decide("e", 1, (0.55, 0.55))
    # Between rungs, and a repeated report at a rung already judged: no new decision.
    assert rungs.decide("a", 2, (0.0, 0.0)) and rungs.decide("a", 1, (0.0, 0.0))
    assert rungs.decide("b", 3, (0.7, 0.7))  # first at rung 3
    assert rungs.stopped == {"c": 1, "e": 1}
    assert {m: sorted(r) for m, r in rungs.recorded.items()} == {1: ["a", "b", "c", "d", "e"], 3: ["b"]}


def test_a_trial_is_judged_only_at_a_rung_epoch() -> None:
    # Trials measure their robust accuracy at the rungs only (training.val_robust_epochs): a report
    # between rungs carries no such number, so it never decides; a trial that first reports past
    # a rung (resumed beyond it) waits for the next rung.
    rungs = Rungs(MAX2, grace=1, reduction_factor=3, last=9)  # rungs at epochs 1 and 3
    assert rungs.decide("a", 1, (0.9, 0.9)) and rungs.decide("b", 1, (0.95, 0.5))  # neither dominates
    assert rungs.decide("c", 2, (0.1, 0.0))  # past rung 1, before rung 3: not judged
    assert rungs.decide("c", 2.5, (0.1, 0.0))
    assert {m: sorted(r) for m, r in rungs.recorded.items()} == {1: ["a", "b"], 3: []}
    assert rungs.decide("a", 3, (0.9, 0.9))
    assert not rungs.decide("c", 3, (0.1, 0.0))  # n 2, quota 1, a ahead -> stop
    assert rungs.stopped == {"c": 3}


def test_rungs_refuse_bad_settings() -> None:
    with pytest.raises(ValueError, match="reduction_factor"):
        Rungs(MAX2, grace=1, reduction_factor=1, last=9)
    with pytest.raises(ValueError, match="min or max"):
        Rungs(["max", "up"], grace=1, reduction_factor=3, last=9)


def test_the_tune_scheduler_applies_the_rule_to_reported_objectives() -> None:
    from ray.tune.schedulers import TrialScheduler

    from study.orchestration.scheduler import MultiObjectiveASHA

    s = MultiObjectiveASHA(
        ["clean_accuracy", "robust_accuracy"], MAX2, time_attr="epoch", grace_period=1, reduction_factor=3, max_t=9
    )
    assert s.set_search_properties(None, None)

    def report(trial: str, epoch: int, clean: float, robust: float, **extra: float) -> str:
        result = {"epoch": epoch, "clean_accuracy": clean, "robust_accuracy": robust, **extra}
        return s.on_trial_result(None, SimpleNamespace(trial_id=trial), result)

    assert report("a", 1, 0.5, 0.5) == TrialScheduler.CONTINUE
    assert report("b", 1, 0.6, 0.6) == TrialScheduler.CONTINUE
    assert report("c", 1, 0.4, 0.4) == TrialScheduler.STOP  # as in the hand-worked rung above
    # A trial's final report is its evaluation: never judged, even when it would lose.
    assert report("d", 1, 0.0, 0.0, final=1) == TrialScheduler.CONTINUE
    assert "d" not in s.rungs.recorded[1]
    # Tune pickles the scheduler with the experiment state: the rungs survive a resume.
    again = pickle.loads(pickle.dumps(s))
    assert again.rungs.recorded == s.rungs.recorded and again.rungs.stopped == {"c": 1}
    assert "MO-ASHA" in s.debug_string()


def test_the_spec_selects_the_scheduler(tmp_path) -> None:
    from ray.tune.schedulers import ASHAScheduler

    from study.config import ConfigError
    from study.orchestration.scheduler import MultiObjectiveASHA, make_scheduler
    from study.spec import parse_spec, trial_config_for

    base = {
        "name": "s",
        "defenses": ["kap"],
        "training": {"epochs": 9, "recipe": "fast_at", "adv_eps": 0.05},
        "search_eval": {"eps": 0.2},
        "storage": str(tmp_path),
    }
    spec = parse_spec(
        {**base, "early_stopping": "mo_asha", "objectives": ["clean_accuracy", "robust_accuracy", "train_seconds"]}
    )
    scheduler = make_scheduler(spec)
    assert isinstance(scheduler, MultiObjectiveASHA)
    # The names the per-epoch reports carry (validation numbers; costs keep their names).
    assert scheduler.metrics == ["val_clean_accuracy", "val_robust_accuracy", "train_seconds"]
    assert scheduler.rungs.directions == ["max", "max", "min"]
    assert sorted(scheduler.rungs.recorded) == [3]  # default grace 3, rf 3, below epoch 9
    # The rungs compare validation robust accuracy at the search epsilon, not each trial's adv_eps.
    point = spec.conditional_space().paper_default_configs()[0]
    assert trial_config_for(spec, point).training.val_eps == 0.2
    # ...measured only at the rungs (grace 3 * 3**k below epoch 9: epoch 3), where they are read.
    assert trial_config_for(spec, point).training.val_robust_epochs == [3]
    grace1 = parse_spec({**base, "early_stopping": {"enabled": True, "grace_epochs": 1}})
    assert trial_config_for(grace1, point).training.val_robust_epochs == [1, 3]
    # Nothing reads them without MO-ASHA (ASHA ranks on clean accuracy): none measured. Epochs the
    # spec lists are measured besides the rungs, and the choice survives the spec's trip as a dump
    # (the trainable rebuilds the spec from one).
    assert trial_config_for(parse_spec({**base, "early_stopping": "asha"}), point).training.val_robust_epochs == []
    off = parse_spec({**base, "early_stopping": "off"})
    assert trial_config_for(off, point).training.val_robust_epochs == []
    assert trial_config_for(parse_spec(off.model_dump(mode="json")), point).training.val_robust_epochs == []
    listed = {**base, "training": {**base["training"], "val_robust_epochs": [5, 9]}}
    assert trial_config_for(parse_spec({**listed, "early_stopping": "mo_asha"}), point).training.val_robust_epochs == [3, 5, 9]
    assert trial_config_for(parse_spec({**listed, "early_stopping": "off"}), point).training.val_robust_epochs == [5, 9]
    assert isinstance(make_scheduler(parse_spec({**base, "early_stopping": "asha"})), ASHAScheduler)
    off = parse_spec({**base, "early_stopping": "off"})
    assert make_scheduler(off) is None and trial_config_for(off, point).training.val_eps is None
    with pytest.raises(ConfigError, match="early_stopping.*allowed: mo_asha, asha, auto, off"):
        parse_spec({**base, "early_stopping": "hyperband"})


# auto's rule, worked out by hand: on from 16 to 64 trials of 6 to 8 epochs (where bench search
# measured it winning: 6 epochs at 16, 32, 48 and 64 trials; it lost at 64 trials of 9 epochs), epochs
# not searched; the first rung at a third of the epochs.
@pytest.mark.parametrize(("trials", "epochs", "searched", "on", "grace", "why"), [
    (16, 6, None, True, 2, "auto: 16 trials of 6 epochs"),
    (64, 6, None, True, 2, "auto: 64 trials of 6 epochs"),
    (48, 8, None, True, 2, "auto: 48 trials of 8 epochs"),
    (65, 6, None, False, 2, "auto: 65 trials, on up to 64 (measured up to there)"),
    (64, 9, None, False, 3, "auto: 9 epochs per trial, on up to 8; bench search measured it losing to TPE alone at "
                            "64 trials of 9 epochs"),
    (32, 100, None, False, 33, "auto: 100 epochs per trial, on up to 8"),
    (200, 10, None, False, 3, "auto: 200 trials, on up to 64"),
    (15, 9, None, False, 3, "auto: 15 trials, on from 16"),
    (24, 5, None, False, 1, "auto: 5 epochs per trial, on from 6"),
    (64, 9, {"epochs": [6, 12]}, False, 3, "auto: epochs are searched"),
])
def test_auto_turns_early_stopping_on_only_where_it_was_measured_to_win(tmp_path, trials, epochs, searched, on,
                                                                         grace, why) -> None:
    from study.orchestration.scheduler import MultiObjectiveASHA, make_scheduler
    from study.spec import parse_spec

    data = {"name": "s", "defenses": ["kap"], "num_trials": trials, "training": {"epochs": epochs},
            "storage": str(tmp_path)}
    if searched:
        data["search_training"] = searched
    spec = parse_spec(data)
    assert spec.early_stopping.enabled == "auto"  # the default, kept as written
    stopping = spec.stopping
    assert (stopping.enabled, stopping.rule, stopping.grace_epochs, stopping.reduction_factor) == (on, "mo_asha", grace, 3)
    assert stopping.why.startswith(why)
    assert isinstance(make_scheduler(spec), MultiObjectiveASHA) if on else make_scheduler(spec) is None
    assert ("early stopping mo_asha: first rung at epoch" in stopping.describe()) == on


def test_written_early_stopping_wins_over_auto_and_auto_decides_again_on_new_trial_counts(tmp_path) -> None:
    from study.spec import load_spec, parse_spec

    base = {"name": "s", "defenses": ["kap"], "training": {"epochs": 6}, "storage": str(tmp_path)}
    off = parse_spec({**base, "num_trials": 64, "early_stopping": "off"}).stopping
    assert not off.enabled and off.why == "set in the spec"
    # Unquoted in YAML, off is a bool: it must mean off too.
    assert not parse_spec(yaml.safe_load("early_stopping: off") | {**base, "num_trials": 64}).stopping.enabled
    on = parse_spec({**base, "num_trials": 4, "early_stopping": {"enabled": True, "grace_epochs": 1}}).stopping
    assert (on.enabled, on.grace_epochs) == (True, 1)
    # What `robust-study run SPEC --trials N` does: re-parse the dumped spec with num_trials changed.
    small = parse_spec({**base, "num_trials": 8, "early_stopping": "auto"})
    assert not small.stopping.enabled
    assert parse_spec({**small.model_dump(mode="json"), "num_trials": 24}).stopping.enabled
    assert not parse_spec({**small.model_dump(mode="json"), "num_trials": 80}).stopping.enabled
    # The demo and the reproductions say off themselves (their first trials are the papers' defaults).
    for name in ("demo", "reproduce_kap", "reproduce_kaf"):
        stopping = load_spec(name).stopping
        assert not stopping.enabled and stopping.why == "set in the spec", name


@pytest.mark.parametrize(("epochs", "early_stopping", "needle"), [
    (6, {"enabled": True, "grace_epochs": 6}, "grace_epochs 6 is not below training.epochs 6, so no trial could be "
                                              "stopped; allowed: 1 to 5 (or early_stopping: off)"),
    (6, {"enabled": "auto", "grace_epochs": 9}, "grace_epochs 9 is not below training.epochs 6"),
    (1, "mo_asha", "early stopping needs at least 2 epochs to stop anything (training.epochs is 1); allowed: "
                   "training.epochs >= 2, or early_stopping: off"),
])
def test_a_first_rung_at_or_after_the_last_epoch_is_one_clear_error(tmp_path, epochs, early_stopping, needle) -> None:
    # milestones(grace, rf, last) keeps rungs strictly below the last epoch: with grace >= epochs
    # there are none, and the early stopping the spec asks for would silently stop nothing.
    from study.config import ConfigError
    from study.spec import parse_spec

    assert milestones(6, 3, 6) == [] and milestones(5, 3, 6) == [5]
    base = {"name": "s", "defenses": ["kap"], "num_trials": 16, "storage": str(tmp_path)}
    with pytest.raises(ConfigError) as error:
        parse_spec({**base, "training": {"epochs": epochs}, "early_stopping": early_stopping})
    assert needle in str(error.value) and "\n" not in str(error.value)
    # The largest rung that can stop a trial is accepted; so are auto's default rung and off.
    assert parse_spec({**base, "training": {"epochs": 6}, "early_stopping": {"enabled": True, "grace_epochs": 5}}
                      ).stopping.grace_epochs == 5
    assert not parse_spec({**base, "training": {"epochs": 1}}).stopping.enabled
    assert not parse_spec({**base, "training": {"epochs": 1}, "early_stopping": "off"}).stopping.enabled
