"""A front trial's verification (test split, final attacks) on its own MLflow run.

The search numbers reach a trial's run while it runs (``val_...``); the verification happens after
the search, in the driver. Its numbers, flags and split sizes are added to the same run, named
``test_...``, so a run shows both and says whether it was verified: tag ``verified`` is ``true``,
or ``false`` with ``verification_error`` when the verification of a front trial failed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from study.results.records import FINAL_SPLIT, labelled


def verification_entries(record: Mapping[str, Any]) -> tuple[list[Any], list[Any]]:
    """The MLflow metrics and tags of one record's verification; nothing if none was tried.

    The timestamp is the trial's own (``finished_at``), so logging a record twice (live, then
    ``robust-study sync``) stores each metric once.
    """
    from mlflow.entities import Metric, RunTag

    if record.get("verified") is None:
        return [], []
    final = record.get("final")
    if not record.get("verified") or not final:
        reason = str(record.get("final_error") or "verification failed")
        return [], [RunTag("verified", "false"), RunTag("verification_error", reason[:5000])]
    stamp = int(float(record.get("finished_at") or 0) * 1000)
    values = {
        labelled("clean_accuracy", FINAL_SPLIT): final.get(labelled("clean_accuracy", FINAL_SPLIT)),
        labelled("robust_accuracy", FINAL_SPLIT): final.get(labelled("robust_accuracy", FINAL_SPLIT)),
        "verify_seconds": final.get("seconds"),
        **{f"{FINAL_SPLIT}_robust_acc_{a['name']}": a.get("accuracy") for a in final.get("attacks") or []},
    }
    metrics = [Metric(k, float(v), stamp, 0) for k, v in values.items() if isinstance(v, (int, float))]
    tags = [RunTag("verified", "true"), RunTag(f"{FINAL_SPLIT}_trusted", str(bool(final.get("trusted"))))]
    for flag in final.get("flags") or []:
        tags.append(RunTag(f"{FINAL_SPLIT}_flag.{flag['id']}", "pass" if flag.get("passed") else "FAIL"))
    sizes = dict(final.get("split_sizes") or {})
    if "evaluated" in sizes:
        tags.append(RunTag(f"{FINAL_SPLIT}_samples_attacked", str(sizes.pop("evaluated"))))
    tags += [RunTag(f"split.{name}", str(size)) for name, size in sizes.items()]
    return metrics, tags


def log_verification(runs: Any, records: Iterable[Mapping[str, Any]]) -> None:
    """Add each tried verification to its trial's run (``runs``: study.tracking.replay._Runs)."""
    for record in records:
        metrics, tags = verification_entries(record)
        if not (metrics or tags):
            continue
        runs.client.log_batch(runs.run_id(str(record["trial_id"])), metrics=metrics, tags=tags)
