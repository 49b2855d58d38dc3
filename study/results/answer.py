"""The study's short answer: per defense, the most robust model at a stated clean-accuracy floor.

A front answers "what is the best trade-off"; a reader choosing a defense asks "how robust can
this defense get without costing more than X points of clean accuracy, with which settings, at
what training cost". The answer reads verified numbers (strong attacks, test split) where the
defense has them, and says so when only the search's validation numbers exist.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["Answer", "answer_floor", "format_answer", "short_answer"]

# Without an explicit floor: within this many accuracy points of the study's best clean accuracy.
DEFAULT_FLOOR_MARGIN = 0.05
_OBJECTIVES = ("clean_accuracy", "robust_accuracy")


@dataclass(frozen=True)
class Answer:
    """One defense's line of the short answer."""

    defense: str
    number: int | None  # the trial; None when no trial of the defense clears the floor
    clean_accuracy: float | None
    robust_accuracy: float | None
    verified: bool  # test-split numbers of the final (strong) evaluation, not the search's validation numbers
    params: dict[str, Any]
    train_seconds: float | None
    trials: int  # completed trusted trials of the defense


def _numbers(record: Mapping[str, Any]) -> tuple[float, float, bool] | None:
    """(clean, robust, verified): the test-split numbers of a trusted verification, else the
    validation numbers of the search."""
    from study.results.records import stage_values

    final = record.get("final")
    if final and final.get("trusted"):
        clean, robust = stage_values(record, _OBJECTIVES, "final")
        if clean is not None and robust is not None:
            return float(clean), float(robust), True
    clean, robust = stage_values(record, _OBJECTIVES, "search")
    if clean is None or robust is None:
        return None
    return float(clean), float(robust), False


def answer_floor(records: Sequence[Mapping[str, Any]], floor: float | None) -> float:
    """The clean-accuracy floor: ``floor`` if given, else the best clean accuracy among the
    completed trusted trials minus :data:`DEFAULT_FLOOR_MARGIN`."""
    if floor is not None:
        return floor
    cleans = [n[0] for r in records if r.get("status") == "completed" and r.get("trusted")
              and (n := _numbers(r)) is not None]
    return max(0.0, max(cleans, default=0.0) - DEFAULT_FLOOR_MARGIN)


def short_answer(records: Sequence[Mapping[str, Any]], floor: float) -> list[Answer]:
    """Per defense (in order of best robust accuracy), the trial with the highest robust accuracy
    whose clean accuracy is at least ``floor``.

    Candidates are completed, trusted trials; a verified trial's final numbers are used (and must
    be trusted too), and within a defense a verified trial beats an unverified one, since search
    numbers come from a weaker attack and overstate robustness.
    """
    by_defense: dict[str, list[tuple[tuple[float, float, bool], Mapping[str, Any]]]] = {}
    for r in records:
        if r.get("status") != "completed" or not r.get("trusted"):
            continue
        numbers = _numbers(r)
        if numbers is not None:
            by_defense.setdefault(str(r.get("defense", "?")), []).append((numbers, r))
    answers = []
    for defense, trials in by_defense.items():
        above = [t for t in trials if t[0][0] >= floor]
        if not above:
            answers.append(Answer(defense, None, None, None, False, {}, None, len(trials)))
            continue
        (clean, robust, verified), r = max(above, key=lambda t: (t[0][2], t[0][1], t[0][0]))
        params = {k.split(".", 1)[-1]: v for k, v in (r.get("params") or {}).items() if k != "defense"}
        answers.append(Answer(defense, r.get("number"), clean, robust, verified, params,
                              r.get("train_seconds"), len(trials)))
    return sorted(answers, key=lambda a: (a.robust_accuracy is None, -(a.robust_accuracy or 0.0), a.defense))


def _short(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def format_answer(answers: Sequence[Answer], floor: float, explicit: bool) -> str:
    """The answer as text lines for a terminal."""
    how = "" if explicit else f" (the study's best minus {DEFAULT_FLOOR_MARGIN * 100:.0f} points)"
    lines = [f"Short answer: per defense, the most robust trial with clean accuracy >= {floor * 100:.1f}%{how}"]
    for a in answers:
        if a.number is None:
            lines.append(f"  {a.defense:<10} none of its {a.trials} trusted trial(s) reaches the floor")
            continue
        stage = "verified, test split" if a.verified else "unverified: search attack, validation split"
        seconds = f"{a.train_seconds:.0f}s training" if a.train_seconds is not None else "training time unknown"
        params = ", ".join(f"{k}={_short(v)}" for k, v in sorted(a.params.items())) or "defaults"
        lines.append(f"  {a.defense:<10} robust {a.robust_accuracy * 100:5.1f}% at clean {a.clean_accuracy * 100:5.1f}%"
                     f"  ({stage}, trial #{a.number}, {seconds})  {params}")
    if not answers:
        lines.append("  (no completed trusted trial)")
    return "\n".join(lines)
