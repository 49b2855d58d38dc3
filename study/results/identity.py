"""One trial, one id, one record: the rule trials.json, MLflow replay and the audit share.

A trial keeps its Ray Tune id across every attempt: retries after a worker died, and the
continuation after an interrupted driver is resumed (``Tuner.restore`` keeps the ids of unfinished
and errored trials). Whatever reads Tune's output must therefore count a trial once, whichever
attempt it saw first, and keep the attempt that got furthest: the one that sent its final report.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

R = TypeVar("R", bound=Mapping[str, Any])

__all__ = ["duplicated", "one_record_per_trial", "trial_id_from_dir"]

log = logging.getLogger(__name__)


def trial_id_from_dir(name: str) -> str | None:
    """The trial id in a Tune trial folder's name (``_trainable_<id>_<n>_<params>_<date>``), or None.

    Tune names the folder after the trainable, which is the function ``_trainable`` here (hence
    the leading underscore and the id in third place once split on ``_``).
    """
    parts = name.split("_")
    return parts[2] if name.startswith("_") and len(parts) > 2 and parts[2] else None


def duplicated(ids: Iterable[Any]) -> list[str]:
    """The ids that occur more than once, sorted."""
    seen: set[str] = set()
    twice: set[str] = set()
    for trial_id in ids:
        (twice if str(trial_id) in seen else seen).add(str(trial_id))
    return sorted(twice)


def _completeness(record: Mapping[str, Any]) -> tuple[int, float]:
    # A final report beats any attempt without one (only final reports carry the search
    # numbers); between equals, the attempt that ended later is the newer one.
    final = record.get("val_clean_accuracy") is not None
    return (1 if final else 0, float(record.get("finished_at") or 0.0))


def one_record_per_trial(records: list[R]) -> tuple[list[R], list[str]]:
    """Keep one record per trial id: its most complete one (the final report's); return the kept
    records in their order and the ids that had more than one.

    Never drops a trial: every id present in ``records`` is present in the result.
    """
    best: dict[str, R] = {}
    for record in records:
        trial_id = str(record["trial_id"])
        kept = best.get(trial_id)
        if kept is None or _completeness(record) >= _completeness(kept):
            best[trial_id] = record
    twice = duplicated(r["trial_id"] for r in records)
    if twice:
        log.warning(
            "trial(s) %s appeared more than once in Ray Tune's results; each is recorded once, "
            "with its most complete result",
            ", ".join(twice),
        )
    kept_ids = {id(r) for r in best.values()}
    return [r for r in records if id(r) in kept_ids], twice
