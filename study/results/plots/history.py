"""How a study went: hypervolume per trial (search efficiency) and the timeline of its slots."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from study.results.plots.common import _EXTRA_COLORS, NO_TRIALS_NOTE, _prepare_path, defense_color

logger = logging.getLogger(__name__)

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
            :func:`study.results.pareto.hypervolume_history`); may be empty.
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
    and attacks (the same colour, hatched); untrusted trials are drawn paler, and trials the
    scheduler stopped early are dotted (they trained some epochs and were never attacked). Gaps
    between bars are time a slot did not run a trial: scheduling, or waiting for the last trial.

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
        stopped = r.get("status") == "stopped"
        ax.barh(lane, setup, left=start, height=0.7, color="0.8", edgecolor="white", linewidth=0.5)
        ax.barh(lane, train, left=start + setup, height=0.7, color=color, alpha=alpha, edgecolor="white",
                linewidth=0.5, hatch="..." if stopped else None)
        ax.barh(lane, attack, left=start + setup + train, height=0.7, color=color, alpha=alpha * 0.7,
                hatch="///", edgecolor="white", linewidth=0.5)
        if duration > 0.04 * span:
            ax.text(start + duration / 2, lane, f"#{r.get('number', '?')}", ha="center", va="center", fontsize=7)
    ax.set_xlim(0, span * 1.01 if span > 0 else 1)
    ax.set_title(f"{title} — slots busy {100 * busy / (n_lanes * span) if span > 0 else 100:.0f}% of {span:.0f} s")
    defenses = sorted({str(r.get("defense", "none")) for _, r in lanes})
    handles = [Patch(color="0.8", label="set-up")] + [Patch(color=defense_color(d), label=d) for d in defenses]
    handles.append(Patch(facecolor="white", edgecolor="0.3", hatch="///", label="attacks"))
    if any(r.get("status") == "stopped" for _, r in lanes):
        handles.append(Patch(facecolor="white", edgecolor="0.3", hatch="...", label="stopped early"))
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.35 if n_lanes < 3 else -0.15),
              ncol=min(len(handles), 10), fontsize=7, frameon=False)
    fig.savefig(out, format="png")
    logger.info("wrote timeline plot %s", out)
    return out
