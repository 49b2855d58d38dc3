"""What :func:`study.bench.load.audit_study` reports for a consistent three-trial study (two
completed and trusted, one failed), for tests of the verdicts drawn from it to change one fact at
a time."""

from __future__ import annotations


def audit_facts(**changes: object) -> dict:
    facts = {
        "num_trials": 3,
        "records": 3,
        "unique_trial_ids": 3,
        "duplicate_trial_ids": [],
        "mlflow_children": 3,
        "mlflow_unique_trial_ids": 3,
        "mlflow_duplicate_trial_ids": [],
        "optuna_states": {"COMPLETE": 2, "FAIL": 1},
        "optuna_complete_expected": 2,
        "mlflow_missing": [],
        "mlflow_extra": [],
        "mlflow_mismatched_metrics": [],
        "front_stored": ["a"],
        "front_recomputed": ["a"],
    }
    return {**facts, **changes}
