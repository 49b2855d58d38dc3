"""A compact live progress line for a study (instead of Ray's wall of logs)."""

from __future__ import annotations

import sys
import time
from typing import Any

from ray.tune import Callback

from study.results.records import trial_outcome


class ProgressLine(Callback):
    """Prints one line per finished trial: done/running/stopped/failed and the best trusted numbers
    so far, all on the validation split (what the search sees; the test split waits for
    verification). A trial the early stopping ended has no final report: it counts as stopped,
    not failed (with early stopping on, many trials end that way by design)."""

    def __init__(self, total: int, directions: list[str]) -> None:
        self.total = total
        self.directions = directions
        self.start = time.monotonic()
        self.done = 0
        self.stopped = 0
        self.failed = 0
        self.best: dict[str, float] = {}

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__.copy()

    def _line(self, trials: list, text: str) -> None:
        running = sum(1 for t in trials if t.status == "RUNNING")
        best = "  ".join(f"best val {k.split('_')[1]} {100 * v:.1f}%" for k, v in self.best.items())
        elapsed = time.monotonic() - self.start
        print(
            f"[{self.done + self.stopped + self.failed:>3}/{self.total}] {elapsed:6.0f}s  done {self.done}  "
            f"running {running}  stopped {self.stopped}  failed {self.failed}  {best}  | {text}",
            file=sys.stderr,
            flush=True,
        )

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        result = trial.last_result or {}
        defense = trial.config.get("defense", "?")
        # The one classification of a trial's ending (trials.json, Optuna and MLflow use it too);
        # a trial reaching this callback did not raise (those go to on_trial_error).
        status = trial_outcome(result, raised=False)["status"]
        if status == "completed":
            self.done += 1
            if result.get("trusted"):
                for key in ("val_clean_accuracy", "val_robust_accuracy"):
                    self.best[key] = max(self.best.get(key, 0.0), float(result.get(key, 0.0)))
            mark = "" if result.get("trusted") else " UNTRUSTED"
            text = (
                f"{defense}: val clean {100 * result['val_clean_accuracy']:.1f}% robust "
                f"{100 * result['val_robust_accuracy']:.1f}%{mark}"
            )
        elif status == "stopped":  # ended by the scheduler after a per-epoch report
            self.stopped += 1
            text = f"{defense}: stopped early at epoch {result.get('epoch', '?')}"
        else:
            self.failed += 1
            text = f"{defense}: {status} {result.get('reason', '')}".strip()
        self._line(trials, text)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.failed += 1
        self._line(trials, f"{trial.config.get('defense', '?')}: error")
