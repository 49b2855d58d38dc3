"""Pareto-front and hypervolume plots for a study's MLflow parent run.

Three artifacts, one visual encoding: every completed trial is a point coloured by its defense
(the same colour for a defense in every plot and format), trials that failed an integrity gate are
drawn as an ``x`` and can never sit on the front, and the front itself is a staircase through the
highlighted non-dominated trials. The front is always computed by :mod:`study.pareto` (the one
place that defines it), through :func:`front_indices`, so a plot can never disagree with the
front the study reports.

Records are :class:`study.records.TrialRecord` dicts (what the runner collects from each trial;
accuracies are fractions in [0, 1], ``final`` holds the strong re-evaluation when there is one).

"Search cheap, verify strong": the final numbers come from the strong re-evaluation of the front
(Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of diverse
parameter-free attacks", AutoAttack); ``stage="final"`` plots them with arrows from the cheap
search numbers, which makes the gap between the two attacks visible.

Matplotlib is used through :class:`~matplotlib.figure.Figure` directly (no pyplot): no display,
no global backend switch, safe inside Ray workers and MLflow callbacks. The HTML embeds plotly.js
so it opens offline (air-gapped clusters, this machine).
"""

from __future__ import annotations

import html
import logging
import math
import zlib
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from study import pareto

logger = logging.getLogger(__name__)

STATUSES = ("completed", "diverged", "failed", "stopped")
STAGES = ("search", "final")
DIRECTIONS = ("max", "min")
DEFAULT_OBJECTIVES = ("clean_accuracy", "robust_accuracy")
DEFAULT_DIRECTIONS = ("max", "max")

UNTRUSTED_LABEL = "untrusted (failed gate)"
FRONT_LABEL = "Pareto front"
NO_TRIALS_NOTE = "no completed trials"

# Fixed colour per defense so a defense looks the same in every plot of every study: the colour
# its registration declares; the undefended baseline is neutral grey; a defense without one gets a
# stable colour from a spare palette.
BASELINE_COLOR = "#7f7f7f"
_EXTRA_COLORS = ("#bcbd22", "#17becf", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173")


def defense_color(defense: str) -> str:
    """The colour (hex) of a defense, identical across plots, formats and studies.

    Args:
        defense: Defense name; unknown names get a colour from a spare palette chosen by a
            stable hash (crc32, not Python's salted ``hash``), so it is the same in every process.
    """
    from defenses import BASELINE, get_defense, list_defenses

    if defense == BASELINE:
        return BASELINE_COLOR
    if defense in list_defenses() and get_defense(defense).color:
        return str(get_defense(defense).color)
    return _EXTRA_COLORS[zlib.crc32(defense.encode()) % len(_EXTRA_COLORS)]


# --------------------------------------------------------------------------------------------
# Record handling and the front
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Point:
    """One plottable trial at the numbers of the requested stage."""

    index: int  # position in the caller's record list
    record: Mapping[str, Any]
    values: tuple[float, float]  # objective values as plotted (accuracies in %)
    trusted: bool
    search_values: tuple[float, float] | None  # set when the point shows final numbers
    reevaluated: bool  # stage="final" and the record has final numbers


def _check_objectives(
    objectives: Sequence[str], directions: Sequence[str], stage: str
) -> tuple[tuple[str, str], tuple[str, str]]:
    objectives = tuple(objectives)
    directions = tuple(directions)
    if len(objectives) != 2:
        raise ValueError(f"objectives={objectives!r} must name exactly 2 record keys (a 2-D plot)")
    if len(directions) != 2:
        raise ValueError(f"directions={directions!r} must have 2 entries, one per objective")
    for d in directions:
        if d not in DIRECTIONS:
            raise ValueError(f"direction={d!r} must be one of {DIRECTIONS}")
    if stage not in STAGES:
        raise ValueError(f"stage={stage!r} must be one of {STAGES}")
    return objectives, directions  # type: ignore[return-value]


def _is_fraction(objective: str) -> bool:
    # Accuracies are stored as fractions in [0, 1] and shown in percent; other objectives
    # (e.g. train time) are plotted as they are.
    return objective.endswith("accuracy")


def _percent_decimals(values: list[float]) -> int:
    """Decimals of percent tick labels: enough that ticks on a narrow range (98.0-99.5 %) don't
    print the same label twice."""
    span = max(values) - min(values) if values else 100.0
    return 0 if span >= 5 else 1 if span >= 0.5 else 2


def _scaled(objective: str, value: Any, where: str) -> float | None:
    """The plotted value of one objective, or None when it is missing or not finite."""
    if value is None:
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: {objective}={value!r} must be a number") from None
    if not math.isfinite(v):
        return None
    if _is_fraction(objective):
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"{where}: {objective}={v} must be a fraction in [0, 1]")
        return 100.0 * v
    return v


