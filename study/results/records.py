"""The trial record: the one schema trials.json, MLflow, the fronts, the plots and the export read.

Torch-free on purpose: the Tune driver reads outcomes from reported metrics while trials run.
A record is a plain JSON-able dict (it is written to trials.json and read back by ``resume``,
``pareto``, ``export`` and ``sync``), typed here so its fields live in code rather than in a
docstring. Facts derived from a trial's flags are computed by :func:`failed_gates` and
:func:`is_trusted` only.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any, Literal, TypedDict

__all__ = [
    "FINAL_SPLIT",
    "SEARCH_SPLIT",
    "REACHED_SUFFIX",
    "FinalNumbers",
    "TrialRecord",
    "failed_gates",
    "flag_verdicts",
    "is_trusted",
    "labelled",
    "reached_values",
    "stage_values",
    "trial_outcome",
]

#: Metrics named ``<defense>_<setting>_reached`` hold the value a defense's training schedule
#: actually left in the model (``kwta_gamma_reached``), as opposed to the configured target.
REACHED_SUFFIX = "_reached"

Status = Literal["completed", "diverged", "failed", "stopped"]

SEARCH_SPLIT = "val"
"""Every number a search decision sees (Optuna, early stopping, the progress line) is measured here."""
FINAL_SPLIT = "test"
"""The held-out split only the verification of the front reads."""
SPLIT_METRICS = ("clean_accuracy", "robust_accuracy")
"""Objectives measured on a split (costs such as train_seconds are not)."""


def labelled(name: str, split: str) -> str:
    """The stored name of a metric measured on ``split``: ``val_clean_accuracy``; costs unchanged.

    Search numbers and verified numbers never share a key, so one can never pass for the other.
    """
    return f"{split}_{name}" if name in SPLIT_METRICS else name


def stage_values(record: Mapping[str, Any], objectives: Iterable[str], stage: str) -> list[Any]:
    """A record's objective values at ``stage``: ``search`` (validation split, search attacks) or
    ``final`` (test split, final attacks; costs stay the search's). None where a value is missing."""
    if stage == "search":
        return [record.get(labelled(o, SEARCH_SPLIT)) for o in objectives]
    if stage != "final":
        raise ValueError(f"stage {stage!r} must be 'search' or 'final'")
    final = record.get("final") or {}
    return [final.get(labelled(o, FINAL_SPLIT)) if o in SPLIT_METRICS else record.get(o) for o in objectives]


class FinalNumbers(TypedDict, total=False):
    """The strong re-evaluation of a front trial on the test split (``record["final"]``)."""

    split: str
    """Always ``test``."""
    test_clean_accuracy: float
    test_robust_accuracy: float
    trusted: bool
    flags: list[dict[str, Any]]
    flags_failed: list[str]
    attacks: list[dict[str, Any]]
    split_sizes: dict[str, int]
    """Samples in train, val and test, and how many of the test split were attacked (``evaluated``)."""
    seconds: float


class TrialRecord(TypedDict, total=False):
    """One trial of a study, as ``study.orchestration.runner.collect_records`` builds it."""

    trial_id: str
    number: int
    defense: str
    params: dict[str, Any]
    """The flat point Optuna proposed (``defense``, ``<defense>.<param>``, ``training.<param>``)."""
    status: Status
    reason: str
    trusted: bool
    flags_failed: list[str]
    """Ids of the integrity gates the search evaluation failed (:func:`failed_gates`)."""
    checkpoint: str | None
    node_ip: str | None
    resumed_from_epoch: int
    finished_at: float
    started_at: float | None
    ended_at: float | None
    report_seconds: float | None
    val_clean_accuracy: float | None
    """Search number: validation split, search attacks (what Optuna saw)."""
    val_robust_accuracy: float | None
    split_sizes: dict[str, int] | None
    """Samples in train, val and test, and how many of the val split the search attacked."""
    reproducibility: dict[str, Any]
    """Threads, determinism and environment the trial ran with (study.reproducibility; {} if unknown)."""
    train_seconds: float | None
    eval_seconds: float | None
    num_parameters: float | None
    final: FinalNumbers | None
    """The verification on the test split; None when it was tried and failed (see final_error)."""
    final_error: str
    verified: bool | None
    """True: verified on the test split; False: on the search front but its verification failed;
    None: not verified (not on the search front, or ``verify: false``)."""
    reached: dict[str, float]
    """Values the training schedule reached (``kwta_gamma_reached``); see :func:`reached_values`."""
    on_front: bool
    on_final_front: bool


def failed_gates(flags: Iterable[Mapping[str, Any]]) -> list[str]:
    """Ids of the flags that are gates and did not pass, in order (the one definition)."""
    return [str(f["id"]) for f in flags if f.get("gate") and not f.get("passed")]


#: What readers of a trial's Tune result use of each flag (trusted, failed gates, MLflow's flag tags).
_VERDICT_KEYS = ("id", "name", "passed", "gate")


def flag_verdicts(flags: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Each flag's verdict without what it measured (``values``, ``message``).

    Tune keeps a trial's final result twice in its study snapshot (the last result, and the
    checkpoint's, pickled and hex-encoded), rewritten after every finished trial; the flags'
    values and messages were 3.2 KB of a demo trial's 4.9 KB result. They stay in full in the
    trial's checkpoint (``result.json``, written by ``save_trial``).
    """
    return [{k: f[k] for k in _VERDICT_KEYS if k in f} for f in flags]


def is_trusted(flags: Iterable[Mapping[str, Any]]) -> bool:
    """Every gate passed: the evaluation's number can stand on a front."""
    return not failed_gates(flags)


def reached_values(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The ``*_reached`` entries of a trial's final metrics."""
    return {k: float(v) for k, v in metrics.items() if k.endswith(REACHED_SUFFIX) and isinstance(v, (int, float))}


def trial_outcome(metrics: Mapping[str, Any] | None, raised: bool) -> dict[str, Any]:
    """``status``, ``trusted`` and ``failed_gates`` of a trial from its last reported metrics.

    Named once for every place that records it (trials.json, Optuna, MLflow). Only the final
    report (``final`` set) carries a verdict; without one the trial either raised (``failed``) or
    was cut short by the scheduler (``stopped``), and neither is trusted.
    """
    if not metrics or not metrics.get("final"):
        return {"status": "failed" if raised else "stopped", "trusted": False, "failed_gates": []}
    flags = json.loads(metrics.get("flags_json") or "[]")
    return {"status": metrics.get("status"), "trusted": bool(metrics.get("trusted")),
            "failed_gates": failed_gates(flags)}
