"""bench scale: its summaries on hand-made inputs, its synthetic trial, and a short real run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from study import cli
from study.bench import scale
from tests.audits import audit_facts as _audit


def test_windows_are_the_mean_interval_between_tells_over_the_window() -> None:
    # 21 tells: 1 s apart for the first 10 intervals, 3 s apart for the last 10.
    times = [float(i) for i in range(11)] + [10.0 + 3 * k for k in range(1, 11)]
    windows = scale.window_rates(times, size=5, points=1)
    # First window: tells 1..6 -> (5 - 0) / 5; last: tells 16..21 -> (t[20] - t[15]) / 5 = (40 - 25) / 5.
    assert windows[0] == {"from": 1, "to": 6, "seconds_per_trial": 1.0}
    assert windows[-1] == {"from": 16, "to": 21, "seconds_per_trial": 3.0}
    # The middle window starts at 1 + round(1 * (21 - 1 - 5) / 2) = 9: intervals t[8]..t[13] = 8, 9, 10, 13, 16, 19.
    assert windows[1] == {"from": 9, "to": 14, "seconds_per_trial": (19.0 - 8.0) / 5}
    assert scale.window_rates(times[:5], size=5) == []


def test_memory_summary_reports_the_second_half_slope_per_thousand_trials() -> None:
    mib = 2**20
    # 100 MB flat for 10 tells, then +2 MB per tell for the next 10.
    rss = [100 * mib] * 10 + [(100 + 2 * k) * mib for k in range(1, 11)]
    m = scale.memory_summary(rss, size=5)
    assert m["first_mb"] == 100 and m["after_window_mb"] == 100 and m["end_mb"] == 120 and m["peak_mb"] == 120
    assert m["middle_mb"] == 102  # rss[10]
    assert m["second_half_mb_per_1000"] == pytest.approx(2000.0)  # 2 MB per tell over tells 10..19


def test_sampler_buckets_and_the_onset_of_growth() -> None:
    calls = [(0.0, 0.01), (5.0, 0.03), (10.0, 0.10), (20.0, 0.10), (60.0, 0.15), (120.0, 0.30), (130.0, 0.50)]
    buckets = scale.sampler_buckets(calls, [0, 10, 50, 100, 200])
    assert [(b["from"], b["n"]) for b in buckets] == [(0, 2), (10, 2), (50, 1), (100, 2)]
    assert buckets[0]["mean_s"] == pytest.approx(0.02) and buckets[3]["max_s"] == 0.5
    assert buckets[3]["mean_s"] == pytest.approx(0.4)
    # Baseline 0.10 s (10-49): 50-99 is 1.5x, 100-199 is 4x -> growth from 100 finished trials.
    assert scale.growth_onset(buckets, buckets[1]) == 100
    assert scale.growth_onset(buckets, buckets[1], factor=5.0) is None
    assert scale.bucket_edges(1000) == [0, 10, 50, 100, 250, 500, 1001]
    assert scale.bucket_edges(2000) == [0, 10, 50, 100, 250, 500, 1000, 1500, 2001]


def test_synthetic_objectives_are_deterministic_bounded_and_depend_on_the_values() -> None:
    a = {"defense": "kap", "kap.kernel_size": 3, "training.lr": 0.1}
    assert scale.synthetic_objectives(a) == scale.synthetic_objectives(dict(reversed(list(a.items()))))
    others = [scale.synthetic_objectives({**a, "training.lr": lr}) for lr in (0.01, 0.02, 0.3)]
    assert len({*others, scale.synthetic_objectives(a)}) == 4
    assert scale.synthetic_objectives(a, seed=1) != scale.synthetic_objectives(a)
    for clean, robust in others:
        assert 0.0 <= clean <= 1.0 and 0.0 <= robust <= 1.0


@pytest.mark.parametrize(
    "changes",
    [
        {"duplicate_trial_ids": ["b"]},
        {"mlflow_children": 4},
        {"mlflow_duplicate_trial_ids": ["b"]},
        {"optuna_states": {"COMPLETE": 2}},
        {"optuna_states": {"COMPLETE": 1, "FAIL": 2}},
        {"optuna_states": {"COMPLETE": 2, "FAIL": 1, "RUNNING": 1}},
        {"mlflow_missing": ["c"], "mlflow_extra": ["x"]},
        {"mlflow_mismatched_metrics": ["b"]},
        {"front_recomputed": ["a", "b"]},
    ],
)
def test_any_inconsistency_between_the_stores_is_reported(changes: dict) -> None:
    assert scale.consistent(_audit())
    assert not scale.consistent(_audit(**changes))


class _Clock:
    """perf_counter for scale's code only: advances when the fake inner sampler works."""

    def __init__(self) -> None:
        self.now = 100.0

    def perf_counter(self) -> float:
        return self.now


class _SlowSampler:
    """Each method takes a known time on the clock; before_trial can be told to raise."""

    def __init__(self, clock: _Clock) -> None:
        self.clock, self.fail = clock, False

    def _work(self, seconds: float) -> str:
        self.clock.now += seconds
        return f"took {seconds}"

    def infer_relative_search_space(self, study, trial):
        return self._work(1.0)

    def sample_relative(self, study, trial, search_space):
        return self._work(2.0)

    def sample_independent(self, study, trial, name, distribution):
        return self._work(4.0)

    def before_trial(self, study, trial):
        self._work(8.0)
        if self.fail:
            raise RuntimeError("inner sampler failed")

    def after_trial(self, study, trial, state, values):
        self._work(16.0)