def _pair(
    source: Mapping[str, Any], objectives: tuple[str, str], where: str
) -> tuple[float, float] | None:
    """Both plotted objective values of a record or its "final" dict; None if one is missing."""
    x = _scaled(objectives[0], source.get(objectives[0]), where)
    y = _scaled(objectives[1], source.get(objectives[1]), where)
    return None if x is None or y is None else (x, y)


def _check_record(i: int, record: Mapping[str, Any]) -> None:
    if not isinstance(record, Mapping):
        raise ValueError(f"records[{i}]={record!r} must be a dict")
    status = record.get("status")
    if status not in STATUSES:
        raise ValueError(f"records[{i}] status={status!r} must be one of {STATUSES}")


def _where(i: int, record: Mapping[str, Any]) -> str:
    return f"records[{i}] (trial {record.get('number', record.get('trial_id', '?'))})"


def _points(
    records: Sequence[Mapping[str, Any]], objectives: tuple[str, str], stage: str
) -> tuple[list[_Point], Counter[str]]:
    """Plottable points plus a count of the trials left out (by reason).

    In ``stage="final"`` only the re-evaluated trials are shown at their final numbers (and may
    form the front); the others keep their search numbers as context and are marked as such,
    because mixing a cheap attack's optimistic numbers into a front of strong-attack numbers
    would let them dominate unfairly.
    """
    use_final = stage == "final" and any(isinstance(r, Mapping) and r.get("final") for r in records)
    if stage == "final" and not use_final:
        logger.warning("stage='final' but no record has final numbers: plotting search numbers")
    points: list[_Point] = []
    skipped: Counter[str] = Counter()
    for i, r in enumerate(records):
        _check_record(i, r)
        if r["status"] != "completed":
            skipped[r["status"]] += 1
            continue
        where = _where(i, r)
        search = _pair(r, objectives, where)
        if search is None:
            logger.warning("%s is completed but has no finite %s: not plotted", where, objectives)
            skipped["without numbers"] += 1
            continue
        trusted = bool(r.get("trusted", False))
        final = r.get("final") if use_final else None
        if final:
            final_vals = _pair(final, objectives, f"{where} final")
            if final_vals is not None:
                # A trial must pass the gates at both stages to be trusted at the final stage.
                final_trusted = trusted and bool(final.get("trusted", False))
                points.append(_Point(i, r, final_vals, final_trusted, search, True))
                continue
            logger.warning("%s has no finite final %s: showing search numbers", where, objectives)
        points.append(_Point(i, r, search, trusted, None, False))
    return points, skipped


def _front_of(
    points: Sequence[_Point],
    records: Sequence[Mapping[str, Any]],
    objectives: tuple[str, str],
    directions: tuple[str, str],
    stage: str,
) -> list[_Point]:
    # The front itself comes from the one shared rule (study.pareto.front_of_records).
    on_front = set(pareto.front_of_records(records, objectives, directions, stage))
    return [p for p in points if p.index in on_front]


