"""What Ray Tune keeps and writes for every trial, cut down to what the study reads.

A papers-scale study runs thousands of trials, and the Tune driver keeps every one of them until
the study ends. A heap profile of ``bench scale`` (tracemalloc, trials 200 to 500) put 39 % of the
driver's per-trial growth in Tune's running statistics of every reported number
(``ray/tune/trainable/metadata.py``: max, min, mean, last, and windows of the last 5 and 10
values, for each of the ~60 numbers a result carries, config included), which Tune also writes
into the experiment snapshot it saves after every trial. Nothing in the study reads them: records
come from a trial's last result and checkpoint (runner.collect_records); they serve
``ExperimentAnalysis.get_best_trial(scope=...)``, which the study never calls. So a finished
trial's statistics are dropped (:class:`ForgetFinishedStatistics`).

Tune also writes a TensorBoard event file per trial, with a writer thread each, unless told not
to. The study keeps the two loggers it or its users read (result.json, which replay reads, and
progress.csv) and leaves TensorBoard's out (:func:`trial_loggers`); setting
``TUNE_DISABLE_AUTO_CALLBACK_LOGGERS=0`` brings it back.
"""

from __future__ import annotations

from typing import Any

from ray.tune import Callback

__all__ = ["ForgetFinishedStatistics", "forget_statistics", "trial_loggers"]


def forget_statistics(trial: Any) -> None:
    """Empty ``trial``'s per-metric statistics.

    Assigning them drops Tune's cached JSON of the trial's run metadata (its ``__setattr__``), and
    the controller reads the trial's state again when its status changes, right after the callback.
    """
    trial.run_metadata.metric_analysis = {}
    trial.run_metadata.metric_n_steps = {}


class ForgetFinishedStatistics(Callback):
    """Drop a trial's running statistics once it has ended (module docstring).

    Not on a failure Tune may still retry (``on_trial_recover``): only when the trial is over.
    """

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        forget_statistics(trial)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        forget_statistics(trial)


def trial_loggers() -> list[Callback]:
    """Tune's per-trial files the study keeps: result.json (read by replay) and progress.csv.

    Tune adds its default loggers (these two and TensorBoard's) only while
    ``TUNE_DISABLE_AUTO_CALLBACK_LOGGERS`` is not "1"; runner.quiet_library_env sets it unless the
    user did, for a new study and a resumed one (whose callbacks Tune restores) alike.
    """
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    return [JsonLoggerCallback(), CSVLoggerCallback()]
