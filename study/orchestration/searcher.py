"""The study's Optuna side: sampler, Ray's OptunaSearch adapter, and the Optuna study it keeps.

The Optuna study lives in ``<study_dir>/optuna.db`` and is meant to be read by people too
(``optuna-dashboard sqlite:///.../optuna.db``): it carries the objective names
(``val_clean_accuracy``, ...: the search sees validation numbers only), and every trial says which
defense it ran and how it ended (``defense``, ``status``, ``trusted``,
``failed_gates`` user attributes, named as in trials.json).
"""

from __future__ import annotations

import logging
import pickle
from pathlib import Path
from typing import Any

from study.results.records import SEARCH_SPLIT, labelled, trial_outcome
from study.spec import StudySpec

log = logging.getLogger(__name__)

OPTUNA_DB = "optuna.db"
# Marks a searcher snapshot written by FinalResultsOptunaSearch.save (make_searcher).
_SLIM_STATE = "_robust_study_slim_state"


def optuna_storage_url(study_dir: Path) -> str:
    """The SQLAlchemy URL of a study's Optuna storage (what optuna-dashboard takes)."""
    return f"sqlite:///{Path(study_dir) / OPTUNA_DB}"


def make_sampler(spec: StudySpec) -> Any:
    import optuna

    s = spec.sampler
    if s.name == "tpe":
        from study.orchestration.tpe import ReadOnceTPESampler

        return ReadOnceTPESampler(seed=s.seed, n_startup_trials=s.n_startup_trials, multivariate=True,
                                  group=True, constant_liar=True)
    if s.name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=s.seed, population_size=s.population_size)
    return optuna.samplers.RandomSampler(seed=s.seed)


def label_trial(ot_trial: Any, result: dict[str, Any] | None, error: bool) -> None:
    """Write the trial's defense and outcome onto its Optuna trial (before it is told).

    ``result`` is Tune's last result (None when the trial raised). An Optuna trial that is already
    finished (a driver killed between the tell and Tune's next snapshot, then resumed) cannot be
    updated any more: warn and leave it as it is.
    """
    import optuna

    attrs = {"defense": ot_trial.params.get("defense", "none"), **trial_outcome(result, raised=error)}
    try:
        for key, value in attrs.items():
            ot_trial.set_user_attr(key, value)
    except optuna.exceptions.UpdateFinishedTrialError:
        log.warning("Optuna trial %d was already finished (told before an interrupted driver's last "
                    "snapshot); its attributes are left as they were", ot_trial.number)


def search_metrics(spec: StudySpec) -> list[str]:
    """Optuna's objective names: the spec's objectives as measured on the validation split
    (``val_clean_accuracy``, ``val_robust_accuracy``, then any cost), as every report carries them."""
    return [labelled(o, SEARCH_SPLIT) for o in spec.objectives]


def make_searcher(spec: StudySpec, study_dir: Path, enqueue: list[dict[str, Any]] | None = None) -> Any:
    """OptunaSearch over the conditional space; only final, completed results reach Optuna.

    ``enqueue``: configurations to run first instead of the paper defaults (benchmarks use it to
    run a fixed list of trials).
    """
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    class FinalResultsOptunaSearch(OptunaSearch):
        # Ray's OptunaSearch tells Optuna a trial's *last* result. A trial stopped early, one
        # that diverged, or one whose evaluation failed the integrity checks (e.g. gradient
        # masking) would enter Optuna's front with numbers that are not evidence and steer the
        # sampler towards them: tell Optuna it was pruned / failed instead.
        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
            ot_trial = self._ot_trials.get(trial_id)
            if ot_trial is not None and trial_id not in self._completed_trials:
                # Optuna refuses to update a finished trial: label it before the tell.
                label_trial(ot_trial, result, error)
            if result is not None and not result.get("final"):
                result = None  # stopped early → pruned
            elif result is not None and (result.get("status") != "completed" or not result.get("trusted")):
                result, error = None, True  # diverged or untrusted → failed
            super().on_trial_complete(trial_id, result=result, error=error)

        # Tune snapshots the searcher with the study (after every trial here, see runner's
        # CheckpointConfig). Ray pickles all of it: the Optuna study with its storage's cache of
        # every finished trial, and an Optuna Trial per Tune trial ever run, each with its own
        # copy: O(trials) per snapshot, a fifth of the driver's time at 700 trials. The study is
        # in optuna.db; the snapshot keeps only what is not: the unfinished trials' Optuna ids.
        def save(self, checkpoint_path: str) -> None:
            state = self.__dict__.copy()
            state["_ot_study"] = None
            state["_ot_trials"] = {tune_id: ot_trial._trial_id for tune_id, ot_trial in self._ot_trials.items()
                                   if tune_id not in self._completed_trials}
            state[_SLIM_STATE] = True
            with open(checkpoint_path, "wb") as out:
                pickle.dump(state, out)

        def restore(self, checkpoint_path: str) -> None:
            with open(checkpoint_path, "rb") as source:
                state = pickle.load(source)
            if not (isinstance(state, dict) and state.pop(_SLIM_STATE, False)):
                super().restore(checkpoint_path)  # a snapshot written before the slim state
                return
            self.__dict__.update(state)
            self._ot_study = optuna.load_study(study_name=self._study_name, storage=self._storage,
                                               sampler=self._sampler)
            self._ot_trials = {tune_id: optuna.trial.Trial(self._ot_study, storage_id)
                               for tune_id, storage_id in state["_ot_trials"].items()}

    space = spec.conditional_space()
    storage = optuna.storages.RDBStorage(optuna_storage_url(study_dir))
    # Given a space, OptunaSearch creates (or, on a rerun, loads) the Optuna study right here.
    searcher = FinalResultsOptunaSearch(
        space=space.suggest,
        metric=search_metrics(spec),
        mode=list(spec.directions),
        points_to_evaluate=(space.paper_default_configs() if enqueue is None else enqueue)[: spec.num_trials],
        sampler=make_sampler(spec),
        study_name=spec.name,
        storage=storage,
    )
    # Without names, optuna-dashboard shows "Objective 0/1". A resumed study restores its
    # searcher from Tune's snapshot instead and finds the names already stored.
    searcher._ot_study.set_metric_names(search_metrics(spec))
    return searcher


def close_orphaned_optuna_trials(spec: StudySpec) -> int:
    """Mark Optuna trials still RUNNING after the search as failed; return how many.

    Every trial Tune knows about has been told to Optuna by the time the search returns. One
    still RUNNING was asked for by a driver that was killed before Tune's next snapshot: the
    resumed study never saw it and ran a new trial in its place (MLflow tags the orphan's run
    superseded). Left RUNNING it would look like a trial in progress forever and the sampler
    would keep treating its point as pending.
    """
    import optuna

    try:
        study = optuna.load_study(study_name=spec.name, storage=optuna_storage_url(spec.study_dir()))
    except KeyError:  # no Optuna study (nothing was ever proposed)
        return 0
    orphans = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    for trial in orphans:
        study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
    if orphans:
        log.warning("%d Optuna trial(s) orphaned by an interrupted driver marked failed: %s",
                    len(orphans), [t.number for t in orphans])
    return len(orphans)