def front_indices(
    records: Sequence[Mapping[str, Any]],
    *,
    objectives: Sequence[str] = DEFAULT_OBJECTIVES,
    directions: Sequence[str] = DEFAULT_DIRECTIONS,
    stage: str = "search",
) -> list[int]:
    """Indices into ``records`` of the trials on the Pareto front, as the plots draw it.

    Only completed, trusted trials are candidates (a trial that failed an integrity gate is never
    on the front); the front among them comes from :func:`study.pareto.pareto_front`. With
    ``stage="final"`` and re-evaluated records, the candidates are the re-evaluated trials at
    their final numbers, trusted at both stages.

    Args:
        records: Trial records (see the module docstring).
        objectives: Two record keys, x then y.
        directions: ``"max"`` or ``"min"`` per objective.
        stage: ``"search"`` or ``"final"``.

    Returns:
        Sorted indices into ``records``.
    """
    objectives, directions = _check_objectives(objectives, directions, stage)
    points, _ = _points(records, objectives, stage)
    return sorted(p.index for p in _front_of(points, records, objectives, directions, stage))


def _staircase(
    front: Sequence[tuple[float, float]], directions: tuple[str, str]
) -> tuple[list[float], list[float]]:
    """Vertices of the attainment staircase through the front points (boundary of the region
    they dominate), sorted by x.

    Between consecutive points the corner lies on the side the dominated region extends to:
    when x is maximised it is below/left, so the corner keeps the left point's x.
    """
    pts = sorted(front)
    xs: list[float] = []
    ys: list[float] = []
    for k, (x, y) in enumerate(pts):
        if k:
            px, py = pts[k - 1]
            cx, cy = (px, y) if directions[0] == "max" else (x, py)
            xs.append(cx)
            ys.append(cy)
        xs.append(x)
        ys.append(y)
    return xs, ys


def _skipped_note(skipped: Counter[str]) -> str:
    order = ("failed", "diverged", "stopped", "without numbers")
    return ", ".join(f"{skipped[k]} {k}" for k in order if skipped.get(k))


def _axis_label(objective: str) -> str:
    label = objective.replace("_", " ")
    return f"{label} (%)" if _is_fraction(objective) else label


