"""Framework-overhead benchmark: the same trials in a plain loop and as a study.

(a) a plain Python loop calls :func:`study.trial.run_trial` on N fixed configurations, one after
the other, with the dataset loaded once; (b) the same N configurations run as a study (Ray Tune
with ``concurrency`` trials at once, Optuna, MLflow logging, artifacts), timed from the call to
:func:`study.runner.run_study` until it returns, Ray's start-up included. On a machine with
``concurrency`` cores, perfect scaling would give wall(b) = wall(a) / concurrency; what (b) spends
beyond that is the framework's cost, reported per trial in core-seconds:

    overhead per trial = (concurrency * wall(b) - wall(a)) / N

The configurations are drawn once (seeded random sampler over the benchmark space) and enqueued
in the study, so both sides train exactly the same models; the per-trial results of the two sides
are compared as a check that they did.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Any

from study.runner import params_key, trial_seconds
from study.spec import StudySpec, parse_spec, trial_config_for

__all__ = ["bench_overhead", "format_overhead", "overhead_spec", "sample_params"]

logger = logging.getLogger(__name__)

#: Issue 6's targets: wall(b)/wall(a) on 2 cores, and framework seconds per trial.
RATIO_TARGET = 0.65
OVERHEAD_TARGET_S = 1.0


def overhead_spec(storage: str | Path, num_trials: int = 16, concurrency: int = 2, epochs: int = 3) -> StudySpec:
    """Short digits trials (small CNN, a few epochs, PGD-10 on 200 samples, checks on)."""
    return parse_spec(
        {
            "name": "bench_overhead",
            "data": {"name": "digits"},
            "model": {"backbone": "small_cnn"},
            # KAP without its noise: a noisy KAP is attacked with EOT as well (the KAP protocol),
            # which makes its trials 5-10x longer than the rest, and one long trial at the end
            # of the queue would measure the queue's imbalance rather than the framework.
            "defenses": {"kap": {"sigma": 0.0}, "cas": {}, "dynamic_k": {}},
            "include_baseline": True,
            "training": {"epochs": epochs, "batch_size": 64, "lr": 0.05},
            "search_eval": {"n_samples": 200, "attacks": [{"name": "pgd", "steps": 10}], "eps_curve": [],
                            "check_samples": 50},
            # (a) has no verification step, so neither has (b): the same work on both sides.
            "verify": False,
            "sampler": {"name": "random", "seed": 0},
            "num_trials": num_trials,
            "concurrency": concurrency,
            "storage": str(storage),
        },
        source="bench overhead",
    )


def sample_params(spec: StudySpec, n: int, seed: int = 0) -> list[dict[str, Any]]:
    """n configurations of the spec's space from a seeded random sampler (Optuna ask, no Ray)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = spec.conditional_space()
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    return [space.suggest(study.ask()) for _ in range(n)]


def _loop(spec: StudySpec, params: list[dict[str, Any]]) -> tuple[float, list[dict[str, float]]]:
    from study.data import load_data
    from study.trial import run_trial

    start = time.perf_counter()
    data = load_data(spec.data, seed=spec.seed)
    results = []
    for i, p in enumerate(params):
        result = run_trial(trial_config_for(spec, p, name=f"loop_{i}"), data=data)
        results.append({"clean_accuracy": result.clean_accuracy, "robust_accuracy": result.robust_accuracy,
                        "seconds": result.train_seconds + result.eval_seconds})
        logger.info("loop trial %d/%d: %.1f s", i + 1, len(params), results[-1]["seconds"])
    return time.perf_counter() - start, results


def _study(spec: StudySpec, params: list[dict[str, Any]]) -> tuple[float, list[dict[str, Any]]]:
    import ray

    from study.runner import run_study

    start = time.perf_counter()
    try:
        outcome = run_study(spec, progress=False, enqueue=params)
    finally:
        ray.shutdown()
    return time.perf_counter() - start, outcome.records


