"""Tests for study.results.plots: files are written, the encoding is honest, the front comes from
study.results.pareto and never contains an untrusted trial."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest

from study.results import pareto, plots

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _rec(number, clean, robust, *, defense="kap", trusted=True, status="completed", flags=(),
         final=None):
    r = {
        "trial_id": f"t{number:03d}",
        "number": number,
        "defense": defense,
        "params": {"kernel_size": 3, "noise_std": 0.1},
        "val_clean_accuracy": clean,
        "val_robust_accuracy": robust,
        "trusted": trusted,
        "status": status,
        "flags_failed": list(flags),
    }
    if final is not None:
        r["final"] = final
    return r


@pytest.fixture
def records():
    return [
        _rec(0, 0.99, 0.02, defense="none"),                     # front (best clean)
        _rec(1, 0.95, 0.40),                                      # front
        _rec(2, 0.90, 0.30),                                      # dominated by 1
        _rec(3, 0.97, 0.90, defense="kwta", trusted=False, flags=["R8", "R13"]),  # untrusted
        _rec(4, 0.85, 0.55, defense="cas"),                       # front (best robust)
        _rec(5, 0.10, 0.10, status="failed"),
        _rec(6, 0.10, 0.10, status="diverged"),
        _rec(7, 0.10, 0.10, status="failed"),
        _rec(8, 0.10, 0.10, status="stopped"),
        _rec(9, 0.80, 0.50, defense="kaf"),                       # dominated by 4
    ]


# ------------------------------------------------------------------------------------ front


def test_front_indices_excludes_untrusted_and_incomplete(records):
    # Trial 3 dominates trials 1, 2, 4 and 9 but failed a gate: it must not be on the front and
    # must not push trusted trials off it.
    assert plots.front_indices(records) == [0, 1, 4]


def test_untrusted_never_on_front_even_if_it_dominates_everything():
    recs = [_rec(0, 0.5, 0.5), _rec(1, 1.0, 1.0, trusted=False, flags=["R11"])]
    assert plots.front_indices(recs) == [0]
    assert plots.front_indices([recs[1]]) == []


def test_front_indices_uses_study_pareto(monkeypatch, records):
    calls = []
    original = pareto.pareto_front

    def spy(points, directions):
        calls.append((list(points), list(directions)))
        return original(points, directions)

    monkeypatch.setattr(pareto, "pareto_front", spy)
    plots.front_indices(records)
    assert len(calls) == 1
    pts, dirs = calls[0]
    assert dirs == ["max", "max"]
    # Only the 5 trusted completed trials are candidates, as recorded (fractions).
    assert len(pts) == 5
    assert [0.95, 0.40] in [[pytest.approx(a), pytest.approx(b)] for a, b in pts]


def test_front_indices_respects_directions():
    recs = [_rec(0, 0.9, 0.1), _rec(1, 0.5, 0.5), _rec(2, 0.1, 0.9)]
    assert plots.front_indices(recs, directions=("min", "min")) == [0, 1, 2]
    assert plots.front_indices(recs, directions=("min", "max")) == [2]
    assert plots.front_indices(recs, directions=("max", "min")) == [0]


def test_final_stage_front_uses_final_numbers_and_final_trust():
    recs = [
        # Search: both on the front. Final (strong attack): 0 collapses and is dominated by 1.
        _rec(0, 0.90, 0.60, final={"test_clean_accuracy": 0.90, "test_robust_accuracy": 0.05,
                                   "trusted": True}),
        _rec(1, 0.95, 0.50, final={"test_clean_accuracy": 0.95, "test_robust_accuracy": 0.45,
                                   "trusted": True}),
        # Best final numbers but failed a gate at the final stage.
        _rec(2, 0.85, 0.55, final={"test_clean_accuracy": 0.96, "test_robust_accuracy": 0.50,
                                   "trusted": False}),
        # Not re-evaluated: its optimistic search numbers must not compete with final numbers.
        _rec(3, 0.99, 0.99),
    ]
    assert plots.front_indices(recs, stage="search") == [3]
    assert plots.front_indices(recs, stage="final") == [1]


def test_final_stage_without_final_numbers_is_empty_never_the_search_front(records):
    # Search numbers never stand in for verified ones: nothing verified, no verified front.
    assert plots.front_indices(records) != []
    assert plots.front_indices(records, stage="final") == []


def test_staircase_max_max_corners_lie_below_left():
    xs, ys = plots._staircase([(50.0, 50.0), (90.0, 10.0)], ("max", "max"))
    assert list(zip(xs, ys)) == [(50.0, 50.0), (50.0, 10.0), (90.0, 10.0)]
    xs, ys = plots._staircase([(50.0, 50.0), (90.0, 10.0)], ("min", "min"))
    assert list(zip(xs, ys)) == [(50.0, 50.0), (90.0, 50.0), (90.0, 10.0)]


def test_skipped_note_counts_non_completed(records):
    _, skipped = plots._points(records, plots.DEFAULT_OBJECTIVES, "search")
    assert plots._skipped_note(skipped) == "2 failed, 1 diverged, 1 stopped"
    assert plots._skipped_note(Counter()) == ""


def test_defense_colors_stable_and_distinct():
    known = ["none", "kap", "kwta", "kaf", "topkconv", "dynamic_k", "cas", "noise"]
    colors = [plots.defense_color(d) for d in known]
    assert len(set(colors)) == len(known)
    assert plots.defense_color("brand_new") == plots.defense_color("brand_new")
    assert re.fullmatch(r"#[0-9a-f]{6}", plots.defense_color("brand_new"))


# ------------------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"stage": "verify"}, "stage='verify'"),
        ({"directions": ("max", "up")}, "direction='up'"),
        ({"objectives": ("clean_accuracy",)}, "exactly 2"),
    ],
)
def test_bad_arguments_raise(records, kwargs, match):
    with pytest.raises(ValueError, match=match):
        plots.front_indices(records, **kwargs)


def test_bad_records_raise():
    with pytest.raises(ValueError, match="status='done'"):
        plots.front_indices([_rec(0, 0.5, 0.5, status="done")])
    with pytest.raises(ValueError, match=r"clean_accuracy=95\.0 must be a fraction"):
        plots.front_indices([_rec(0, 95.0, 0.5)])


def test_completed_trial_without_numbers_is_skipped_not_fatal(tmp_path):
    recs = [_rec(0, float("nan"), 0.5), _rec(1, 0.6, 0.4)]
    assert plots.front_indices(recs) == [1]
    out = plots.plot_front_png(recs, tmp_path / "f.png", title="nan")
    assert out.read_bytes().startswith(PNG_SIGNATURE)


# ----------------------------------------------------------------------------------- files


def _assert_png(path: Path):
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    assert len(data) > 5_000


def test_plot_front_png_writes_png_and_creates_dirs(tmp_path, records):
    target = tmp_path / "a" / "b" / "front.png"
    out = plots.plot_front_png(records, target, title="digits, eps=0.1")
    assert out == target
    _assert_png(out)


def test_plot_front_png_final_stage(tmp_path):
    recs = [
        _rec(0, 0.90, 0.60, final={"test_clean_accuracy": 0.90, "test_robust_accuracy": 0.05,
                                   "trusted": True}),
        _rec(1, 0.95, 0.50, final={"test_clean_accuracy": 0.94, "test_robust_accuracy": 0.45,
                                   "trusted": True}),
        _rec(2, 0.70, 0.30),
    ]
    _assert_png(plots.plot_front_png(recs, tmp_path / "final.png", title="final", stage="final"))


@pytest.mark.parametrize("recs", [[], [_rec(0, 0.1, 0.1, status="failed")]])
def test_plot_front_png_without_completed_trials(tmp_path, recs):
    _assert_png(plots.plot_front_png(recs, tmp_path / "empty.png", title="empty"))


def test_plot_front_html_is_self_contained_with_trial_numbers(tmp_path, records):
    out = plots.plot_front_html(records, tmp_path / "html" / "front.html", title="digits <eps>")
    text = out.read_text(encoding="utf-8")
    # Offline: no <script src=...> at all (plotly.js is inlined, ~MBs of it).
    assert not re.search(r"<script[^>]*\bsrc\s*=", text, flags=re.IGNORECASE)
    assert len(text) > 1_000_000
    for r in records:
        if r["status"] == "completed":
            assert f"trial {r['number']}" in text
    # Hover carries flags and params.
    assert "R8, R13" in text
    assert "kernel_size=3" in text


def test_plot_front_html_empty(tmp_path):
    out = plots.plot_front_html([], tmp_path / "empty.html", title="empty")
    text = out.read_text(encoding="utf-8")
    assert plots.NO_TRIALS_NOTE in text
    assert not re.search(r"<script[^>]*\bsrc\s*=", text, flags=re.IGNORECASE)


def test_plot_front_html_final_stage(tmp_path):
    recs = [_rec(0, 0.90, 0.60, final={"test_clean_accuracy": 0.91, "test_robust_accuracy": 0.30,
                                       "trusted": True})]
    text = plots.plot_front_html(recs, tmp_path / "f.html", title="f", stage="final").read_text()
    assert "search (val) → final (test)" in text or "search (val) \\u2192 final (test)" in text
    assert "test clean accuracy: 91.00% (search, val: 90.00%)" in text


def test_plot_hypervolume_png(tmp_path):
    hist = [0.0, 0.2, 0.2, 0.35, 0.4]
    _assert_png(plots.plot_hypervolume_png(hist, tmp_path / "hv" / "hv.png", title="hv"))
    by = {"tpe": [[0.1, 0.2, 0.3], [0.0, 0.25, 0.3]], "random": [[0.1, 0.1, 0.2, 0.2]]}
    _assert_png(plots.plot_hypervolume_png(hist, tmp_path / "hv2.png", title="bench",
                                           by_sampler=by))
    _assert_png(plots.plot_hypervolume_png([], tmp_path / "hv3.png", title="empty"))


def test_hypervolume_band_statistics():
    mean, std = plots._mean_std([[1.0, 2.0, 9.0], [3.0, 4.0]], "s")
    assert mean == [2.0, 3.0]  # truncated to the shortest run
    assert std == pytest.approx([2 ** 0.5, 2 ** 0.5])  # sample sd


def test_plot_hypervolume_rejects_empty_sampler(tmp_path):
    with pytest.raises(ValueError, match="by_sampler\\['tpe'\\]"):
        plots.plot_hypervolume_png([0.1], tmp_path / "x.png", title="x", by_sampler={"tpe": []})


@pytest.fixture
def saved_figures(monkeypatch):
    """The matplotlib figures the plotting code saves, in order (for inspecting what was drawn)."""
    from matplotlib.figure import Figure

    figures = []
    real_savefig = Figure.savefig

    def capture(self, *args, **kwargs):
        figures.append(self)
        return real_savefig(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", capture)
    return figures


def test_narrow_ranges_get_distinct_ticks_and_identical_scores_share_a_label(tmp_path, saved_figures):
    # All clean accuracies within 1.5 points; trials 3 and 7 have identical scores, both on the front.
    recs = [_rec(1, 0.980, 0.10), _rec(3, 0.995, 0.05), _rec(7, 0.995, 0.05), _rec(9, 0.985, 0.02)]
    plots.plot_front_png(recs, tmp_path / "front.png", title="narrow")
    (fig,) = saved_figures
    fig.canvas.draw()
    ax = fig.axes[0]
    xticks = [t.get_text() for t in ax.xaxis.get_ticklabels() if t.get_text()]
    assert len(xticks) >= 3 and len(set(xticks)) == len(xticks), xticks
    labels = [t.get_text() for t in ax.texts]
    assert "#3, #7" in labels and "#3" not in labels and "#7" not in labels, labels
    assert "#1" in labels


def test_shared_label_names_up_to_four_then_counts_the_rest():
    assert plots.front.shared_label(["#3", "#7"]) == "#3, #7"
    assert plots.front.shared_label(["#1", "#2", "#3", "#4"]) == "#1, #2, #3, #4"
    assert plots.front.shared_label(["#1", "#2", "#3", "#4", "#9"]) == "#1, #2, #3 +2 more"


def test_forty_trials_on_one_point_keep_the_figure_readable(tmp_path, saved_figures):
    """bench load's 100-trial random search put 40 identical undefended trials on one front point;
    their full list of numbers made a 2,735-pixel-wide PNG whose axes matplotlib could not lay out."""
    import warnings

    recs = [_rec(n, 0.22, 0.025, defense="none") for n in range(40)] + [_rec(40, 0.20, 0.10)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plots.plot_front_png(recs, tmp_path / "front.png", title="many")
    assert not [w for w in caught if "constrained_layout" in str(w.message)], [str(w.message) for w in caught]
    (fig,) = saved_figures
    labels = [t.get_text() for t in fig.axes[0].texts]
    assert "#0, #1, #2 +37 more" in labels and "#40" in labels, labels


def _timed(number, start, end, defense="kap", trusted=True):
    return {"number": number, "defense": defense, "started_at": start, "ended_at": end, "trusted": trusted,
            "train_seconds": (end - start) * 0.5, "eval_seconds": (end - start) * 0.3}


def test_timeline_lanes_never_put_overlapping_trials_in_one_lane():
    recs = [_timed(0, 100.0, 110.0), _timed(1, 101.0, 105.0), _timed(2, 105.0, 120.0),
            _timed(3, 110.5, 111.0), {"number": 4, "defense": "none", "started_at": None, "ended_at": None}]
    lanes = plots.timeline_lanes(recs)
    assert [(lane, r["number"]) for lane, r in lanes] == [(0, 0), (1, 1), (1, 2), (0, 3)]  # #4 has no times
    for lane in {lane for lane, _ in lanes}:
        spans = sorted((r["started_at"], r["ended_at"]) for other, r in lanes if other == lane)
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
    # Three trials at once need three lanes.
    assert max(lane for lane, _ in plots.timeline_lanes([_timed(i, 0.0, 5.0) for i in range(3)])) == 2


def test_plot_timeline_png(tmp_path):
    recs = [_timed(0, 100.0, 110.0), _timed(1, 101.0, 105.0, "cas", trusted=False), _timed(2, 105.0, 120.0, "none")]
    _assert_png(plots.plot_timeline_png(recs, tmp_path / "t" / "timeline.png", title="t"))
    _assert_png(plots.plot_timeline_png([], tmp_path / "empty.png", title="empty"))


def test_timeline_marks_trials_stopped_early(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    figures = []
    real_savefig = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: (figures.append(self), real_savefig(self, *a, **k))[1])
    stopped = {**_timed(1, 101.0, 105.0, "cas", trusted=False), "status": "stopped", "eval_seconds": None}
    plots.plot_timeline_png([_timed(0, 100.0, 110.0), stopped], tmp_path / "timeline.png", title="t")
    plots.plot_timeline_png([_timed(0, 100.0, 110.0)], tmp_path / "none_stopped.png", title="t")
    with_stop, without = (fig.axes[0] for fig in figures)
    assert "stopped early" in [t.get_text() for t in with_stop.get_legend().get_texts()]
    assert "stopped early" not in [t.get_text() for t in without.get_legend().get_texts()]
    # Bars as (start, width) from the first start: trial 0 is set-up 2 s, training 5 s from 2 s,
    # attacks 3 s; the stopped trial (4 s from 1 s, trained 2 s, never attacked) is set-up 2 s, then
    # training from 3 s for 2 s, which alone is dotted.
    hatches = {(round(p.get_x(), 3), round(p.get_width(), 3)): p.get_hatch() for p in with_stop.patches}
    assert hatches[(3.0, 2.0)] == "..."
    assert hatches[(2.0, 5.0)] is None and hatches[(7.0, 3.0)] == "///"
