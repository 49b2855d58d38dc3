"""Multi-objective asynchronous successive halving: the promotion rule, free of Ray.

MO-ASHA (Schmucker et al. 2021, "Multi-objective Asynchronous Successive Halving",
arXiv:2106.12639) keeps ASHA's rungs (Li et al. 2020) but orders the trials of a rung by a
multi-objective criterion instead of one metric: non-dominated sorting, ties inside a front
broken by NSGA-II's crowding distance (Deb et al. 2002), the selection the paper uses. The
single-metric ASHA would rank a study's trials on clean accuracy alone and stop exactly the
robust ones.

Decisions are ASHA's stop-or-continue form (as Ray Tune's ASHA takes them): a trial is judged
once, when it reaches a rung, against the trials already recorded there. It continues when
fewer than ``ceil(n / reduction_factor)`` of the rung's ``n`` trials (itself included) come
strictly before it in the order; the first trial at a rung always continues. Rungs lie strictly
below the trial's last epoch: a trial that reaches its last epoch always completes and is
evaluated, so the work of a full training is never thrown away at the finish line.

:class:`~study.orchestration.scheduler.MultiObjectiveASHA` wraps :class:`Rungs` for Ray Tune;
``robust-study bench search`` drives the same class without Ray.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from study.stopping import milestones

__all__ = ["Rungs", "crowding_distances", "dominates", "milestones", "non_dominated_ranks", "order_keys", "promoted"]

Point = Sequence[float]


def _oriented(point: Point, directions: Sequence[str]) -> tuple[float, ...]:
    """The point with every objective turned into one to maximise (NaN and missing: worst)."""
    out = []
    for value, direction in zip(point, directions, strict=True):
        v = float(value) if value is not None else math.nan
        if math.isnan(v):
            v = -math.inf
        elif direction == "min":
            v = -v
        out.append(v)
    return tuple(out)


def dominates(a: Point, b: Point) -> bool:
    """``a`` is at least as good as ``b`` everywhere and better somewhere (all maximised)."""
    return all(x >= y for x, y in zip(a, b, strict=True)) and any(x > y for x, y in zip(a, b, strict=True))


def non_dominated_ranks(points: Sequence[Point], directions: Sequence[str]) -> list[int]:
    """Front index of every point: 0 for the non-dominated ones, 1 once those are removed, ..."""
    oriented = [_oriented(p, directions) for p in points]
    ranks = [-1] * len(points)
    left = set(range(len(points)))
    rank = 0
    while left:
        front = {i for i in left if not any(dominates(oriented[j], oriented[i]) for j in left if j != i)}
        for i in front:
            ranks[i] = rank
        left -= front
        rank += 1
    return ranks


def crowding_distances(points: Sequence[Point], directions: Sequence[str]) -> list[float]:
    """NSGA-II crowding distance of each point within ``points`` (one front).

    Per objective the points are sorted; the two ends get infinity and every other point adds
    the gap between its neighbours divided by the objective's range (an objective whose values
    are all equal adds nothing).
    """
    oriented = [_oriented(p, directions) for p in points]
    n = len(points)
    distance = [0.0] * n
    if n == 0:
        return distance
    for m in range(len(directions)):
        order = sorted(range(n), key=lambda i: oriented[i][m])
        low, high = oriented[order[0]][m], oriented[order[-1]][m]
        distance[order[0]] = distance[order[-1]] = math.inf
        span = high - low
        if not math.isfinite(span) or span <= 0:
            continue
        for k in range(1, n - 1):
            distance[order[k]] += (oriented[order[k + 1]][m] - oriented[order[k - 1]][m]) / span
    return distance


def order_keys(points: Sequence[Point], directions: Sequence[str]) -> list[tuple[int, float]]:
    """(front index, crowding distance within that front) of each point: lower front first, then
    the larger distance (the less crowded point keeps the front spread)."""
    # A trial missing a number (NaN) is not evidence either way: it goes behind every complete
    # one instead of, say, sitting on the front for its other objective.
    finite = [i for i, p in enumerate(points) if all(math.isfinite(v) for v in _oriented(p, directions))]
    ranks = [-1] * len(points)
    for i, r in zip(finite, non_dominated_ranks([points[i] for i in finite], directions), strict=True):
        ranks[i] = r
    last = max(ranks, default=-1) + 1
    ranks = [last if r < 0 else r for r in ranks]
    distance = [0.0] * len(points)
    for rank in set(ranks) - {last}:
        members = [i for i, r in enumerate(ranks) if r == rank]
        for i, d in zip(members, crowding_distances([points[i] for i in members], directions), strict=True):
            distance[i] = d
    return list(zip(ranks, distance, strict=True))


def _ahead(keys: Sequence[tuple[int, float]], i: int) -> int:
    """How many points come strictly before point ``i`` (ties do not count against it)."""
    rank, distance = keys[i]
    return sum(1 for r, d in keys if r < rank or (r == rank and d > distance))


def promoted(points: Sequence[Point], directions: Sequence[str], reduction_factor: int) -> list[int]:
    """Indices of the points of one rung that would go on: fewer than ceil(n / rf) points ahead."""
    keys = order_keys(points, directions)
    quota = math.ceil(len(points) / reduction_factor)
    return [i for i in range(len(points)) if _ahead(keys, i) < quota]


class Rungs:
    """The rungs of one MO-ASHA bracket and the objective values recorded at each.

    ``decide(trial, t, values)`` is called with every intermediate result (``t``: the time
    attribute, e.g. completed epochs) and returns False when the trial should stop. Plain data
    throughout, so a scheduler holding it pickles with Tune's experiment state.
    """

    def __init__(self, directions: Sequence[str], grace: int, reduction_factor: int, last: int) -> None:
        if reduction_factor < 2 or grace < 1:
            raise ValueError(f"reduction_factor must be >= 2 and grace >= 1, got {reduction_factor}, {grace}")
        for d in directions:
            if d not in ("min", "max"):
                raise ValueError(f"direction {d!r} must be min or max")
        self.directions = list(directions)
        self.reduction_factor = reduction_factor
        self.recorded: dict[int, dict[str, tuple[float, ...]]] = {
            m: {} for m in milestones(grace, reduction_factor, last)
        }
        self.stopped: dict[str, int] = {}

    def decide(self, trial: str, t: float, values: Sequence[float]) -> bool:
        # Judged at the rung's own epoch only: the trial measures its robust accuracy there
        # (training.val_robust_epochs), not between rungs. A trial whose report at a rung never
        # arrived (resumed past it) is judged at the next one.
        rung = self.recorded.get(int(t)) if float(t).is_integer() else None
        if rung is None or trial in rung:  # between rungs, or judged here already
            return True
        rung[trial] = tuple(float(v) if v is not None else math.nan for v in values)
        ids = list(rung)
        keys = order_keys([rung[i] for i in ids], self.directions)
        go_on = _ahead(keys, ids.index(trial)) < math.ceil(len(ids) / self.reduction_factor)
        if not go_on:
            self.stopped[trial] = int(t)
        return go_on

    def summary(self) -> str:
        return ", ".join(f"rung {m}: {len(r)} recorded" for m, r in sorted(self.recorded.items())) or "no rungs"
