"""The Tune callback that mirrors a remote study's working copy after every finished trial
(see study.storage), so a driver killed mid-study leaves Optuna's state and the study file at
the URI for ``resume``."""

from __future__ import annotations

import logging
from typing import Any

from ray.tune import Callback

from study import storage as store

log = logging.getLogger(__name__)


class StudyMirror(Callback):
    def __init__(self, storage: str, name: str) -> None:
        self.storage, self.name = storage, name

    def upload(self) -> None:
        try:
            store.upload(self.storage, self.name)
        except OSError as err:  # the next upload (or the one at the end) catches up
            log.warning("storage: uploading %s to %s failed (%s)", self.name, self.storage, err)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.upload()

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.upload()
