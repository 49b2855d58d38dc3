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


def test_the_study_keeps_results_json_and_csv_and_no_tensorboard() -> None:
    """Tune adds a default logger of each kind the callbacks lack: all three kinds are given, and
    the TensorBoard one writes nothing."""
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback, TBXLoggerCallback
    from ray.tune.utils.callback import _create_default_callbacks

    loggers = trial_loggers()
    kinds = (JsonLoggerCallback, CSVLoggerCallback, TBXLoggerCallback)
    assert [sum(isinstance(c, k) for c in loggers) for k in kinds] == [1, 1, 1]
    tensorboard = next(c for c in loggers if isinstance(c, TBXLoggerCallback))
    added = [c for c in _create_default_callbacks(list(loggers), air_verbosity=None) if c not in loggers]
    assert not any(isinstance(c, kinds) for c in added)  # Tune adds no logger of its own

    writers: list = []
    tensorboard._summary_writer_cls = lambda *args, **kwargs: writers.append(args)  # Tune's own makes one per trial
    trial = _trial()
    tensorboard.log_trial_start(trial)
    tensorboard.log_trial_result(1, trial, dict(trial.last_result))
    tensorboard.log_trial_end(trial)
    assert writers == []