def _prepare_path(path: str | Path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    return p


def _params_text(params: Any, sep: str) -> str:
    if not isinstance(params, Mapping) or not params:
        return "-"
    return sep.join(f"{k}={_fmt(v)}" for k, v in sorted(params.items()))


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


# --------------------------------------------------------------------------------------------
# PNG (matplotlib)
# --------------------------------------------------------------------------------------------


def plot_front_png(
    records: Sequence[Mapping[str, Any]],
    path: str | Path,
    *,
    title: str,
    objectives: Sequence[str] = DEFAULT_OBJECTIVES,
    directions: Sequence[str] = DEFAULT_DIRECTIONS,
    stage: str = "search",
) -> Path:
    """Static accuracy-robustness scatter with the Pareto front, for reports and MLflow.

    Every completed trial is a point coloured by defense; untrusted trials are ``x`` markers; the
    front (see :func:`front_indices`) is a black staircase through enlarged, black-edged points
    labelled with their trial number. With ``stage="final"``, re-evaluated trials sit at their
    strong-attack numbers with faint arrows from their search numbers; the others are faded.
    Trials that did not complete are counted in a note in the figure's corner.

    Args:
        records: Trial records (see the module docstring); may be empty.
        path: Output file (``.png``); parent directories are created.
        title: Figure title.
        objectives: Two record keys, x then y (accuracies are fractions, shown in %).
        directions: ``"max"`` or ``"min"`` per objective.
        stage: ``"search"`` or ``"final"``.

    Returns:
        The path written.
    """
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import PercentFormatter

    objectives, directions = _check_objectives(objectives, directions, stage)
    points, skipped = _points(records, objectives, stage)
    front = _front_of(points, records, objectives, directions, stage)
    front_ids = {p.index for p in front}
    final_stage = any(p.reevaluated for p in points)
    out = _prepare_path(path)

    fig = Figure(figsize=(8.0, 5.6), dpi=150, layout="constrained")
    ax = fig.add_subplot()
    ax.set_title(title)
    suffix = " — final evaluation" if final_stage else ""
    ax.set_xlabel(_axis_label(objectives[0]) + suffix)
    ax.set_ylabel(_axis_label(objectives[1]) + suffix)
    for i, (axis, obj) in enumerate(((ax.xaxis, objectives[0]), (ax.yaxis, objectives[1]))):
        if _is_fraction(obj):
            axis.set_major_formatter(PercentFormatter(xmax=100, decimals=_percent_decimals([p.values[i] for p in points])))
    ax.grid(True, alpha=0.3, linewidth=0.6)

    handles: list[Any] = []
    if not points:
        ax.text(0.5, 0.5, NO_TRIALS_NOTE, transform=ax.transAxes, ha="center", va="center",
                fontsize=13, color="0.4")
        if all(_is_fraction(o) for o in objectives):
            ax.set_xlim(0, 100)
            ax.set_ylim(0, 100)
    else:
        defenses = sorted({str(p.record.get("defense", "?")) for p in points},
                          key=lambda d: (d != "none", d))
        for d in defenses:
            color = defense_color(d)
            for trusted in (True, False):
                group = [p for p in points
                         if str(p.record.get("defense", "?")) == d and p.trusted == trusted
                         and p.index not in front_ids]
                for faded in (False, True):
                    sub = [p for p in group if (final_stage and not p.reevaluated) == faded]
                    if not sub:
                        continue
                    ax.scatter([p.values[0] for p in sub], [p.values[1] for p in sub],
                               c=color, marker="o" if trusted else "x", s=28 if trusted else 34,
                               alpha=0.25 if faded else 0.8, linewidths=1.4 if not trusted else 0.0,
                               zorder=2)
            handles.append(Line2D([], [], linestyle="", marker="o", color=color, markersize=7,
                                  label="undefended (none)" if d == "none" else d))
        if any(not p.trusted for p in points):
            handles.append(Line2D([], [], linestyle="", marker="x", color="0.3", markersize=7,
                                  markeredgewidth=1.5, label=UNTRUSTED_LABEL))

        if final_stage:
            for p in points:
                if p.reevaluated and p.search_values is not None and p.search_values != p.values:
                    ax.annotate("", xy=p.values, xytext=p.search_values, zorder=1,
                                arrowprops={"arrowstyle": "->", "color": "0.45", "alpha": 0.45,
                                            "linewidth": 0.9, "shrinkA": 2, "shrinkB": 4})
            handles.append(Line2D([], [], color="0.45", alpha=0.6, marker=r"$\rightarrow$",
                                  markersize=10, linestyle="", label="search → final attack"))
            if any(not p.reevaluated for p in points):
                handles.append(Line2D([], [], linestyle="", marker="o", color="0.5", alpha=0.3,
                                      markersize=7, label="not re-evaluated (search numbers)"))

        if front:
            xs, ys = _staircase([p.values for p in front], directions)
            ax.plot(xs, ys, color="black", linewidth=1.3, zorder=3)
            # Trials with identical scores share one label ("#3, #7") instead of overprinting.
            labels: dict[tuple[float, ...], list[str]] = {}
            for p in front:
                ax.scatter([p.values[0]], [p.values[1]],
                           c=defense_color(str(p.record.get("defense", "?"))), marker="o", s=90,
                           edgecolors="black", linewidths=1.4, zorder=4)
                labels.setdefault(tuple(p.values), []).append(f"#{p.record.get('number', p.index)}")
            for xy, names in labels.items():
                ax.annotate(", ".join(names), xy, xytext=(6, 4), textcoords="offset points", fontsize=7, zorder=5)
            handles.append(Line2D([], [], color="black", linewidth=1.3, marker="o",
                                  markerfacecolor="white", markeredgecolor="black",
                                  markersize=8, markeredgewidth=1.4, label=FRONT_LABEL))
        _pad_limits(ax, [p.values for p in points] + [p.search_values for p in points
                                                        if p.search_values is not None])

    if handles:
        # Outside the axes so the legend never hides a trial.
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False,
                  fontsize=8, borderaxespad=0.0)
    note = _skipped_note(skipped)
    n_plotted = len(points)
    corner = f"{n_plotted} trial{'s' if n_plotted != 1 else ''} plotted" + (
        f"; not plotted: {note}" if note else "")
    # Bottom of the legend column: outside the axes (hides no trial) and clear of the x label.
    ax.text(1.02, 0.0, corner.replace("; ", "\n"), transform=ax.transAxes, ha="left",
            va="bottom", fontsize=7, color="0.35")
    fig.savefig(out, format="png", bbox_inches="tight", pad_inches=0.1)
    logger.info("wrote Pareto-front plot %s (%d points, %d on front)", out, n_plotted, len(front))
    return out


