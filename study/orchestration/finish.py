"""The study's end: verify the front with the strong attacks, recompute it, write and log the
artifacts, and stop the Ray the study started beside them."""

from __future__ import annotations

import logging
from typing import Any

from study.spec import StudySpec

log = logging.getLogger(__name__)


def front_records(records: list[dict[str, Any]], objectives: list[str], directions: list[str],
                  stage: str = "search") -> list[dict[str, Any]]:
    """The records on the front (trusted, completed; see study.results.pareto.front_of_records)."""
    from study.results.pareto import front_of_records

    return [records[i] for i in front_of_records(records, objectives, directions, stage)]


def _defense_front_records(spec: StudySpec, records: list[dict[str, Any]], front: list[dict[str, Any]]) -> list:
    """Each defense's own front (records not already on the overall front), when the spec asks
    for them to be verified too."""
    if not spec.verify_defense_fronts:
        return []
    from study.results.pareto import defense_fronts

    on_front = {id(r) for r in front}
    wanted = {i for idx in defense_fronts(records, spec.objectives, spec.directions).values() for i in idx}
    return [records[i] for i in sorted(wanted) if id(records[i]) not in on_front]


def finish_study(spec: StudySpec, records: list[dict[str, Any]], study_run: Any, *,
                 progress: bool = False, stop_ray: bool = False) -> tuple[list, list]:
    """Verify the front with the strong attacks on the test split, recompute it, write and log the
    artifacts, and put each verified trial's test numbers on its MLflow run.

    ``stop_ray``: shut Ray down once the verification no longer needs it, while the artifacts are
    written. Stopping a local instance is mostly waiting for its processes to exit one kind after
    another (1.2-1.5 s here), and the artifacts are the driver's CPU (1.0-1.4 s), so side by side
    the study ends about a second sooner. The shutdown is complete when this returns.
    """
    from study.orchestration.searcher import close_orphaned_optuna_trials
    from study.orchestration.verify import verify_front

    close_orphaned_optuna_trials(spec)
    front = front_records(records, spec.objectives, spec.directions)
    if spec.verify:
        verify_front(spec, front + _defense_front_records(spec, records, front), progress=progress)
    stopper = _stop_ray_in_background() if stop_ray else None
    try:
        return _write_results(spec, records, study_run, front)
    finally:
        if stopper is not None:
            stopper.join()


def _stop_ray_in_background() -> Any:
    import threading

    import ray

    def stop() -> None:
        try:
            ray.shutdown()
        except Exception:  # the study's results do not depend on it; the command's exit retries
            log.warning("shutting Ray down after the study failed", exc_info=True)

    thread = threading.Thread(target=stop, name="ray-shutdown")
    thread.start()
    return thread


def _write_results(spec: StudySpec, records: list[dict[str, Any]], study_run: Any,
                   front: list) -> tuple[list, list]:
    from study.orchestration.importance import write_importances
    from study.results.artifacts import write_study_artifacts

    final_front = front_records(records, spec.objectives, spec.directions, stage="final")
    for record in records:
        record["on_front"] = record in front
        record["on_final_front"] = record in final_front
        record.setdefault("verified", None)
    paths = write_study_artifacts(spec, records, front, final_front)
    importance_path, importance_metrics = write_importances(spec, spec.study_dir() / "importances.json")
    paths.append(importance_path)
    study_run.log_verification(records)
    study_run.log_artifacts(paths)
    study_run.log_metrics(importance_metrics)
    study_run.log_metrics(
        {
            "trials_completed": sum(r["status"] == "completed" for r in records),
            "trials_failed": sum(r["status"] not in ("completed",) for r in records),
            "front_size": len(front),
            "final_front_size": len(final_front),
            "front_unverified": sum(r.get("verified") is False for r in records),
        }
    )
    study_run.finish()
    return front, final_front
