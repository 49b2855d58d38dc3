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

__all__ = ["FinalNumbers", "TrialRecord", "failed_gates", "is_trusted", "trial_outcome"]

Status = Literal["completed", "diverged", "failed", "stopped"]


class FinalNumbers(TypedDict, total=False):
    """The strong re-evaluation of a front trial (``record["final"]``)."""

    clean_accuracy: float
    robust_accuracy: float
    trusted: bool
    flags_failed: list[str]
    attacks: list[dict[str, Any]]
    seconds: float
    error: str


class TrialRecord(TypedDict, total=False):
    """One trial of a study, as ``study.runner.collect_records`` builds it."""

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
    reproducibility: dict[str, Any]
    """Threads, determinism and environment the trial ran with (study.reproducibility; {} if unknown)."""
    clean_accuracy: float | None
    robust_accuracy: float | None
    train_seconds: float | None
    eval_seconds: float | None
    num_parameters: float | None
    final: FinalNumbers
    on_front: bool
    on_final_front: bool


def failed_gates(flags: Iterable[Mapping[str, Any]]) -> list[str]:
    """Ids of the flags that are gates and did not pass, in order (the one definition)."""
    return [str(f["id"]) for f in flags if f.get("gate") and not f.get("passed")]


def is_trusted(flags: Iterable[Mapping[str, Any]]) -> bool:
    """Every gate passed: the evaluation's number can stand on a front."""
    return not failed_gates(flags)


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