def _pad_limits(ax: Any, values: Sequence[tuple[float, float]]) -> None:
    # Matplotlib's auto-limits hug the extreme points; pad so front labels and markers fit.
    xs = [v[0] for v in values]
    ys = [v[1] for v in values]
    for lo, hi, setter in ((min(xs), max(xs), ax.set_xlim), (min(ys), max(ys), ax.set_ylim)):
        span = hi - lo
        pad = 0.06 * span if span > 0 else max(1.0, 0.05 * abs(hi))
        setter(lo - pad, hi + pad)


# --------------------------------------------------------------------------------------------
# HTML (plotly)
# --------------------------------------------------------------------------------------------


def _hover(p: _Point, objectives: tuple[str, str], on_front: bool) -> str:
    r = p.record
    esc = html.escape
    lines = [f"<b>trial {esc(str(r.get('number', p.index)))}</b>"
             + (" (Pareto front)" if on_front else ""),
             f"defense: {esc(str(r.get('defense', '?')))}"]
    for k, obj in enumerate(objectives):
        unit = "%" if _is_fraction(obj) else ""
        line = f"{esc(obj.replace('_', ' '))}: {p.values[k]:.2f}{unit}"
        if p.search_values is not None:
            line += f" (search {p.search_values[k]:.2f}{unit})"
        lines.append(line)
    lines.append("params: " + esc(_params_text(r.get("params"), ", ")))
    flags = r.get("flags_failed") or []
    lines.append("gate flags failed: " + (esc(", ".join(map(str, flags))) if flags else "none"))
    if not p.trusted:
        lines.append("<i>untrusted</i>")
    if "trial_id" in r:
        lines.append(f"id: {esc(str(r['trial_id']))}")
    return "<br>".join(lines)


