"""Pareto front and hypervolume against brute force (study/results/pareto.py).

The references below work in the original directions (no sign flipping), so they share no code
or trick with the implementation: an O(n^2) dominance check for the front, unit-cell counting on
integer coordinates and inclusion-exclusion over boxes for the hypervolume.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from study.results.pareto import hypervolume, hypervolume_history, pareto_front

SEEDS = range(150)


# -- brute-force references ------------------------------------------------------------------


def _at_least_as_good(a, b, directions) -> bool:
    triples = zip(a, b, directions, strict=True)
    return all((x >= y) if d == "max" else (x <= y) for x, y, d in triples)


def _strictly_better_somewhere(a, b, directions) -> bool:
    triples = zip(a, b, directions, strict=True)
    return any((x > y) if d == "max" else (x < y) for x, y, d in triples)


def brute_front(points, directions) -> list[int]:
    front = []
    for i, p in enumerate(points):
        if any(math.isnan(v) for v in p):
            continue
        dominated = any(
            _at_least_as_good(q, p, directions) and _strictly_better_somewhere(q, p, directions)
            for j, q in enumerate(points)
            if j != i and not any(math.isnan(v) for v in q)
        )
        if not dominated:
            front.append(i)
    return front


def grid_hypervolume(points, directions, reference) -> int:
    """Count the unit cells covered by some point's box (integer coordinates only)."""
    ranges = []
    for j, d in enumerate(directions):
        coords = [int(p[j]) for p in points] + [int(reference[j])]
        # A "min" box spans [p, ref], a "max" box [ref, p]: cells start at c and end at c + 1.
        ranges.append(range(min(coords), int(reference[j])) if d == "min"
                      else range(int(reference[j]), max(coords)))
    covered = 0
    for cell in itertools.product(*ranges):
        for p in points:
            if all((p[j] <= c) if d == "min" else (p[j] >= c + 1)
                   for j, (c, d) in enumerate(zip(cell, directions, strict=True))):
                covered += 1
                break
    return covered


def inclusion_exclusion_hypervolume(points, directions, reference) -> float:
    """Exact union volume of the boxes between each point and the reference (small n only)."""
    total = 0.0
    for r in range(1, len(points) + 1):
        for subset in itertools.combinations(points, r):
            volume = 1.0
            for j, d in enumerate(directions):
                if d == "min":
                    side = reference[j] - max(p[j] for p in subset)
                else:
                    side = min(p[j] for p in subset) - reference[j]
                volume *= max(side, 0.0)
            total += (-1) ** (r + 1) * volume
    return total


def _random_case(seed: int, max_n: int, max_m: int = 4, high: int = 5):
    rng = np.random.default_rng(seed)
    m = int(rng.integers(1, max_m + 1))
    n = int(rng.integers(0, max_n + 1))
    directions = [str(d) for d in rng.choice(["max", "min"], size=m)]
    # Few distinct values per objective: ties and exact duplicates are common.
    points = rng.integers(0, high + 1, size=(n, m)).astype(float)
    return rng, directions, points


