"""What Ray Tune keeps and writes for every trial, cut down to what the study reads.

A papers-scale study runs thousands of trials, and the Tune driver keeps every one of them until
the study ends. A heap profile of ``bench scale`` (tracemalloc, trials 200 to 500) put 39 % of the
growth of the driver's Python heap per trial in Tune's running statistics of every reported number
(``ray/tune/trainable/metadata.py``: max, min, mean, last, and windows of the last 5 and 10
values, for each of the ~30 numbers a trial reports), which Tune also writes
into the experiment snapshot it saves after every trial. Nothing in the study reads them: records
come from a trial's last result and checkpoint (runner.collect_records); they serve
``ExperimentAnalysis.get_best_trial(scope=...)``, which the study never calls. So a finished
trial's statistics are dropped (:class:`ForgetFinishedStatistics`).

Tune also writes a TensorBoard event file per trial, with a writer thread each: 14 ms of the
driver's time per trial in a 16-trial profile, and files nobody reads (the study's viewer is
MLflow). The study keeps the two loggers it or its users read, result.json (which replay reads)
and progress.csv, and leaves TensorBoard's out (:func:`trial_loggers`).
"""

from __future__ import annotations

from typing import Any

from ray.tune import Callback
from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback, TBXLoggerCallback

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


class _NoTensorBoard(TBXLoggerCallback):
    """Stands where Tune would add its TensorBoard logger, and writes nothing."""

    def log_trial_start(self, trial: Any) -> None:
        pass

    def log_trial_result(self, iteration: int, trial: Any, result: dict) -> None:
        pass

    def log_trial_end(self, trial: Any, failed: bool = False) -> None:
        pass


def trial_loggers() -> list[Callback]:
    """Tune's per-trial loggers for a new study: result.json (read by replay), progress.csv, and no
    TensorBoard files.

    Tune adds a default logger of each kind (CSV, JSON, TensorBoard) that the callbacks lack. A
    TensorBoard logger that writes nothing keeps it from adding the real one, and, unlike Tune's
    switch for all three (``TUNE_DISABLE_AUTO_CALLBACK_LOGGERS``), it is part of the configuration
    Tune saves with the study: a resumed study keeps it, and a study made before this resumes with
    Tune's defaults, result.json included.
    """
    return [JsonLoggerCallback(), CSVLoggerCallback(), _NoTensorBoard()]