def plot_front_html(
    records: Sequence[Mapping[str, Any]],
    path: str | Path,
    *,
    title: str,
    objectives: Sequence[str] = DEFAULT_OBJECTIVES,
    directions: Sequence[str] = DEFAULT_DIRECTIONS,
    stage: str = "search",
) -> Path:
    """Interactive version of :func:`plot_front_png` as one self-contained HTML file.

    Same encoding (colour = defense, ``x`` = untrusted, black staircase = front, black-edged
    front points); hovering a point shows its trial number, defense, numbers, hyperparameters and
    failed gate flags. plotly.js is embedded (no CDN), so the file opens offline.

    Args:
        records: Trial records (see the module docstring); may be empty.
        path: Output file (``.html``); parent directories are created.
        title: Figure title.
        objectives: Two record keys, x then y (accuracies are fractions, shown in %).
        directions: ``"max"`` or ``"min"`` per objective.
        stage: ``"search"`` or ``"final"``.

    Returns:
        The path written.
    """
    import plotly.graph_objects as go

    objectives, directions = _check_objectives(objectives, directions, stage)
    points, skipped = _points(records, objectives, stage)
    front = _front_of(points, records, objectives, directions, stage)
    front_ids = {p.index for p in front}
    final_stage = any(p.reevaluated for p in points)
    out = _prepare_path(path)

    fig = go.Figure()
    defenses = sorted({str(p.record.get("defense", "?")) for p in points},
                      key=lambda d: (d != "none", d))
    for d in defenses:
        for trusted in (True, False):
            sub = [p for p in points if str(p.record.get("defense", "?")) == d
                   and p.trusted == trusted]
            if not sub:
                continue
            name = "undefended (none)" if d == "none" else d
            name += "" if trusted else " — untrusted"
            fig.add_trace(go.Scatter(
                x=[p.values[0] for p in sub], y=[p.values[1] for p in sub], mode="markers",
                name=name, legendgroup=d,
                marker={
                    "color": defense_color(d),
                    "symbol": "circle" if trusted else "x",
                    "size": [14 if p.index in front_ids else 9 for p in sub],
                    "opacity": [0.3 if final_stage and not p.reevaluated else 0.9 for p in sub],
                    "line": {"color": "black",
                             "width": [2 if p.index in front_ids else 0 for p in sub]},
                },
                hovertext=[_hover(p, objectives, p.index in front_ids) for p in sub],
                hoverinfo="text",
            ))
    if final_stage:
        # One trace with None breaks keeps the arrows a single legend entry.
        ax_, ay_ = [], []
        for p in points:
            if p.reevaluated and p.search_values is not None:
                ax_ += [p.search_values[0], p.values[0], None]
                ay_ += [p.search_values[1], p.values[1], None]
        fig.add_trace(go.Scatter(x=ax_, y=ay_, mode="lines", name="search → final attack",
                                 line={"color": "rgba(110,110,110,0.45)", "width": 1},
                                 hoverinfo="skip"))
    if front:
        xs, ys = _staircase([p.values for p in front], directions)
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", name=FRONT_LABEL,
                                 line={"color": "black", "width": 1.5}, hoverinfo="skip"))

    annotations = []
    note = _skipped_note(skipped)
    if not points:
        annotations.append({"text": NO_TRIALS_NOTE, "xref": "paper", "yref": "paper", "x": 0.5,
                            "y": 0.5, "showarrow": False, "font": {"size": 18, "color": "gray"}})
    annotations.append({"text": f"{len(points)} plotted" + (f"; not plotted: {note}" if note
                                                             else ""),
                        "xref": "paper", "yref": "paper", "x": 0.0, "y": -0.14,
                        "xanchor": "left", "showarrow": False,
                        "font": {"size": 11, "color": "gray"}})
    suffix = " — final evaluation" if final_stage else ""
    fig.update_layout(
        title={"text": html.escape(title)},
        xaxis={"title": {"text": _axis_label(objectives[0]) + suffix},
               "ticksuffix": "%" if _is_fraction(objectives[0]) else ""},
        yaxis={"title": {"text": _axis_label(objectives[1]) + suffix},
               "ticksuffix": "%" if _is_fraction(objectives[1]) else ""},
        annotations=annotations, template="plotly_white", hovermode="closest",
        legend={"title": {"text": "defense"}},
    )
    # include_plotlyjs=True embeds the library: no CDN, works on offline clusters.
    fig.write_html(out, include_plotlyjs=True, full_html=True, include_mathjax=False)
    logger.info("wrote interactive Pareto-front plot %s", out)
    return out


# --------------------------------------------------------------------------------------------
# Hypervolume history
# --------------------------------------------------------------------------------------------


