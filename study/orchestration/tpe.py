"""The study's TPE: Optuna's sampler, reading the study's trials once per suggestion.

With ``group=True`` TPE samples each subspace of the conditional space on its own (the demo's
space has a dozen: one per defense branch and recipe), and with ``constant_liar=True`` each of
those reads every trial from the storage again, bypassing the study's cache so that trials
running elsewhere are seen: 14 reads of the same list per suggestion on the demo's space, each a
query to SQLite plus a sort and filter of every trial. Reading once took a fixed 50-70 ms off a
suggestion here (idle: 122 -> 54 ms after 250 finished trials, 149 -> 91 after 1,000, 250 -> 198
after 2,000; docs/benchmarks.md, Scale); the growth with the history is TPE's own work and stays.
Nothing the sampler reads can change during one suggestion except through another driver on the
same study, which constant liar treats as best-effort anyway, so the first read stands for the
rest: the proposals are Optuna's own, the same ones for the same seed and history
(tests/test_tpe.py).
"""

from __future__ import annotations

import copy
from collections.abc import Container, Iterator
from contextlib import contextmanager
from typing import Any

import optuna


@contextmanager
def trials_read_once(study: optuna.Study) -> Iterator[None]:
    """Within the block, ``study._get_trials`` answers repeated uncached reads from the first one.

    Reads through the study's own cache (``use_cache=True``) are already answered once per
    suggestion by Optuna and pass through.
    """
    read = study._get_trials
    memo: dict[tuple[Any, ...], list[optuna.trial.FrozenTrial]] = {}

    def get_trials(deepcopy: bool = True, states: Container[optuna.trial.TrialState] | None = None,
                   use_cache: bool = False) -> list[optuna.trial.FrozenTrial]:
        if use_cache:
            return read(deepcopy=deepcopy, states=states, use_cache=True)
        key = (tuple(states) if states is not None else None,)
        if key not in memo:
            memo[key] = read(deepcopy=False, states=states, use_cache=False)
        # A new list each time (a caller may reorder it); copies of the trials if asked for.
        return copy.deepcopy(memo[key]) if deepcopy else list(memo[key])

    study._get_trials = get_trials  # type: ignore[method-assign]
    try:
        yield
    finally:
        del study._get_trials  # the class's method again


class ReadOnceTPESampler(optuna.samplers.TPESampler):
    """``optuna.samplers.TPESampler`` (same arguments, same proposals) with the study's trials read
    once per suggestion (module docstring)."""

    def sample_relative(self, study: optuna.Study, trial: optuna.trial.FrozenTrial,
                        search_space: dict[str, optuna.distributions.BaseDistribution]) -> dict[str, Any]:
        with trials_read_once(study):
            return super().sample_relative(study, trial, search_space)