def bench_overhead(num_trials: int = 16, concurrency: int = 2, epochs: int = 3,
                   workdir: str | Path | None = None) -> dict[str, Any]:
    """Run both sides on the same configurations and return the measurements.

    Raises:
        RuntimeError: the study did not complete every trial (the comparison would be void).
    """
    with tempfile.TemporaryDirectory(prefix="bench_overhead_") as tmp:
        spec = overhead_spec(Path(workdir or tmp) / "results", num_trials, concurrency, epochs)
        params = sample_params(spec, num_trials)
        logger.info("bench overhead: %d trials in a plain loop", num_trials)
        import torch

        loop_threads = torch.get_num_threads()
        wall_a, loop_results = _loop(spec, params)
        logger.info("bench overhead: the same %d trials as a study, concurrency %d", num_trials, concurrency)
        wall_b, records = _study(spec, params)
    completed = [r for r in records if r["status"] == "completed"]
    if len(completed) != num_trials:
        raise RuntimeError(f"study completed {len(completed)} of {num_trials} trials: {[r['status'] for r in records]}")
    # Match trials by configuration: the study may finish them in any order.
    by_params = {params_key(r["params"]): r for r in completed}
    differences = [
        abs(by_params[params_key(p)]["clean_accuracy"] - a["clean_accuracy"])
        + abs(by_params[params_key(p)]["robust_accuracy"] - a["robust_accuracy"])
        for p, a in zip(params, loop_results, strict=True)
        if params_key(p) in by_params
    ]
    # The trials' own seconds inside the study (training + attacks, timed in the worker): what
    # the cores spent on the trials; the rest of concurrency * wall(b) is the framework's.
    study_trial_s = sum(trial_seconds(r) for r in completed)
    return {
        "num_trials": num_trials,
        "loop_threads": loop_threads,
        "study_trial_s": study_trial_s,
        "framework_per_trial_s": (concurrency * wall_b - study_trial_s) / num_trials,
        "longest_trial_s": max(trial_seconds(r) for r in completed),
        "concurrency": concurrency,
        "wall_loop_s": wall_a,
        "wall_study_s": wall_b,
        "ratio": wall_b / wall_a,
        "overhead_per_trial_s": (concurrency * wall_b - wall_a) / num_trials,
        "mean_trial_s": sum(a["seconds"] for a in loop_results) / num_trials,
        "matched_trials": len(differences),
        "max_result_difference": max(differences, default=float("nan")),
    }



def format_overhead(m: dict[str, Any]) -> str:
    ratio_ok = "ok" if m["ratio"] <= RATIO_TARGET else "MISSED"
    over_ok = "ok" if m["overhead_per_trial_s"] < OVERHEAD_TARGET_S else "MISSED"
    return "\n".join([
        f"trials: {m['num_trials']} (mean {m['mean_trial_s']:.1f} s of training + attacks each, in the loop)",
        f"(a) plain loop, sequential, torch threads {m['loop_threads']}: {m['wall_loop_s']:7.1f} s",
        f"(b) study, concurrency {m['concurrency']}, MLflow:        {m['wall_study_s']:7.1f} s "
        f"(trials' own work {m['study_trial_s']:.1f} s at 1 thread each; longest trial {m['longest_trial_s']:.1f} s)",
        f"wall(b)/wall(a):                         {m['ratio']:7.2f}   target <= {RATIO_TARGET} {ratio_ok}",
        f"overhead per trial vs the loop:          {m['overhead_per_trial_s']:7.2f} core-s   target < {OVERHEAD_TARGET_S} {over_ok}",
        f"framework time per trial in the study:   {m['framework_per_trial_s']:7.2f} core-s "
        "(cores not running trial code: Ray start, scheduling, reporting, MLflow, artifacts, idle tail)",
        f"same results on both sides:         {m['matched_trials']}/{m['num_trials']} configs matched, "
        f"largest |difference| {m['max_result_difference']:.4f}",
    ])