# -- pareto_front ----------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_front_matches_brute_force_with_ties_duplicates_and_nan(seed):
    rng, directions, points = _random_case(seed, max_n=40)
    if len(points) and seed % 3 == 0:
        points[rng.integers(0, len(points), size=max(1, len(points) // 5)),
               rng.integers(0, points.shape[1])] = np.nan
    if seed % 2:
        points = points + rng.normal(scale=0.3, size=points.shape).round(1)
    assert pareto_front(points.tolist(), directions) == brute_front(points.tolist(), directions)


def test_front_keeps_identical_points_and_drops_dominated():
    points = [[0.9, 0.5], [0.9, 0.5], [0.8, 0.5], [0.5, 0.9], [0.9, 0.4]]
    assert pareto_front(points, ["max", "max"]) == [0, 1, 3]


def test_front_with_mixed_directions():
    # (accuracy max, seconds min): the slow accurate and the fast less accurate both survive.
    points = [[0.95, 100.0], [0.90, 10.0], [0.90, 20.0], [0.80, 100.0]]
    assert pareto_front(points, ["max", "min"]) == [0, 1]
    # Minimising accuracy and maximising time: (0.80, 100) beats everything.
    assert pareto_front(points, ["min", "max"]) == [3]


def test_front_never_contains_nan_points():
    points = [[math.nan, 2.0], [1.0, 1.0], [0.0, math.nan]]
    assert pareto_front(points, ["max", "max"]) == [1]
    assert pareto_front([[math.nan, math.nan]], ["min", "min"]) == []


def test_front_single_objective_keeps_all_ties_of_the_best():
    assert pareto_front([[3.0], [5.0], [5.0], [1.0]], ["max"]) == [1, 2]
    assert pareto_front([[3.0], [5.0], [5.0], [1.0]], ["min"]) == [3]


def test_front_of_nothing_is_empty_and_accepts_arrays():
    assert pareto_front([], ["max", "min"]) == []
    assert pareto_front(np.array([[1.0, 2.0], [2.0, 1.0]]), ("min", "min")) == [0, 1]


@pytest.mark.parametrize(
    ("points", "directions", "match"),
    [
        ([[1.0, 2.0]], ["max", "maximize"], "maximize"),
        ([[1.0, 2.0]], [], "non-empty"),
        ([[1.0, 2.0]], "max", "non-empty"),
        ([[1.0, 2.0]], ["max"], r"\(n, 1\)"),
        ([[1.0], [1.0, 2.0]], ["max", "max"], "sequence"),
        ([1.0, 2.0], ["max", "max"], r"\(n, 2\)"),
        ([["a", "b"]], ["max", "max"], "sequence"),
    ],
)
def test_front_rejects_bad_input(points, directions, match):
    with pytest.raises(ValueError, match=match):
        pareto_front(points, directions)


# -- hypervolume -----------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_hypervolume_matches_unit_cell_count_on_integer_points(seed):
    rng, directions, points = _random_case(seed, max_n=12)
    # Reference inside the coordinate range so some points contribute and some do not.
    reference = [float(rng.integers(0, 3)) if d == "max" else float(rng.integers(3, 7))
                 for d in directions]
    expected = grid_hypervolume(points.tolist(), directions, reference)
    assert hypervolume(points, directions, reference) == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("seed", range(60))
def test_hypervolume_matches_inclusion_exclusion_on_real_points(seed):
    rng = np.random.default_rng(1000 + seed)
    m = int(rng.integers(2, 5))
    n = int(rng.integers(1, 9))
    directions = [str(d) for d in rng.choice(["max", "min"], size=m)]
    points = rng.random((n, m))
    reference = [0.1 if d == "max" else 0.9 for d in directions]
    expected = inclusion_exclusion_hypervolume(points.tolist(), directions, reference)
    hv = hypervolume(points, directions, reference)
    assert hv == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_hypervolume_hand_computed_cases():
    # Staircase: widths 1, 1, 1 times heights 1, 2, 3.
    assert hypervolume([[1, 3], [2, 2], [3, 1]], ["min", "min"], [4, 4]) == pytest.approx(6.0)
    # Two accuracies vs (0, 0): 0.9*0.5 + 0.6*0.8 - 0.6*0.5.
    assert hypervolume([[0.9, 0.5], [0.6, 0.8]], ["max", "max"], [0, 0]) == pytest.approx(0.63)
    # 3D: boxes 3*3*1 and 2*2*3 overlapping in 2*2*1.
    assert hypervolume([[1, 1, 3], [2, 2, 1]], ["min"] * 3, [4, 4, 4]) == pytest.approx(17.0)
    # One objective: the distance from the best point to the reference.
    assert hypervolume([[2.0], [5.0]], ["max"], [1.0]) == pytest.approx(4.0)
    # Mixed: accuracy 0.8 (max, ref 0) at 30 s (min, ref 100): 0.8 * 70.
    assert hypervolume([[0.8, 30.0]], ["max", "min"], [0.0, 100.0]) == pytest.approx(56.0)


def test_hypervolume_ignores_points_not_strictly_better_than_reference_and_nan():
    directions, reference = ["max", "max"], [0.5, 0.5]
    base = hypervolume([[0.9, 0.9]], directions, reference)
    extra = [[0.5, 1.0], [1.0, 0.2], [math.nan, 1.0], [0.9, 0.9], [math.inf, 0.1]]
    assert hypervolume([[0.9, 0.9], *extra], directions, reference) == pytest.approx(base)
    assert hypervolume([], directions, reference) == 0.0
    assert hypervolume([[0.1, 0.1]], directions, reference) == 0.0


@pytest.mark.parametrize(
    ("points", "directions", "reference", "match"),
    [
        ([[1.0, 1.0]], ["min", "min"], [2.0], "2 values"),
        ([[1.0, 1.0]], ["min", "min"], [2.0, math.inf], "finite"),
        ([[1.0, 1.0]], ["min", "min"], [2.0, math.nan], "finite"),
        ([[1.0, -math.inf]], ["min", "min"], [2.0, 2.0], "finite points"),
        ([[1.0, 1.0]], ["min", "up"], [2.0, 2.0], "up"),
    ],
)
def test_hypervolume_rejects_bad_input(points, directions, reference, match):
    with pytest.raises(ValueError, match=match):
        hypervolume(points, directions, reference)


def test_hypervolume_of_a_few_hundred_points_in_3d_is_exact_and_quick():
    # All on the unit sphere's positive octant, so every point is on the front (worst case).
    rng = np.random.default_rng(7)
    points = np.abs(rng.normal(size=(300, 3)))
    points /= np.linalg.norm(points, axis=1, keepdims=True)
    hv = hypervolume(points, ["max"] * 3, [0, 0, 0])
    # Dominated region lies inside the octant of the unit ball (pi/6) and grows with n.
    assert 0.4 < hv < math.pi / 6
    assert hv > hypervolume(points[:150], ["max"] * 3, [0, 0, 0])


# -- hypervolume_history ---------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(60))
def test_history_is_monotone_and_equals_hypervolume_of_each_prefix(seed):
    rng, directions, points = _random_case(seed, max_n=15, max_m=3)
    if len(points) and seed % 4 == 0:
        points[rng.integers(0, len(points))] = np.nan
    reference = [0.0 if d == "max" else 6.0 for d in directions]
    history = hypervolume_history(points, directions, reference)
    assert len(history) == len(points)
    assert all(b >= a for a, b in itertools.pairwise(history))
    for i, value in enumerate(history):
        assert value == pytest.approx(hypervolume(points[: i + 1], directions, reference))


def test_history_hand_computed():
    points = [[1, 3], [5, 5], [2, 2], [math.nan, 1], [3, 1], [3, 1], [0.5, 0.5]]
    assert hypervolume_history(points, ["min", "min"], [4, 4]) == pytest.approx(
        [3.0, 3.0, 5.0, 5.0, 6.0, 6.0, 12.25]
    )
    assert hypervolume_history([], ["max"], [0.0]) == []
