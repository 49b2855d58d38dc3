"""A finished trial's running statistics are dropped from Tune's memory and its snapshot."""

from __future__ import annotations

import json

from ray.tune.experiment import Trial

from study.orchestration.tune_state import ForgetFinishedStatistics, trial_loggers


def _trial() -> Trial:
    trial = Trial("robust_study_test_trainable", stub=True, config={"lr": 0.05}, trial_id="t1")
    for epoch, accuracy in enumerate([0.5, 0.75, 0.9], start=1):
        trial.update_last_result({"val_clean_accuracy": accuracy, "epoch": epoch, "training_iteration": epoch})
    return trial


def test_statistics_are_dropped_when_a_trial_completes_and_its_snapshot_shrinks() -> None:
    trial = _trial()
    assert trial.metric_analysis["val_clean_accuracy"]["max"] == 0.9  # what Tune keeps while it runs
    _, before = trial.get_json_state()  # cached, as the snapshot reads it
    assert json.loads(before)["metric_analysis"]

    ForgetFinishedStatistics().on_trial_complete(iteration=1, trials=[trial], trial=trial)

    assert trial.metric_analysis == {} and trial.metric_n_steps == {}
    assert trial.last_result["val_clean_accuracy"] == 0.9  # what the study reads stays
    _, after = trial.get_json_state()
    state = json.loads(after)
    assert state["metric_analysis"] == {} and state["metric_n_steps"] == {}
    assert state["last_result"]["val_clean_accuracy"] == 0.9
    assert len(after) < len(before)


def test_statistics_are_dropped_when_a_trial_errs() -> None:
    trial = _trial()
    ForgetFinishedStatistics().on_trial_error(iteration=1, trials=[trial], trial=trial)
    assert json.loads(trial.get_json_state()[1])["metric_analysis"] == {}


def test_the_study_keeps_results_json_and_csv_loggers_only() -> None:
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    assert sorted(type(c).__name__ for c in trial_loggers()) == sorted(
        [JsonLoggerCallback.__name__, CSVLoggerCallback.__name__])
