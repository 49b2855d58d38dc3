"""The study's early-stopping schedulers for Ray Tune: MO-ASHA (multi-objective) or ASHA.

Whatever stops a trial, the trial never reaches the front: its last result has no final
report, so ``study.results.records.trial_outcome`` calls it stopped, the fronts skip it and
``study.orchestration.searcher`` tells Optuna it was pruned.
"""

from __future__ import annotations

from typing import Any

from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from study.orchestration.mo_asha import Rungs
from study.spec import StudySpec

__all__ = ["MultiObjectiveASHA", "make_scheduler"]


class MultiObjectiveASHA(FIFOScheduler):
    """Stop trials at ASHA's rungs by non-dominated sorting of several metrics (study.orchestration.mo_asha).

    Args:
        metrics: Result keys of the objectives, as every intermediate result carries them.
        modes: ``max`` or ``min`` per metric.
        time_attr: The result key that counts progress (completed epochs).
        grace_period: The first rung.
        reduction_factor: About 1 in this many trials goes on at each rung.
        max_t: The last value of ``time_attr``; rungs lie strictly below it.
        final_key: Results with this key set are a trial's last report (its evaluation): never
            judged, since nothing is left to save.
    """

    def __init__(
        self,
        metrics: list[str],
        modes: list[str],
        *,
        time_attr: str,
        grace_period: int,
        reduction_factor: int,
        max_t: int,
        final_key: str | None = "final",
    ) -> None:
        super().__init__()
        if len(metrics) != len(modes) or not metrics:
            raise ValueError(f"one mode per metric needed, got metrics {metrics} and modes {modes}")
        self.metrics = list(metrics)
        self.time_attr = time_attr
        self.final_key = final_key
        self.rungs = Rungs(modes, grace_period, reduction_factor, max_t)

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        # The objectives come with the constructor; Tune's single metric/mode (unset in a
        # multi-objective study) has nothing to add.
        return True

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> str:
        if self.final_key and result.get(self.final_key):
            return TrialScheduler.CONTINUE
        t = result.get(self.time_attr)
        if t is None:
            return TrialScheduler.CONTINUE
        go_on = self.rungs.decide(trial.trial_id, float(t), [result.get(m) for m in self.metrics])
        return TrialScheduler.CONTINUE if go_on else TrialScheduler.STOP

    def debug_string(self) -> str:
        return f"MO-ASHA on {', '.join(self.metrics)}: {self.rungs.summary()}"


def make_scheduler(spec: StudySpec) -> TrialScheduler | None:
    """The spec's early-stopping scheduler, or None when early stopping is off."""
    es = spec.stopping
    if not es.enabled:
        return None
    if es.rule == "mo_asha":
        # Per-epoch reports carry every objective under its own name, measured on the
        # validation split (study.orchestration.runner._trainable).
        from study.results.records import SEARCH_SPLIT, labelled

        return MultiObjectiveASHA(
            [labelled(o, SEARCH_SPLIT) for o in spec.objectives],  # val_clean_accuracy, ...
            list(spec.directions),
            time_attr="epoch",
            grace_period=es.grace_epochs,
            reduction_factor=es.reduction_factor,
            max_t=spec.training.epochs,
        )
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(
        metric="epoch_val_accuracy",
        mode="max",
        time_attr="epoch",
        # One past the last epoch: at max_t ASHA stops every trial, and a trial stopped on its
        # last per-epoch report never sends its evaluated final report (no trial would ever
        # complete). The rungs stay at grace * rf**k <= epochs.
        max_t=spec.training.epochs + 1,
        grace_period=es.grace_epochs,
        reduction_factor=es.reduction_factor,
    )