def _mean_std(runs: Sequence[Sequence[float]], name: str) -> tuple[list[float], list[float]]:
    lengths = {len(r) for r in runs}
    n = min(lengths)
    if len(lengths) > 1:
        # Runs of unequal length would otherwise average different seed sets per trial index.
        logger.warning("sampler %r: runs have lengths %s; truncating to %d trials",
                       name, sorted(lengths), n)
    mean, std = [], []
    for t in range(n):
        vals = [float(r[t]) for r in runs]
        m = sum(vals) / len(vals)
        var = sum((v - m) ** 2 for v in vals) / (len(vals) - 1) if len(vals) > 1 else 0.0
        mean.append(m)
        std.append(math.sqrt(var))
    return mean, std


def plot_hypervolume_png(
    history: Sequence[float],
    path: str | Path,
    *,
    title: str,
    by_sampler: Mapping[str, Sequence[Sequence[float]]] | None = None,
) -> Path:
    """Hypervolume of the front after each trial (Zitzler & Thiele, "Multiobjective optimization
    using evolutionary algorithms — a comparative case study": the S-metric).

    Args:
        history: Hypervolume after trial 1, 2, ... of this study (e.g. from
            :func:`study.pareto.hypervolume_history`); may be empty.
        path: Output file (``.png``); parent directories are created.
        title: Figure title.
        by_sampler: Optional search-efficiency benchmark: sampler name → one history per seed.
            Each sampler is drawn as its mean over seeds with a ±1 standard-deviation band
            (runs of unequal length are truncated to the shortest, with a warning).

    Returns:
        The path written.
    """
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    if by_sampler is not None:
        for name, runs in by_sampler.items():
            if not runs or any(len(r) == 0 for r in runs):
                raise ValueError(f"by_sampler[{name!r}] must hold at least one non-empty run")
    out = _prepare_path(path)
    fig = Figure(figsize=(7.0, 4.5), dpi=150, layout="constrained")
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.set_xlabel("trials completed")
    ax.set_ylabel("hypervolume")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3, linewidth=0.6)

    drew = False
    for k, (name, runs) in enumerate((by_sampler or {}).items()):
        mean, std = _mean_std(runs, name)
        t = list(range(1, len(mean) + 1))
        color = _EXTRA_COLORS[k % len(_EXTRA_COLORS)] if k >= 10 else f"C{k}"
        ax.plot(t, mean, color=color, linewidth=1.6, label=f"{name} (n={len(runs)})")
        if len(runs) > 1:
            ax.fill_between(t, [m - s for m, s in zip(mean, std)],
                            [m + s for m, s in zip(mean, std)], color=color, alpha=0.2,
                            linewidth=0)
        drew = True
    if len(history):
        t = list(range(1, len(history) + 1))
        ax.step(t, [float(h) for h in history], where="post", color="black", linewidth=1.6,
                label="this study" if by_sampler else "hypervolume")
        drew = True
    if not drew:
        ax.text(0.5, 0.5, NO_TRIALS_NOTE, transform=ax.transAxes, ha="center", va="center",
                fontsize=13, color="0.4")
    elif by_sampler:
        ax.legend(loc="lower right", fontsize=8, title="mean ± 1 sd over seeds",
                  title_fontsize=8)
    fig.savefig(out, format="png")
    logger.info("wrote hypervolume plot %s", out)
    return out


# --------------------------------------------------------------------------------------------
# Where a study's time went
# --------------------------------------------------------------------------------------------


def timeline_lanes(records: Sequence[Mapping[str, Any]]) -> list[tuple[int, Mapping[str, Any]]]:
    """(lane, record) for every record with a start and end time, in order of start.

    A lane is a slot that ran trials one after another (a worker, when actors are reused): each
    trial takes the lowest-numbered lane free at its start, so trials that overlapped in time never
    share a lane and the number of lanes is the study's peak concurrency.
    """
    timed = sorted((r for r in records if r.get("started_at") is not None and r.get("ended_at") is not None),
                   key=lambda r: (r["started_at"], r["ended_at"]))
    lane_free_at: list[float] = []
    out = []
    for r in timed:
        lane = next((i for i, t in enumerate(lane_free_at) if t <= r["started_at"]), len(lane_free_at))
        if lane == len(lane_free_at):
            lane_free_at.append(0.0)
        lane_free_at[lane] = r["ended_at"]
        out.append((lane, r))
    return out