def test_timed_sampler_sums_every_suggestion_call_per_trial_and_samples_each_tell(monkeypatch) -> None:
    from types import SimpleNamespace

    clock = _Clock()
    monkeypatch.setattr(scale, "time", clock)
    monkeypatch.setitem(scale._PROBES, "test", scale._Probe())
    inner = _SlowSampler(clock)
    sampler = scale.TimedSampler(inner, "test")
    study, first, second = object(), SimpleNamespace(number=0), SimpleNamespace(number=1)

    sampler.before_trial(study, first)
    assert sampler.infer_relative_search_space(study, first) == "took 1.0"
    assert sampler.sample_relative(study, first, {}) == "took 2.0"
    assert sampler.sample_independent(study, first, "x", None) == "took 4.0"
    assert sampler.sample_independent(study, first, "y", None) == "took 4.0"
    sampler.after_trial(study, first, None, [0.5, 0.5])  # a tell: not suggestion time
    inner.fail = True
    with pytest.raises(RuntimeError, match="inner sampler failed"):
        sampler.before_trial(study, second)

    probe = scale._PROBES["test"]
    # [trials told when first asked, seconds]: 8 + 1 + 2 + 4 + 4 for the first; a call that
    # raised still counts its time.
    assert probe.calls == {0: [0.0, 19.0], 1: [1.0, 8.0]}
    assert [t for t, _ in probe.tells] == [100.0 + 19.0 + 16.0] and probe.tells[0][1] > 0


def test_every_hundred_tells_log_a_progress_line_with_the_last_hundreds_rate(monkeypatch, caplog) -> None:
    import logging

    clock = _Clock()
    monkeypatch.setattr(scale, "time", clock)
    monkeypatch.setitem(scale._PROBES, "test", scale._Probe())
    sampler = scale.TimedSampler(_SlowSampler(clock), "test")
    caplog.set_level(logging.INFO, logger=scale.__name__)
    for i in range(250):
        clock.now += 0.5 if i < 100 else 2.0  # 0.5 s per trial, then 2 s
        sampler.after_trial(None, None, None, [0.5, 0.5])
    lines = [r.getMessage() for r in caplog.records if "trials finished" in r.getMessage()]
    assert len(lines) == 2, lines
    # The fake inner sampler's after_trial takes 16 s: tells 1..100 are 16.5 s apart, tells
    # 101..200 18 s apart (the interval 100 -> 101 is 18 s too).
    assert lines[0].startswith("bench scale: 100 trials finished, the last 99 at 16.500 s each; driver RSS ")
    assert lines[1].startswith("bench scale: 200 trials finished, the last 99 at 18.000 s each; driver RSS ")


def test_bad_trial_count_is_one_line_exit_2(capsys) -> None:
    with pytest.raises(SystemExit) as exit:
        cli.main(["bench", "scale", "--trials", "-3"])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "--trials" in err


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_a_short_scale_run_goes_through_the_real_driver_and_every_store_agrees(tmp_path: Path) -> None:
    from study.spec import trial_config_for

    n = 40
    m = scale.bench_scale(num_trials=n, concurrency=2, workdir=tmp_path)
    assert scale.consistent(m), m
    assert m["records"] == n and m["tells"] == n and m["statuses"] == {"completed": n}
    assert sum(b["n"] for b in m["sampler"]) == n and all(b["mean_s"] > 0 for b in m["sampler"])
    assert m["windows"] and all(w["seconds_per_trial"] > 0 for w in m["windows"])
    assert m["memory"]["peak_mb"] > 0 and m["front_size"] >= 1
    # The numbers recorded are the synthetic trial's for each configuration, labelled as a real
    # trial's (validation split).
    spec = scale.scale_spec(tmp_path / "results", n)
    records = json.loads((spec.study_dir() / "trials.json").read_text())
    for r in records:
        config = trial_config_for(spec, r["params"], name="check")
        assert (r["val_clean_accuracy"], r["val_robust_accuracy"]) == scale.synthetic_objectives(
            scale.searched_values(config), config.seed
        )
    text = scale.format_scale(m)
    assert "consistent: ok" in text and f"{n} synthetic trials" in text


def test_rays_advice_about_a_slow_define_by_run_space_is_silenced_and_other_warnings_are_not() -> None:
    # Past ~1,000 trials TPE's suggestion alone takes ~1 s, and Ray warned on every trial that the
    # space "took 1.09 seconds to run" with advice that does not apply to a space that only suggests.
    import warnings

    from study.orchestration.runner import quiet_libraries

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_libraries()
        warnings.warn("Define-by-run function passed in the `space` argument took 1.09 seconds to run. "
                      "Ensure that actual computation, training takes place inside Tune's train functions",
                      UserWarning, stacklevel=1)
        warnings.warn("something else took 1.09 seconds", UserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["something else took 1.09 seconds"]
