"""Hyperparameter importance per objective: "with which hyperparameters" is half the question.

Computed from the study's Optuna trials (completed ones: pruned, failed and untrusted trials told
Optuna no numbers) with Optuna's fANOVA evaluator, once over the whole study (the defense is then
a parameter like any other) and once per defense over that defense's trials alone. Importances
from a handful of trials are rough: the trial count goes with every table, and a defense with
fewer than :data:`MIN_TRIALS` completed trials gets none.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any

from study.orchestration.searcher import optuna_storage_url
from study.results.records import SEARCH_SPLIT, labelled
from study.spec import StudySpec

log = logging.getLogger(__name__)

__all__ = ["MIN_TRIALS", "OVERALL", "format_importances", "study_importances", "write_importances"]

MIN_TRIALS = 4
OVERALL = "all defenses"


def _importances(trials: list[Any], directions: list[str], objectives: list[str], seed: int) -> dict[str, Any]:
    import optuna
    from optuna.importance import FanovaImportanceEvaluator, get_param_importances

    study = optuna.create_study(directions=["maximize" if d == "max" else "minimize" for d in directions])
    study.add_trials(trials)
    out: dict[str, Any] = {"trials": len(trials)}
    for i, objective in enumerate(objectives):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # ExperimentalWarning and sklearn chatter
                scores = get_param_importances(study, evaluator=FanovaImportanceEvaluator(seed=seed),
                                               target=lambda t, i=i: t.values[i])
            out[objective] = {k: round(float(v), 4) for k, v in scores.items()}
        except (RuntimeError, ValueError) as err:  # e.g. no parameter varies across these trials
            out[objective] = {}
            log.info("no importance for %s: %s", objective, err)
    return out


def _as_run(trials: list[Any], spec: StudySpec) -> list[Any]:
    """The trials with every parameter they ran with that other trials searched.

    fANOVA compares only the parameters every trial has. A defense may set a parameter the others
    search: CAS decides its own training recipe (``training.recipe`` follows ``cas.recipe``), so
    Optuna never asked a CAS trial for one. Left out, a single trusted CAS trial drops the recipe
    from the study-wide importances, and the defense gets all of robust accuracy's importance (a
    demo run, 2026-12-06: "defense 1.00" where the recipe is what differs). The values come from
    the study's space, as the trial's configuration was built; one that the searched distribution
    cannot hold stays out (the parameter then drops out, as before)."""
    import optuna
    from optuna.trial import FixedTrial

    searched: dict[str, Any] = {}
    for t in trials:
        for name, dist in t.distributions.items():
            searched.setdefault(name, dist)
    space = spec.conditional_space()
    out = []
    for t in trials:
        try:
            ran = space.suggest(FixedTrial(t.params))
        except (ValueError, KeyError) as err:  # a trial of an older version of the space
            log.info("importance: trial %d's parameters as run are unknown: %s", t.number, err)
            out.append(t)
            continue
        params, dists = dict(t.params), dict(t.distributions)
        for name, value in ran.items():
            if name in params or name not in searched:
                continue
            dist = searched[name]
            try:
                # Optuna's own membership test (private: it has no public one). If a later Optuna
                # renames it, the value stays out as before this fix; the study's end must not fail.
                holds = dist._contains(dist.to_internal_repr(value))
            except (ValueError, AttributeError):  # a category outside the searched choices
                holds = False
            if holds:
                params[name], dists[name] = value, dist
        out.append(optuna.trial.create_trial(params=params, distributions=dists, values=t.values,
                                             state=optuna.trial.TrialState.COMPLETE))
    return out


def study_importances(spec: StudySpec) -> dict[str, Any]:
    """Importances per objective, for the study and for each defense (``{scope: {"trials": n,
    objective: {param: importance}}}``); empty when the Optuna study does not exist."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.load_study(study_name=spec.name, storage=optuna_storage_url(spec.study_dir()))
    except KeyError:
        return {}
    done = _as_run(study.get_trials(deepcopy=True, states=(optuna.trial.TrialState.COMPLETE,)), spec)
    # Optuna was told validation numbers: the keys say so (val_clean_accuracy, ...).
    objectives = [labelled(o, SEARCH_SPLIT) for o in spec.objectives]
    result: dict[str, Any] = {}
    if len(done) >= MIN_TRIALS:
        result[OVERALL] = _importances(done, spec.directions, objectives, spec.seed)
    by_defense: dict[str, list[Any]] = {}
    for t in done:
        by_defense.setdefault(str(t.params.get("defense", "?")), []).append(t)
    for defense, trials in sorted(by_defense.items()):
        result[defense] = (_importances(trials, spec.directions, objectives, spec.seed)
                           if len(trials) >= MIN_TRIALS else {"trials": len(trials)})
    return result


def write_importances(spec: StudySpec, path: Path) -> tuple[Path, dict[str, float]]:
    """Write importances.json; return its path and flat metrics (``importance/<scope>/<objective>/<param>``)
    for the study's parent run."""
    data = study_importances(spec)
    path.write_text(json.dumps(data, indent=2))
    metrics = {
        f"importance/{scope.replace(' ', '_')}/{objective}/{param}": value
        for scope, entry in data.items() for objective, scores in entry.items() if isinstance(scores, dict)
        for param, value in scores.items()
    }
    return path, metrics


def format_importances(data: dict[str, Any], scopes: list[str], objectives: list[str], top: int = 3) -> str:
    """The most important parameters per objective for ``scopes`` (defenses), as text lines."""
    lines = ["Hyperparameter importance (fANOVA on the search's validation numbers; rough with few trials)"]
    width = max([12, *(len(s) for s in scopes)])
    name_width = max([16, *(len(o) for o in objectives)])
    for scope in scopes:
        entry = data.get(scope)
        if not entry:
            continue
        if not any(entry.get(o) for o in objectives):
            lines.append(f"  {scope:<{width}} {entry.get('trials', 0)} completed trial(s): too few (need {MIN_TRIALS})")
            continue
        for objective in objectives:
            scores = sorted((entry.get(objective) or {}).items(), key=lambda kv: -kv[1])[:top]
            shown = ", ".join(f"{k.split('.', 1)[-1]} {v:.2f}" for k, v in scores) or "-"
            lines.append(f"  {scope:<{width}} {objective:<{name_width}} {shown}   ({entry['trials']} trials)")
    return "\n".join(lines)
