"""Load benchmark: a study of many tiny trials, then an audit that every trial is accounted for.

The trials are deliberately tiny (a few hundred digits images, one epoch, PGD-2 on 40 samples,
integrity checks on 10) so the study's own machinery — scheduling, Optuna, checkpoints, MLflow,
the front — is what gets loaded. :func:`audit_study` then reads the study back from its three
stores (``trials.json``, Optuna's database, MLflow) and reports what it found; the load test
asserts on those facts and the benchmark prints them with the wall time.

Per-trial overhead is in core-seconds: (concurrency * wall - sum of the trials' own training and
attack seconds) / trials, i.e. what the framework added to each trial on top of its work.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from study.spec import StudySpec, bench_spec

__all__ = ["audit_problems", "audit_study", "bench_load", "format_load", "load_spec"]

logger = logging.getLogger(__name__)


def load_spec(storage: str | Path, num_trials: int = 100, concurrency: int = 2,
              tracking_uri: str | None = None, name: str = "bench_load", log_models: bool = True) -> StudySpec:
    """Tiny digits trials over KAP (no noise), CAS and the baseline; random search
    (``study/specs/bench/load.yaml``). ``log_models=False`` leaves out each trial's MLflow model
    (a third of such a tiny trial's work; the audit does not read models)."""
    updates: dict[str, Any] = {"name": name, "num_trials": num_trials, "concurrency": concurrency,
                               "storage": str(storage), "mlflow": {"log_models": log_models}}
    if tracking_uri:
        updates["mlflow"]["tracking_uri"] = tracking_uri
    return bench_spec("load", source="bench load", **updates)


def audit_study(spec: StudySpec, tracking_uri: str) -> dict[str, Any]:
    """Read a finished study back from trials.json, Optuna and MLflow; return the facts found."""
    import optuna
    from mlflow.tracking import MlflowClient

    from study.orchestration.runner import STUDY_FILE, TRIALS_FILE, trial_seconds
    from study.results.identity import duplicated
    from study.results.pareto import front_of_records
    from study.tracking import PARENT_TAG, TRIAL_ID_TAG

    study_dir = spec.study_dir()
    records = json.loads((study_dir / TRIALS_FILE).read_text())
    state = json.loads((study_dir / STUDY_FILE).read_text())
    ids = [r["trial_id"] for r in records]

    ot = optuna.load_study(study_name=spec.name, storage=f"sqlite:///{study_dir / 'optuna.db'}")
    optuna_states: dict[str, int] = {}
    for t in ot.trials:
        optuna_states[t.state.name] = optuna_states.get(t.state.name, 0) + 1

    client = MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name(spec.experiment)
    runs = client.search_runs([experiment.experiment_id], max_results=50_000) if experiment else []
    children = [r for r in runs if r.data.tags.get(PARENT_TAG) == state.get("parent_run_id")]
    run_ids = [r.data.tags.get(TRIAL_ID_TAG) for r in children]
    by_id = {r.data.tags.get(TRIAL_ID_TAG): r for r in children}
    # Each completed trial's MLflow metrics must be the numbers in trials.json.
    mismatched = [
        r["trial_id"] for r in records
        if r["status"] == "completed" and (
            r["trial_id"] not in by_id
            or abs(by_id[r["trial_id"]].data.metrics.get("val_clean_accuracy", -1) - r["val_clean_accuracy"]) > 1e-9
            or abs(by_id[r["trial_id"]].data.metrics.get("val_robust_accuracy", -1) - r["val_robust_accuracy"]) > 1e-9
        )
    ]
    # Optuna is told COMPLETE exactly the completed, trusted trials (study.orchestration.searcher).
    expected_complete = sum(r["status"] == "completed" and bool(r["trusted"]) for r in records)
    recomputed = sorted(records[i]["trial_id"] for i in front_of_records(records, spec.objectives, spec.directions))
    stored = sorted(r["trial_id"] for r in records if r.get("on_front"))
    return {
        "records": len(records),
        "unique_trial_ids": len(set(ids)),
        "duplicate_trial_ids": duplicated(ids),
        "statuses": {s: sum(r["status"] == s for r in records) for s in sorted({r["status"] for r in records})},
        "optuna_states": optuna_states,
        "optuna_complete_expected": expected_complete,
        "mlflow_parents": sum(PARENT_TAG not in r.data.tags for r in runs),
        "mlflow_children": len(children),
        "mlflow_unique_trial_ids": len(set(run_ids)),
        "mlflow_duplicate_trial_ids": duplicated(run_ids),
        "mlflow_missing": sorted(set(ids) - set(run_ids)),
        "mlflow_extra": sorted(set(run_ids) - set(ids)),
        "mlflow_mismatched_metrics": mismatched,
        "front_stored": stored,
        "front_recomputed": recomputed,
        "trial_seconds": sum(trial_seconds(r) for r in records),
    }


def bench_load(num_trials: int = 100, concurrency: int = 2, storage: str | Path = "results",
               tracking_uri: str | None = None, log_models: bool = True) -> dict[str, Any]:
    """Run the load study (its wall time includes Ray's start) and audit it."""
    import ray

    from study.orchestration.runner import run_study, tracking_uri_for

    spec = load_spec(storage, num_trials, concurrency, tracking_uri, log_models=log_models)
    logger.info("bench load: %d tiny trials, concurrency %d", num_trials, concurrency)
    start = time.perf_counter()
    try:
        run_study(spec, progress=False)
    finally:
        ray.shutdown()
    wall = time.perf_counter() - start
    audit = audit_study(spec, tracking_uri_for(spec))
    audit.update(
        num_trials=num_trials,
        concurrency=concurrency,
        wall_s=wall,
        overhead_per_trial_s=(concurrency * wall - audit["trial_seconds"]) / num_trials,
    )
    return audit


def audit_problems(m: dict[str, Any]) -> list[str]:
    """Every way the audited stores disagree with "each trial once, everywhere", one line each;
    a trial recorded twice is named."""
    problems = []
    if m["duplicate_trial_ids"]:
        problems.append(f"trials.json records trial(s) more than once: {', '.join(m['duplicate_trial_ids'])}")
    if m["mlflow_duplicate_trial_ids"]:
        problems.append(f"MLflow has more than one run of trial(s): {', '.join(m['mlflow_duplicate_trial_ids'])}")
    counts = {"planned": m.get("num_trials", m["records"]), "trials.json": m["records"], "MLflow runs": m["mlflow_children"],
              "Optuna trials": sum(m["optuna_states"].values())}
    if len(set(counts.values())) > 1:
        problems.append("trial counts differ: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    if m["mlflow_missing"] or m["mlflow_extra"]:
        problems.append(f"MLflow misses {len(m['mlflow_missing'])} and has {len(m['mlflow_extra'])} unknown trial(s)")
    if m["mlflow_mismatched_metrics"]:
        problems.append(f"MLflow's numbers differ from trials.json's for {len(m['mlflow_mismatched_metrics'])} trial(s)")
    if "RUNNING" in m["optuna_states"] or m["optuna_states"].get("COMPLETE", 0) != m["optuna_complete_expected"]:
        problems.append(f"Optuna: {m['optuna_states']}, but {m['optuna_complete_expected']} completed trusted trial(s)")
    if m["front_stored"] != m["front_recomputed"]:
        problems.append("the stored front differs from the front recomputed from trials.json")
    return problems


def format_load(m: dict[str, Any]) -> str:
    problems = audit_problems(m)
    return "\n".join([
        f"trials planned {m['num_trials']}, recorded {m['records']} ({m['unique_trial_ids']} distinct): {m['statuses']}",
        f"Optuna trial states: {m['optuna_states']}",
        f"MLflow: {m['mlflow_parents']} parent run, {m['mlflow_children']} trial runs "
        f"({m['mlflow_unique_trial_ids']} distinct), missing {len(m['mlflow_missing'])}, "
        f"extra {len(m['mlflow_extra'])}, metrics differing from trials.json {len(m['mlflow_mismatched_metrics'])}",
        f"front: {len(m['front_stored'])} trials, "
        f"{'equal to' if m['front_stored'] == m['front_recomputed'] else 'DIFFERENT from'} the front recomputed "
        "from trials.json",
        f"wall time {m['wall_s']:.1f} s for {m['num_trials']} trials at concurrency {m['concurrency']} "
        f"({m['wall_s'] / m['num_trials']:.2f} s per trial); the trials' own work {m['trial_seconds']:.1f} s",
        f"framework overhead per trial: {m['overhead_per_trial_s']:.2f} core-seconds",
        f"consistent: {'yes' if not problems else 'NO'}",
        *[f"  {p}" for p in problems],
    ])
