"""Search-efficiency benchmark: how fast each sampler's (clean, robust) front grows.

Every sampler the product offers (configured exactly as a study configures it, by
:func:`study.searcher.make_sampler`) searches the same cheap digits space for ``max(n)`` trials,
for several seeds; each proposal is trained and attacked for real by :func:`study.trial.run_trial`
(Optuna ask/tell, no Ray: the trials of one search run one after the other, and the (sampler,
seed) searches are spread over worker processes). Reported: the hypervolume of the front of the
first n trials (reference point (0, 0)) at each n, mean and spread over seeds, and how many
trials each sampler needs on average to reach random search's mean hypervolume at ``max(n)``.

Trials whose evaluation was not trusted (integrity checks) are told to the sampler as failed and
left out of the hypervolume, as they are left off a study's front. Identical configurations
(e.g. a sampler's random start-up with the same seed as random search) are trained once per
worker process and reused.
"""

from __future__ import annotations

import logging
import math
import os
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from study.runner import params_key
from study.spec import StudySpec, bench_spec, trial_config_for

__all__ = ["SAMPLERS", "bench_search", "format_search", "search_spec"]

logger = logging.getLogger(__name__)

SAMPLERS: tuple[str, ...] = ("tpe", "nsga2", "random")
CHECKPOINTS: tuple[int, ...] = (8, 16, 32, 64)
REFERENCE: tuple[float, float] = (0.0, 0.0)
#: Issue 6's target: the default sampler reaches random search's 64-trial hypervolume in <= 32.
TRIALS_TARGET = 32


def search_spec(sampler: str = "tpe", seed: int = 0, epochs: int = 2) -> StudySpec:
    """The cheap space: baseline, KAP (no noise) and CAS on digits, fast adversarial training
    whose lr and training epsilon are searched too (the main accuracy/robustness trade-off).
    A trial is ~2 s on one core (600 training images, two epochs, PGD-5 on 100 test images):
    the benchmark runs 9 searches of 64 trials. The workload: ``study/specs/bench/search.yaml``."""
    return bench_spec("search", source="bench search", sampler={"name": sampler, "seed": seed},
                      training={"epochs": epochs})


_CACHE: dict[str, tuple[float, float] | None] = {}


def _evaluate(spec: StudySpec, params: dict[str, Any]) -> tuple[float, float] | None:
    """(clean, robust) of one trial, or None when it diverged or its evaluation is untrusted."""
    from study.data import load_data
    from study.trial import run_trial

    key = params_key(params)
    if key not in _CACHE:
        data = load_data(spec.data, seed=spec.seed)  # cached per process
        try:
            result = run_trial(trial_config_for(spec, params, name="search"), data=data)
        except Exception as err:  # noqa: BLE001 - a trial that raises fails, as it would in a study
            logger.warning("trial %s raised %s: counted as failed", params, err)
            _CACHE[key] = None
            return None
        ok = result.status == "completed" and result.trusted
        _CACHE[key] = (result.clean_accuracy, result.robust_accuracy) if ok else None
    return _CACHE[key]


def _search(sampler: str, seed: int, n: int, epochs: int) -> dict[str, Any]:
    """One search of n trials; returns its hypervolume after each trial."""
    import optuna
    import torch

    from study.pareto import hypervolume_history
    from study.searcher import make_sampler

    torch.set_num_threads(1)  # one core per search process
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    spec = search_spec(sampler, seed, epochs)
    space = spec.conditional_space()
    study = optuna.create_study(directions=["maximize", "maximize"], sampler=make_sampler(spec))
    points: list[tuple[float, float]] = []
    untrusted = 0
    start = time.perf_counter()
    for _ in range(n):
        trial = study.ask()
        values = _evaluate(spec, space.suggest(trial))
        if values is None:
            untrusted += 1
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            points.append((math.nan, math.nan))  # counts as a trial, never on the front
        else:
            study.tell(trial, list(values))
            points.append(values)
    history = hypervolume_history(points, ["max", "max"], REFERENCE)
    logger.info("search %s seed %d: %d trials in %.0f s, hypervolume %.4f", sampler, seed, n,
                time.perf_counter() - start, history[-1] if history else 0.0)
    return {"sampler": sampler, "seed": seed, "history": history, "untrusted": untrusted,
            "seconds": time.perf_counter() - start}


def bench_search(seeds: int = 3, max_trials: int = 64, samplers: tuple[str, ...] = SAMPLERS,
                 workers: int | None = None, epochs: int = 2) -> dict[str, Any]:
    """Run every (sampler, seed) search and summarise the hypervolume curves."""
    jobs = [(s, seed) for seed in range(seeds) for s in samplers]
    workers = workers or max(1, min(len(jobs), os.cpu_count() or 1))
    logger.info("bench search: %d searches of %d trials on %d worker processes", len(jobs), max_trials, workers)
    with ProcessPoolExecutor(workers) as pool:
        runs = list(pool.map(_search, [s for s, _ in jobs], [seed for _, seed in jobs], [max_trials] * len(jobs),
                             [epochs] * len(jobs)))
    curves = {s: [r["history"] for r in runs if r["sampler"] == s] for s in samplers}
    mean_curve = {s: [statistics.fmean(h[i] for h in curves[s]) for i in range(max_trials)] for s in samplers}
    goal = mean_curve["random"][-1] if "random" in samplers else None
    to_reach = {}
    for s in samplers:
        reached = [i + 1 for i, v in enumerate(mean_curve[s]) if goal is not None and v >= goal - 1e-12]
        to_reach[s] = reached[0] if reached else None
    checkpoints = [c for c in CHECKPOINTS if c <= max_trials] or [max_trials]
    table = {
        s: {c: (statistics.fmean(h[c - 1] for h in curves[s]),
                statistics.stdev(h[c - 1] for h in curves[s]) if len(curves[s]) > 1 else 0.0)
            for c in checkpoints}
        for s in samplers
    }
    return {"seeds": seeds, "max_trials": max_trials, "checkpoints": checkpoints, "table": table,
            "goal": goal, "trials_to_reach_random": to_reach,
            "untrusted": {s: sum(r["untrusted"] for r in runs if r["sampler"] == s) for s in samplers},
            "seconds": {s: sum(r["seconds"] for r in runs if r["sampler"] == s) for s in samplers},
            "runs": runs}


def format_search(m: dict[str, Any]) -> str:
    cps = m["checkpoints"]
    header = f"{'sampler':<8}" + "".join(f"{'HV @' + str(c):>16}" for c in cps) + f"{'trials to reach random@' + str(m['max_trials']):>28}"
    lines = [f"hypervolume of the (clean, robust) front, reference (0, 0); mean ± sd over {m['seeds']} seeds",
             header, "-" * len(header)]
    for s, row in m["table"].items():
        reach = m["trials_to_reach_random"][s]
        cells = "".join(f"{row[c][0]:>9.4f} ± {row[c][1]:.3f}" for c in cps)
        lines.append(f"{s:<8}{cells}{(str(reach) if reach else 'not reached'):>28}")
    lines.append(f"random search's mean hypervolume after {m['max_trials']} trials: {m['goal']:.4f}")
    lines.append("untrusted/diverged trials (off the front): "
                 + ", ".join(f"{s} {n}" for s, n in m["untrusted"].items()))
    lines.append("compute per sampler (all seeds): " + ", ".join(f"{s} {t / 60:.1f} min" for s, t in m["seconds"].items()))
    return "\n".join(lines)
