"""The accuracy-robustness front: a PNG for papers and an interactive, offline HTML page."""

from __future__ import annotations

import html
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from study.results.plots.common import (
    DEFAULT_DIRECTIONS,
    DEFAULT_OBJECTIVES,
    FRONT_LABEL,
    NO_TRIALS_NOTE,
    UNTRUSTED_LABEL,
    _axis_label,
    _check_objectives,
    _front_of,
    _is_fraction,
    _params_text,
    _percent_decimals,
    _Point,
    _points,
    _prepare_path,
    _skipped_note,
    _staircase,
    defense_color,
)

logger = logging.getLogger(__name__)

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
    suffix = " — final attacks" if final_stage else " — search attacks"
    shown = "final" if final_stage else "search"
    ax.set_xlabel(_axis_label(objectives[0], shown) + suffix)
    ax.set_ylabel(_axis_label(objectives[1], shown) + suffix)
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
                                  markersize=10, linestyle="", label="search (val) → final (test)"))
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
                ax.annotate(shared_label(names), xy, xytext=(6, 4), textcoords="offset points", fontsize=7,
                            zorder=5)
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


def shared_label(names: Sequence[str], shown: int = 3) -> str:
    """One label for front trials with identical scores: "#3, #7", or past ``shown`` names
    "#0, #5, #8 +37 more" -- a study that reruns one configuration (random search over a small
    space) can put dozens of trials on one point, and their full list stretched the figure past
    what matplotlib's layout can fit (the axes collapsed to nothing). The HTML plot names each."""
    if len(names) <= shown + 1:
        return ", ".join(names)
    return f"{', '.join(names[:shown])} +{len(names) - shown} more"


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
        split = "test" if p.reevaluated else "val"
        line = f"{split} {esc(obj.replace('_', ' '))}: {p.values[k]:.2f}{unit}"
        if p.search_values is not None:
            line += f" (search, val: {p.search_values[k]:.2f}{unit})"
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
        fig.add_trace(go.Scatter(x=ax_, y=ay_, mode="lines", name="search (val) → final (test)",
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
    suffix = " — final attacks" if final_stage else " — search attacks"
    shown = "final" if final_stage else "search"
    fig.update_layout(
        title={"text": html.escape(title)},
        xaxis={"title": {"text": _axis_label(objectives[0], shown) + suffix},
               "ticksuffix": "%" if _is_fraction(objectives[0]) else ""},
        yaxis={"title": {"text": _axis_label(objectives[1], shown) + suffix},
               "ticksuffix": "%" if _is_fraction(objectives[1]) else ""},
        annotations=annotations, template="plotly_white", hovermode="closest",
        legend={"title": {"text": "defense"}},
    )
    # include_plotlyjs=True embeds the library: no CDN, works on offline clusters.
    fig.write_html(out, include_plotlyjs=True, full_html=True, include_mathjax=False)
    logger.info("wrote interactive Pareto-front plot %s", out)
    return out
