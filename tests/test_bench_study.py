"""The study-level benchmarks (issue 6) run end to end at a small size and report real numbers."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from study.bench.overhead import bench_overhead, format_overhead, overhead_spec, sample_params
from study.bench.search import (
    bench_search,
    core_seconds_to_reach,
    core_seconds_verdict,
    format_search,
    search_spec,
    strategy_parts,
    trials_verdict,
)


def test_overhead_configs_are_fixed_valid_and_seeded(tmp_path: Path) -> None:
    spec = overhead_spec(tmp_path, num_trials=6)
    first, again = sample_params(spec, 6), sample_params(spec, 6)
    assert first == again  # the same trials on both sides, run after run
    space = spec.conditional_space()
    for params in first:
        space.validate(params)  # raises on anything outside the space
    assert not spec.verify  # the loop has no verification step, so the study has none either


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_overhead_bench_runs_the_same_trials_on_every_side(tmp_path: Path) -> None:
    m = bench_overhead(num_trials=3, concurrency=2, epochs=1, workdir=tmp_path)
    text = format_overhead(m)
    # Every configuration the 1-thread loop ran was run by the pool and the study too (matched by
    # its parameters), and with one torch thread on every side the numbers are the same. (The
    # default-thread loop is not compared: the thread count changes a 1-epoch training run's
    # summation order and so its result, measured: one CAS trial 67.0 % vs 31.5 % clean.)
    assert m["matched_trials"] == 3 and m["pool_matched_trials"] == 3, text
    assert m["max_result_difference"] == 0.0 and m["pool_max_result_difference"] == 0.0, text
    for side in ("wall_loop_default_s", "wall_loop_s", "wall_pool_s", "wall_study_s"):
        assert m[side] > 0, side
    assert m["ratio"] == pytest.approx(m["wall_study_s"] / m["wall_loop_s"])
    assert m["study_vs_pool"] == pytest.approx(m["wall_study_s"] / m["wall_pool_s"])
    # The study's wall time splits into start-up, trial phase and wind-down, each measured.
    assert m["startup_s"] > 0 and m["trial_phase_s"] > 0 and m["winddown_s"] >= 0, text
    assert m["startup_s"] + m["trial_phase_s"] + m["winddown_s"] == pytest.approx(m["wall_study_s"]), text
    # Per trial vs fixed: every second inside a trainable beyond its work is either a slot's first
    # trial (imports, data) or a later trial's set-up; handover gaps are part of the idle time.
    assert m["first_setup_s"] + m["later_setup_s"] == pytest.approx(m["in_trial_other_s"]), text
    # 3 trials on 2 slots: 1 follows another on its slot (2 if one slot ran alone meanwhile).
    assert m["later_trials"] in (1, 2) and 0 <= m["gap_s"] <= m["idle_worker_s"] + 1e-6, text
    assert 0 < m["report_s"] < m["study_trial_s"], text  # reports run inside the training clock
    slowdown = (m["study_trial_s"] - m["report_s"] - m["pool_trial_s"]) / 3
    assert m["per_trial_overhead_s"] == pytest.approx(
        (m["gap_s"] + m["later_setup_s"]) / m["later_trials"] + m["report_s"] / 3 + slowdown)
    assert "what one more trial adds" in text and "fixed cost: start-up" in text
    assert "wall(b)/wall(p)" in text and "(p)  process pool" in text
    # The verdict follows the measured ratio against the stated target.
    verdict = "ok" if m["study_vs_pool"] <= 1.10 else "MISSED"
    assert f"wall(b)/wall(p): {m['study_vs_pool']:.2f}   target <= 1.1 {verdict}" in text


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_search_bench_reports_hypervolume_curves() -> None:
    # One epoch instead of three: the machinery is under test here, not the samplers.
    m = bench_search(seeds=2, max_trials=3, samplers=("tpe", "random"), workers=1, epochs=1)
    for run in m["runs"]:
        history = run["history"]
        assert len(history) == 3
        assert all(b >= a for a, b in zip(history, history[1:]))  # a front only grows
        assert all(0.0 <= h <= 1.0 for h in history)
    assert set(m["table"]) == {"tpe", "random"} and m["checkpoints"] == [3]
    assert m["goal"] == pytest.approx(sum(r["history"][-1] for r in m["runs"] if r["sampler"] == "random") / 2)
    reach = m["trials_to_reach_random"]["random"]
    assert reach is not None and 1 <= reach <= 3
    assert not math.isnan(m["table"]["tpe"][3][0])
    assert "trials to reach random@3" in format_search(m)


def test_search_space_is_the_documented_cheap_one() -> None:
    spec = search_spec("nsga2", 1)
    assert spec.sampler.name == "nsga2" and spec.sampler.seed == 1
    assert set(spec.defenses) == {"kap", "cas"} and spec.include_baseline
    assert spec.search_training == {"lr": None, "adv_eps": None} and spec.training.recipe == "fast_at"


def test_core_seconds_verdict_names_the_target_and_the_fastest_strategy() -> None:
    # 2026-12-06's run at 64 trials: random 62 % of its own (the seeds' averaging), TPE 30 %,
    # TPE + MO-ASHA not reached: the target (25 %) is missed and TPE is the fastest contender.
    m = {"max_trials": 64, "core_seconds_ratio": {"random": 0.62, "tpe": 0.30, "tpe+mo_asha": None}}
    assert core_seconds_verdict(m) == ("target: tpe+mo_asha within 25% of random@64's core-s: MISSED (not reached); "
                                       "fewest core-s to random@64: tpe (30.0%)")
    m["core_seconds_ratio"] = {"random": 0.88, "tpe": 0.71, "tpe+mo_asha": 0.25}
    assert core_seconds_verdict(m).startswith("target: tpe+mo_asha within 25% of random@64's core-s: ok (25.0%)")
    assert core_seconds_verdict(m).endswith("fewest core-s to random@64: tpe+mo_asha (25.0%)")
    # 2026-12-06's 64 x 6 run: 72 of 285 core-s is 25.3 %, a miss that must not print as 25 %.
    m["core_seconds_ratio"] = {"random": 0.88, "tpe": 0.30, "tpe+mo_asha": 72 / 285}
    assert "MISSED (25.3%)" in core_seconds_verdict(m)
    m["core_seconds_ratio"] = {"random": 0.9, "tpe": None, "tpe+mo_asha": 0.26}
    assert core_seconds_verdict(m) == ("target: tpe+mo_asha within 25% of random@64's core-s: MISSED (26.0%); "
                                       "fewest core-s to random@64: tpe+mo_asha (26.0%)")
    assert core_seconds_verdict({"max_trials": 3, "core_seconds_ratio": {"random": 1.0, "tpe": 0.5}}) is None


def test_core_seconds_to_reach_reads_the_mean_curve_over_seeds() -> None:
    # Two searches' hypervolume after each trial and the core-seconds spent by then:
    #   r1: 10 s -> 0.1, 20 s -> 0.3, 30 s -> 0.5;  r2: 5 s -> 0.2, 25 s -> 0.4.
    # Mean at each breakpoint (a search counts 0 before its first trial):
    #   5: (0 + 0.2)/2 = 0.1; 10: 0.15; 20: (0.3 + 0.2)/2 = 0.25; 25: (0.3 + 0.4)/2 = 0.35; 30: 0.45.
    runs = [{"core_seconds": [10.0, 20.0, 30.0], "history": [0.1, 0.3, 0.5]},
            {"core_seconds": [5.0, 25.0], "history": [0.2, 0.4]}]
    assert core_seconds_to_reach(runs, 0.35) == 25.0
    assert core_seconds_to_reach(runs, 0.1) == 5.0
    assert core_seconds_to_reach(runs, 0.5) is None  # 0.45 at best


def test_search_strategies_name_a_sampler_and_an_early_stopping_rule() -> None:
    assert strategy_parts("tpe+mo_asha") == ("tpe", "mo_asha") and strategy_parts("random") == ("random", None)
    with pytest.raises(ValueError, match="allowed: random, tpe, tpe\\+mo_asha"):
        strategy_parts("tpe+hyperband")
    spec = search_spec("tpe", 0, epochs=6, early_stopping="mo_asha")
    assert spec.stopping.enabled and spec.stopping.grace_epochs == 2  # a third of the epochs
    # A strategy without early stopping runs none, whatever the spec's auto would decide.
    assert not search_spec("tpe", 0, epochs=9).stopping.enabled


def test_search_bench_first_rung_is_an_option_and_named_in_the_output() -> None:
    from study import cli

    parser = cli.build_parser()
    assert parser.parse_args(["bench", "search", "--grace", "4"]).grace == 4
    assert parser.parse_args(["bench", "search"]).grace is None  # a third of the epochs, as a study's
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["bench", "search", "--grace", "0"])
    assert exit_info.value.code == 2
    # The summary of a run with an early-stopping row says where its first rung was.
    strategies = ("random", "tpe", "tpe+mo_asha")
    m = {"seeds": 3, "max_trials": 32, "epochs": 6, "grace": 4, "checkpoints": [32], "goal": 0.42,
         "table": {s: {32: (0.5, 0.01)} for s in strategies}, "trials_to_reach_random": dict.fromkeys(strategies, 16),
         "unit_core_seconds": 161.0, "core_seconds_to_reach_random": dict.fromkeys(strategies, 91.0),
         "core_seconds_ratio": dict.fromkeys(strategies, 0.56), "trials_run": dict.fromkeys(strategies, 32.0),
         "stopped": dict.fromkeys(strategies, 0), "untrusted": dict.fromkeys(strategies, 0),
         "seconds": dict.fromkeys(strategies, 60.0)}
    assert "early stopping's first rung at epoch 4 of 6" in format_search(m).splitlines()
    without = {**m, "table": {s: m["table"][s] for s in strategies[:2]}}
    assert "first rung" not in format_search(without)
    # A rung at or past the last epoch is refused before any search runs (no pool is started).
    from study.config import ConfigError

    with pytest.raises(ConfigError, match="grace_epochs 7 is not below training.epochs 6"):
        bench_search(seeds=1, max_trials=2, epochs=6, grace=7, workers=1)


def test_trials_verdict_holds_the_default_sampler_to_half_of_randoms_trials() -> None:
    # Issue 6's target: TPE reaches random search's 64-trial hypervolume in at most 32 trials.
    # 2026-12-06 at 64 trials: 14 (ok); at 32 trials the limit is 16.
    assert trials_verdict({"max_trials": 64, "trials_to_reach_random": {"random": 51, "tpe": 14}}) == (
        "target: tpe reaches random@64's hypervolume within 32 trials: ok (14)")
    assert trials_verdict({"max_trials": 64, "trials_to_reach_random": {"random": 51, "tpe": 33}}).endswith("MISSED (33)")
    assert trials_verdict({"max_trials": 32, "trials_to_reach_random": {"random": 28, "tpe": 16}}).endswith(
        "within 16 trials: ok (16)")
    assert trials_verdict({"max_trials": 64, "trials_to_reach_random": {"random": 64, "tpe": None}}).endswith(
        "MISSED (not reached)")
    assert trials_verdict({"max_trials": 64, "trials_to_reach_random": {"random": 64, "nsga2": 20}}) is None
