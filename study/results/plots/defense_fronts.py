"""Each defense's own front beside the overall one: what every defense buys, not only the winners.

The overall front of a study shows the defenses that win; a reader deciding whether to use a
given defense needs its own trade-off curve too. One axes, one colour per defense (the colour of
every other plot): each defense's trials and the staircase through its own front, with the overall
front dashed in black on top.
"""

from __future__ import annotations

import html
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from study.results import pareto
from study.results.plots.common import (
    DEFAULT_DIRECTIONS,
    DEFAULT_OBJECTIVES,
    _axis_label,
    _check_objectives,
    _is_fraction,
    _Point,
    _points,
    _prepare_path,
    _staircase,
    defense_color,
)

logger = logging.getLogger(__name__)

OVERALL_LABEL = "overall front"


def _groups(
    records: Sequence[Mapping[str, Any]], objectives: tuple[str, str], directions: tuple[str, str], stage: str
) -> tuple[list[_Point], dict[str, list[_Point]], list[_Point]]:
    points, _ = _points(records, objectives, stage)
    by_index = {p.index: p for p in points}
    fronts = pareto.defense_fronts(records, objectives, directions, stage)
    per_defense = {d: [by_index[i] for i in idx if i in by_index] for d, idx in fronts.items()}
    overall = [by_index[i] for i in pareto.front_of_records(records, objectives, directions, stage) if i in by_index]
    return points, per_defense, overall


def _label(defense: str) -> str:
    return "undefended (none)" if defense == "none" else defense


def plot_defense_fronts_png(
    records: Sequence[Mapping[str, Any]],
    path: str | Path,
    *,
    title: str,
    objectives: Sequence[str] = DEFAULT_OBJECTIVES,
    directions: Sequence[str] = DEFAULT_DIRECTIONS,
    stage: str = "search",
) -> Path:
    """Every defense's trials and its own front (its colour), the overall front dashed black."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import PercentFormatter

    objectives, directions = _check_objectives(objectives, directions, stage)
    points, per_defense, overall = _groups(records, objectives, directions, stage)
    out = _prepare_path(path)
    fig = Figure(figsize=(8.0, 5.6), dpi=150, layout="constrained")
    ax = fig.add_subplot()
    ax.set_title(title)
    final = any(p.reevaluated for p in points)
    ax.set_xlabel(_axis_label(objectives[0], "final" if final else "search"))
    ax.set_ylabel(_axis_label(objectives[1], "final" if final else "search"))
    for axis, obj in ((ax.xaxis, objectives[0]), (ax.yaxis, objectives[1])):
        if _is_fraction(obj):
            axis.set_major_formatter(PercentFormatter(xmax=100, decimals=0))
    ax.grid(True, alpha=0.3, linewidth=0.6)
    for defense in sorted({str(p.record.get("defense", "?")) for p in points}, key=lambda d: (d != "none", d)):
        color = defense_color(defense)
        mine = [p for p in points if str(p.record.get("defense", "?")) == defense]
        ax.scatter([p.values[0] for p in mine], [p.values[1] for p in mine], c=color, s=18, alpha=0.35,
                   marker="o", linewidths=0)
        front = per_defense.get(defense, [])
        if front:
            xs, ys = _staircase([p.values for p in front], directions)
            ax.plot(xs, ys, color=color, linewidth=1.8, marker="o", markersize=5, label=_label(defense))
        else:
            ax.scatter([], [], c=color, label=_label(defense) + " (no trusted trial)")
    if overall:
        xs, ys = _staircase([p.values for p in overall], directions)
        ax.plot(xs, ys, color="black", linewidth=1.2, linestyle="--", label=OVERALL_LABEL, zorder=5)
    if final:
        # The faint points are the trials that were not verified (or untrusted): search numbers.
        ax.scatter([], [], c="0.6", s=18, alpha=0.35, label="faint: not verified (validation numbers)")
    if not points:
        ax.text(0.5, 0.5, "no completed trials", transform=ax.transAxes, ha="center", va="center", color="0.4")
    else:
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False, fontsize=8, borderaxespad=0.0)
    fig.savefig(out, format="png", bbox_inches="tight", pad_inches=0.1)
    logger.info("wrote per-defense fronts %s (%d defenses)", out, len(per_defense))
    return out


def plot_defense_fronts_html(
    records: Sequence[Mapping[str, Any]],
    path: str | Path,
    *,
    title: str,
    objectives: Sequence[str] = DEFAULT_OBJECTIVES,
    directions: Sequence[str] = DEFAULT_DIRECTIONS,
    stage: str = "search",
) -> Path:
    """Interactive :func:`plot_defense_fronts_png`: click a defense in the legend to hide it;
    hovering a front point shows its trial number and hyperparameters. plotly.js is embedded."""
    import plotly.graph_objects as go

    from study.results.plots.common import _params_text

    objectives, directions = _check_objectives(objectives, directions, stage)
    points, per_defense, overall = _groups(records, objectives, directions, stage)
    out = _prepare_path(path)
    shown = "final" if any(p.reevaluated for p in points) else "search"
    fig = go.Figure()
    for defense in sorted({str(p.record.get("defense", "?")) for p in points}, key=lambda d: (d != "none", d)):
        color = defense_color(defense)
        mine = [p for p in points if str(p.record.get("defense", "?")) == defense]
        fig.add_trace(go.Scatter(
            x=[p.values[0] for p in mine], y=[p.values[1] for p in mine], mode="markers",
            name=_label(defense), legendgroup=defense, marker={"color": color, "size": 7, "opacity": 0.4},
            hovertext=[f"trial {html.escape(str(p.record.get('number', p.index)))}: "
                       + html.escape(_params_text(p.record.get("params"), ", ")) for p in mine],
            hoverinfo="text",
        ))
        front = per_defense.get(defense, [])
        if front:
            xs, ys = _staircase([p.values for p in front], directions)
            fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines+markers", name=f"{_label(defense)} front",
                                     legendgroup=defense, showlegend=False,
                                     line={"color": color, "width": 2}, hoverinfo="skip"))
    if overall:
        xs, ys = _staircase([p.values for p in overall], directions)
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", name=OVERALL_LABEL,
                                 line={"color": "black", "width": 1.5, "dash": "dash"}, hoverinfo="skip"))
    fig.update_layout(
        title={"text": html.escape(title)},
        xaxis={"title": {"text": _axis_label(objectives[0], shown)}, "ticksuffix": "%" if _is_fraction(objectives[0]) else ""},
        yaxis={"title": {"text": _axis_label(objectives[1], shown)}, "ticksuffix": "%" if _is_fraction(objectives[1]) else ""},
        template="plotly_white", hovermode="closest", legend={"title": {"text": "defense"}},
    )
    fig.write_html(out, include_plotlyjs=True, full_html=True, include_mathjax=False)
    logger.info("wrote interactive per-defense fronts %s", out)
    return out
