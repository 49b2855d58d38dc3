"""What every plot shares: objectives and their scaling, colours per defense, the points and the front."""

from __future__ import annotations

import logging
import math
import zlib
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from study.results import pareto

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
    record: Mapping[str, Any], objectives: tuple[str, str], where: str, stage: str = "search"
) -> tuple[float, float] | None:
    """Both plotted objective values of a record at ``stage`` (validation numbers for the search,
    test numbers for the final stage: study.results.records.stage_values); None if one is missing."""
    from study.results.records import stage_values

    vx, vy = stage_values(record, objectives, stage)
    x = _scaled(objectives[0], vx, where)
    y = _scaled(objectives[1], vy, where)
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
            final_vals = _pair(r, objectives, f"{where} final", "final")
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
    # The front itself comes from the one shared rule (study.results.pareto.front_of_records).
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
    on the front); the front among them comes from :func:`study.results.pareto.pareto_front`. With
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


def _axis_label(objective: str, stage: str = "search") -> str:
    from study.results.records import FINAL_SPLIT, SEARCH_SPLIT, labelled

    label = labelled(objective, FINAL_SPLIT if stage == "final" else SEARCH_SPLIT).replace("_", " ")
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