def plot_timeline_png(records: Sequence[Mapping[str, Any]], path: str | Path, *, title: str) -> Path:
    """A Gantt chart of the trials: one row per lane (see :func:`timeline_lanes`), one bar per
    trial split into set-up (imports, data, checkpoints: grey), training (its defense's colour)
    and attacks (the same colour, hatched); untrusted trials are drawn paler. Gaps between bars
    are time a slot did not run a trial: scheduling, or waiting for the last trial.

    Args:
        records: Trial records with ``started_at``/``ended_at`` (wall-clock seconds) and
            ``train_seconds``/``eval_seconds``; records without times are left out.
        path: Output file (``.png``); parent directories are created.
        title: Figure title; the busy fraction of the slots is appended.

    Returns:
        The path written.
    """
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    lanes = timeline_lanes(records)
    out = _prepare_path(path)
    n_lanes = max((lane for lane, _ in lanes), default=-1) + 1
    fig = Figure(figsize=(9.0, 1.6 + 0.45 * max(n_lanes, 1)), dpi=150, layout="constrained")
    ax = fig.add_subplot()
    ax.set_xlabel("seconds since the first trial started")
    ax.set_yticks(range(n_lanes), [f"slot {i + 1}" for i in range(n_lanes)])
    ax.invert_yaxis()
    ax.grid(True, axis="x", alpha=0.3, linewidth=0.6)
    if not lanes:
        ax.set_title(title)
        ax.text(0.5, 0.5, NO_TRIALS_NOTE, transform=ax.transAxes, ha="center", va="center", fontsize=13, color="0.4")
        fig.savefig(out, format="png")
        return out
    t0 = min(r["started_at"] for _, r in lanes)
    span = max(r["ended_at"] for _, r in lanes) - t0
    busy = sum(r["ended_at"] - r["started_at"] for _, r in lanes)
    for lane, r in lanes:
        start, duration = r["started_at"] - t0, r["ended_at"] - r["started_at"]
        train, attack = max(0.0, r.get("train_seconds") or 0.0), max(0.0, r.get("eval_seconds") or 0.0)
        setup = max(0.0, duration - train - attack)
        color = defense_color(str(r.get("defense", "none")))
        alpha = 1.0 if r.get("trusted") else 0.45
        ax.barh(lane, setup, left=start, height=0.7, color="0.8", edgecolor="white", linewidth=0.5)
        ax.barh(lane, train, left=start + setup, height=0.7, color=color, alpha=alpha, edgecolor="white",
                linewidth=0.5)
        ax.barh(lane, attack, left=start + setup + train, height=0.7, color=color, alpha=alpha * 0.7,
                hatch="///", edgecolor="white", linewidth=0.5)
        if duration > 0.04 * span:
            ax.text(start + duration / 2, lane, f"#{r.get('number', '?')}", ha="center", va="center", fontsize=7)
    ax.set_xlim(0, span * 1.01 if span > 0 else 1)
    ax.set_title(f"{title} — slots busy {100 * busy / (n_lanes * span) if span > 0 else 100:.0f}% of {span:.0f} s")
    defenses = sorted({str(r.get("defense", "none")) for _, r in lanes})
    handles = [Patch(color="0.8", label="set-up")] + [Patch(color=defense_color(d), label=d) for d in defenses]
    handles.append(Patch(facecolor="white", edgecolor="0.3", hatch="///", label="attacks"))
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.35 if n_lanes < 3 else -0.15),
              ncol=min(len(handles), 10), fontsize=7, frameon=False)
    fig.savefig(out, format="png")
    logger.info("wrote timeline plot %s", out)
    return out
