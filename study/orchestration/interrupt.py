"""Telling an interrupted search from a finished one.

On SIGINT (Ctrl-C) or SIGUSR1 Ray Tune ends its loop early: it saves the experiment, stops the
running trials (marking them terminated) and returns from ``Tuner.fit`` as if the search were
over. ``robust-study resume`` continues those trials under their ids. A driver that took the
returned results for the study's end would record them as stopped, close their Optuna trials as
failed — so their results, once resumed, could no longer be told to Optuna — verify a partial
front and mark the study finished.

Tune's callbacks see the difference: a trial that ends in the search (completed, stopped by the
scheduler, errored) passes through ``on_trial_complete`` or ``on_trial_error``; a trial cut by the
interrupt does not. :class:`InterruptWatch` records which did, in the driver.
"""

from __future__ import annotations

import logging
from typing import Any

from ray.tune import Callback

log = logging.getLogger(__name__)

_TERMINAL = ("TERMINATED", "ERROR")
# Watches by study folder, as Tune ran them in this process: Tune restores its own copy of a
# callback with the experiment (Tuner.restore), so the driver finds it here, not by reference.
_WATCHES: dict[str, InterruptWatch] = {}


class StudyInterrupted(KeyboardInterrupt):
    """The search was interrupted; nothing was finished, ``resume`` continues it.

    A KeyboardInterrupt, so that every caller treats it as the Ctrl-C it is (the CLI exits 130).
    """


class InterruptWatch(Callback):
    """Records which trials ended in the search, to tell on :func:`unfinished_trials` which did not."""

    def __init__(self, key: str) -> None:
        self.key = key
        self._reset()

    def _reset(self) -> None:
        self.ended: set[str] = set()
        self.ended_before: set[str] | None = None  # trials already over when this driver started
        self.unfinished: list[str] = []

    def __getstate__(self) -> dict[str, Any]:
        return {"key": self.key}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset()

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        _WATCHES[self.key] = self
        if self.ended_before is None:  # a resumed study's trials that ended under an earlier driver
            self.ended_before = {t.trial_id for t in trials if t.status in _TERMINAL}

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.ended.add(trial.trial_id)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.ended.add(trial.trial_id)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        _WATCHES[self.key] = self
        if self.ended_before is None:  # no step ran: every trial is as the experiment was restored
            self.unfinished = [t.trial_id for t in trials if t.status not in _TERMINAL]
            return
        ended = self.ended | self.ended_before
        self.unfinished = [t.trial_id for t in trials if t.trial_id not in ended]


def unfinished_trials(key: str) -> list[str] | None:
    """Trial ids the last search of study ``key`` left unfinished (interrupted); None when no
    watch ran (a study started before the watch existed: assumed finished, as before)."""
    watch = _WATCHES.pop(key, None)
    return None if watch is None else list(watch.unfinished)


def study_interrupted(spec: Any, study_run: Any) -> StudyInterrupted:
    """What an interrupted study raises, once its MLflow run is marked KILLED (``resume`` sets it
    running again). Nothing else is finished: no records, no verification, and the Optuna trials
    of the cut trials stay open for the resumed search to tell."""
    try:
        study_run.finish("KILLED")
    except Exception as err:  # noqa: BLE001 - the interrupt is what the user must hear about
        log.warning("MLflow: could not mark the study's run interrupted (%s)", err)
    return StudyInterrupted(
        f"study {spec.name!r} interrupted; continue it with: robust-study resume {spec.name} --storage {spec.storage}"
    )
