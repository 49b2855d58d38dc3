"""Load (issue 5): 100 tiny trials at concurrency 2 against a real MLflow server; every trial is
accounted for once in trials.json, Optuna and MLflow, and the stored front is the front."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import MlflowServer

pytestmark = [pytest.mark.ray, pytest.mark.server, pytest.mark.slow, pytest.mark.timeout(1800)]

TRIALS = 100


def test_hundred_trials_are_each_recorded_once_and_the_front_is_right(tmp_path: Path, mlflow_server: MlflowServer) -> None:
    import optuna
    from mlflow.tracking import MlflowClient

    from study.bench.load import bench_load, format_load
    from study.results.pareto import pareto_front

    mlflow_server.start()  # a no-op unless a test before this one on the worker left it stopped
    # No MLflow model per trial: a third of these tiny trials' work, and nothing here reads models
    # (tests/test_mlflow_conventions.py and tests/test_mlflow_server.py do).
    m = bench_load(num_trials=TRIALS, concurrency=2, storage=tmp_path / "results", tracking_uri=mlflow_server.uri,
                   log_models=False)
    print(format_load(m))  # wall time and per-trial overhead, shown with -s

    # The audit's facts.
    assert m["records"] == m["unique_trial_ids"] == TRIALS
    assert m["statuses"].get("completed", 0) == TRIALS, m["statuses"]
    assert m["mlflow_children"] == m["mlflow_unique_trial_ids"] == TRIALS
    assert not m["mlflow_missing"] and not m["mlflow_extra"] and not m["mlflow_mismatched_metrics"]
    assert m["mlflow_parents"] == 1
    assert m["front_stored"] == m["front_recomputed"] and m["front_stored"]

    # Read back independently of the audit.
    study_dir = tmp_path / "results" / "bench_load"
    records = json.loads((study_dir / "trials.json").read_text())
    ot = optuna.load_study(study_name="bench_load", storage=f"sqlite:///{study_dir / 'optuna.db'}")
    assert len(ot.trials) == TRIALS
    trusted = [r for r in records if r["trusted"]]
    assert sum(t.state.name == "COMPLETE" for t in ot.trials) == len(trusted)
    assert not any(t.state.name == "RUNNING" for t in ot.trials)
    # Optuna's completed values are the recorded numbers, trial for trial (as multisets).
    told = sorted(tuple(round(v, 9) for v in t.values) for t in ot.trials if t.state.name == "COMPLETE")
    recorded = sorted((round(r["val_clean_accuracy"], 9), round(r["val_robust_accuracy"], 9)) for r in trusted)
    assert told == recorded

    client = MlflowClient(tracking_uri=mlflow_server.uri)
    experiment = client.get_experiment_by_name("bench_load")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(children) == TRIALS
    assert {c.data.tags["robust_study.trial_id"] for c in children} == {r["trial_id"] for r in records}

    # The front: non-dominated among trusted completed trials, by the plain definition.
    points = [(r["val_clean_accuracy"], r["val_robust_accuracy"]) for r in trusted]
    expected = {trusted[i]["trial_id"] for i in pareto_front(points, ["max", "max"])}
    assert {r["trial_id"] for r in records if r["on_front"]} == expected
    for r in records:
        if r["on_front"]:
            assert not any(a >= r["val_clean_accuracy"] and b >= r["val_robust_accuracy"]
                           and (a, b) != (r["val_clean_accuracy"], r["val_robust_accuracy"])
                           for a, b in points)
