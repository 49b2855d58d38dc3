"""Pareto front and hypervolume of study results, as pure functions.

Objectives come with a direction each ("max" for accuracies, "min" for costs). Internally every
objective is turned into one to minimise by negating the "max" ones, so one dominance rule and one
hypervolume algorithm serve every mix of directions.

Conventions:
    * A point dominates another if it is at least as good in every objective and strictly better
      in one. Identical points do not dominate each other, so duplicates on the front are all
      kept (two trials with the same numbers are both worth reporting).
    * A point with a NaN objective (a failed or diverged trial) is never on the front and adds
      nothing to the hypervolume; infinities compare as usual in the front.
    * Hypervolume is the Lebesgue measure of the region dominated by the points and bounded by
      the reference point; a point contributes only if it is strictly better than the reference
      in every objective.

References: Zitzler, Thiele, "Multiobjective optimization using evolutionary algorithms -- a
comparative case study" (PPSN 1998) for the hypervolume indicator; While, Hingston, Barone,
Huband, "A faster algorithm for calculating hypervolume" (IEEE TEC 2006) for slicing
(HSO), used here for three or more objectives.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["DIRECTIONS", "hypervolume", "hypervolume_history", "pareto_front"]

DIRECTIONS = ("max", "min")


def _as_minimisation(
    points: Sequence[Sequence[float]] | np.ndarray, directions: Sequence[str]
) -> tuple[np.ndarray, np.ndarray]:
    """Validate and return (points as an (n, m) float array to minimise, sign per objective)."""
    if isinstance(directions, str) or len(directions) == 0:
        raise ValueError(f"directions={directions!r} must be a non-empty sequence of 'max'/'min'")
    bad = [d for d in directions if d not in DIRECTIONS]
    if bad:
        raise ValueError(f"directions {bad!r} must each be 'max' or 'min'")
    m = len(directions)
    try:
        arr = np.asarray(points, dtype=float)
    except (TypeError, ValueError) as e:
        raise ValueError(f"points must be a sequence of {m}-number sequences: {e}") from None
    if arr.size == 0:
        arr = arr.reshape(0, m)
    if arr.ndim != 2 or arr.shape[1] != m:
        raise ValueError(
            f"points of shape {arr.shape} must be (n, {m}): one value per direction "
            f"{list(directions)}"
        )
    sign = np.array([-1.0 if d == "max" else 1.0 for d in directions])
    return arr * sign, sign


def _front_mask(pts: np.ndarray) -> np.ndarray:
    """Boolean mask of the non-dominated rows of a NaN-free minimisation array."""
    n = len(pts)
    mask = np.zeros(n, dtype=bool)
    if n == 0:
        return mask
    # If a dominates b then a precedes b lexicographically, so scanning in lexicographic order
    # each point only needs checking against the front found so far (a dominated dominator is
    # itself dominated by a front member: dominance is transitive).
    order = np.lexsort(pts.T[::-1])
    front = np.empty((0, pts.shape[1]))
    for i in order:
        p = pts[i]
        if len(front) and np.any(np.all(front <= p, axis=1) & np.any(front < p, axis=1)):
            continue
        mask[i] = True
        front = np.vstack([front, p])
    return mask


def pareto_front(
    points: Sequence[Sequence[float]] | np.ndarray, directions: Sequence[str]
) -> list[int]:
    """Indices of the non-dominated points, in increasing order.

    Args:
        points: n points with one value per objective, shape (n, m).
        directions: per objective, "max" or "min" (m >= 1).

    Returns:
        Sorted indices into ``points`` of the Pareto front. Identical points are all kept;
        points containing NaN are never included.

    Raises:
        ValueError: for a direction other than "max"/"min" or points not of shape (n, m).

    Example:
        >>> pareto_front([[0.9, 0.1], [0.8, 0.5], [0.7, 0.4]], ["max", "max"])
        [0, 1]
    """
    pts, _ = _as_minimisation(points, directions)
    valid = ~np.isnan(pts).any(axis=1)
    idx = np.flatnonzero(valid)
    mask = _front_mask(pts[valid])
    return [int(i) for i in idx[mask]]


def _check_reference(reference: Sequence[float], sign: np.ndarray) -> np.ndarray:
    try:
        ref = np.asarray(reference, dtype=float)
    except (TypeError, ValueError) as e:
        raise ValueError(f"reference={reference!r} must be {len(sign)} numbers: {e}") from None
    if ref.shape != sign.shape:
        raise ValueError(f"reference={reference!r} must have {len(sign)} values, one per objective")
    if not np.all(np.isfinite(ref)):
        raise ValueError(f"reference={reference!r} must be finite")
    return ref * sign


def _contributing(pts: np.ndarray, ref: np.ndarray, sign: np.ndarray) -> np.ndarray:
    """Rows (minimisation) strictly better than the reference in every objective."""
    pts = pts[~np.isnan(pts).any(axis=1)]
    # NaN rows and rows worse than the reference in some objective (even +inf) drop out; a
    # remaining infinity is -inf, which would make the volume infinite.
    pts = pts[np.all(pts < ref, axis=1)]
    infinite = np.isinf(pts).any(axis=1)
    if infinite.any():
        bad = (pts[infinite][0] * sign).tolist()
        raise ValueError(f"hypervolume needs finite points, got {bad}")
    return pts


def _hv2d(pts: np.ndarray, ref: np.ndarray) -> float:
    """Exact 2D hypervolume of points (all strictly better than ref) by a sweep over x."""
    order = np.lexsort((pts[:, 1], pts[:, 0]))
    xs, ys = pts[order, 0], pts[order, 1]
    # Keep the staircase: points whose y is below every y seen at smaller (or equal) x.
    best = np.minimum.accumulate(ys)
    keep = np.ones(len(ys), dtype=bool)
    keep[1:] = ys[1:] < best[:-1]
    xs, ys = xs[keep], ys[keep]
    widths = np.diff(np.append(xs, ref[0]))
    return float(np.sum(widths * (ref[1] - ys)))


def _hv(pts: np.ndarray, ref: np.ndarray) -> float:
    """Exact hypervolume of points (all strictly better than ref), any dimension."""
    if len(pts) == 0:
        return 0.0
    m = pts.shape[1]
    if m == 1:
        return float(ref[0] - pts[:, 0].min())
    if m == 2:
        return _hv2d(pts, ref)
    # HSO: slice along the last objective. Between consecutive distinct values z_i < z_{i+1}
    # the cross-section is the (m-1)-D hypervolume of the points with last value <= z_i.
    pts = pts[_front_mask(pts)]
    pts = pts[np.argsort(pts[:, -1], kind="stable")]
    z = pts[:, -1]
    bounds = np.append(z, ref[-1])
    total = 0.0
    for i in range(len(pts)):
        depth = bounds[i + 1] - z[i]
        if depth <= 0:
            continue  # the next point has the same last value: its slice starts there
        # _hv drops the section's dominated points itself (sweep in 2D, front mask above).
        total += depth * _hv(pts[: i + 1, :-1], ref[:-1])
    return total


def hypervolume(
    points: Sequence[Sequence[float]] | np.ndarray,
    directions: Sequence[str],
    reference: Sequence[float],
) -> float:
    """Exact hypervolume dominated by ``points`` with respect to ``reference``.

    Args:
        points: n points with one value per objective, shape (n, m).
        directions: per objective, "max" or "min".
        reference: the reference (nadir-side) point, finite; e.g. (0, 0) for two accuracies.
            Points not strictly better than it in every objective contribute nothing.

    Returns:
        The volume (area in 2D) of the union of the boxes between each point and the reference.
        2D uses a sweep (O(n log n)); three or more objectives use HSO slicing, fine for a few
        hundred points in 3-4 objectives.

    Raises:
        ValueError: for bad directions or shapes, a non-finite reference, or infinite values in a
            point that is better than the reference.

    Example:
        >>> hypervolume([[1, 3], [2, 2], [3, 1]], ["min", "min"], [4, 4])
        6.0
    """
    pts, sign = _as_minimisation(points, directions)
    ref = _check_reference(reference, sign)
    return _hv(_contributing(pts, ref, sign), ref)


def hypervolume_history(
    points_in_trial_order: Sequence[Sequence[float]] | np.ndarray,
    directions: Sequence[str],
    reference: Sequence[float],
) -> list[float]:
    """Hypervolume of the first 1, 2, ..., n points: how a study's front improved per trial.

    Args:
        points_in_trial_order: the trials' objective values in completion order, shape (n, m).
        directions: per objective, "max" or "min".
        reference: as for :func:`hypervolume`.

    Returns:
        n non-decreasing values; entry i is the hypervolume of points 0..i. A point that is
        NaN, not better than the reference or dominated by earlier points repeats the previous
        value without recomputation.
    """
    pts, sign = _as_minimisation(points_in_trial_order, directions)
    ref = _check_reference(reference, sign)
    history: list[float] = []
    front = np.empty((0, pts.shape[1]))
    current = 0.0
    for p in pts:
        if len(_contributing(p[None, :], ref, sign)) == 0 or (
            len(front) and np.any(np.all(front <= p, axis=1))
        ):
            # NaN, not better than the reference, or weakly dominated (a duplicate included):
            # the dominated region does not change.
            history.append(current)
            continue
        # Add p's exclusive contribution: its box minus the part already covered, which is the
        # hypervolume of the front clipped to p's box (WFG's "limit set"; While, Bradstreet,
        # Barone, IEEE TEC 2012). Much cheaper than recomputing the whole front.
        covered = _hv(np.maximum(front, p), ref) if len(front) else 0.0
        current += max(0.0, float(np.prod(ref - p)) - covered)
        front = np.vstack([front[~np.all(p <= front, axis=1)], p])
        history.append(current)
    return history


def front_of_records(
    records: Sequence[Mapping[str, Any]],
    objectives: Sequence[str],
    directions: Sequence[str],
    stage: str = "search",
) -> list[int]:
    """Indices of the trial records on the Pareto front: the one rule every table and plot uses.

    ``objectives`` are the spec's names (``clean_accuracy``); the values are read per stage
    (:func:`study.results.records.stage_values`). Candidates are completed, trusted trials (a trial that
    failed an integrity gate is never on the front). ``stage="search"`` compares the validation
    numbers of the search attacks. ``stage="final"`` compares only verified records, at their test
    numbers (objectives the final evaluation does not measure, such as training cost, keep the
    search value), trusted at both stages; without any verified record it is empty: search numbers
    never stand in for verified ones.
    """
    from study.results.records import stage_values

    if stage not in ("search", "final"):
        raise ValueError(f"stage {stage!r} must be 'search' or 'final'")
    indices, points = [], []
    for i, r in enumerate(records):
        if r.get("status") != "completed" or not r.get("trusted"):
            continue
        if stage == "final":
            final = r.get("final")
            if not final or not final.get("trusted"):
                continue
        point = stage_values(r, objectives, stage)
        if any(v is None or not math.isfinite(float(v)) for v in point):
            continue
        indices.append(i)
        points.append([float(v) for v in point])
    if not points:
        return []
    return sorted(indices[j] for j in pareto_front(points, directions))


def defense_fronts(
    records: Sequence[Mapping[str, Any]],
    objectives: Sequence[str],
    directions: Sequence[str],
    stage: str = "search",
) -> dict[str, list[int]]:
    """Each defense's own front: indices into ``records``, by :func:`front_of_records` on that
    defense's trials alone (what the defense buys, whatever the other defenses reach)."""
    by_defense: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        by_defense.setdefault(str(r.get("defense", "?")), []).append(i)
    fronts = {}
    for defense, idx in sorted(by_defense.items()):
        sub = [records[i] for i in idx]
        on = front_of_records(sub, objectives, directions, stage)
        if on:
            fronts[defense] = [idx[j] for j in on]
    return fronts
