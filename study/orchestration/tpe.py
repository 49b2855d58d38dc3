"""The study's TPE: Optuna's sampler, reading and splitting the study's trials once per suggestion.

With ``group=True`` TPE samples each subspace of the conditional space on its own (the demo's
space has a dozen: one per defense branch and recipe), and with ``constant_liar=True`` each of
those reads every trial from the storage again, bypassing the study's cache so that trials
running elsewhere are seen: 14 reads of the same list per suggestion on the demo's space, each a
query to SQLite plus a sort and filter of every trial. Each subspace then also splits those same
trials into good and bad again (a non-dominated sort of the whole history). Both are done once
per suggestion here. Alone and idle, a suggestion took 47 / 81 / 114 ms after 250 / 1,000 / 2,000
finished trials against Optuna's 102 / 172 / 231 ms (reading once alone: a fixed 50-70 ms less);
the rest still grows with the history (docs/benchmarks.md, Scale).
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
from optuna.samplers._tpe import sampler as _tpe_sampler


@contextmanager
def trials_read_once(study: optuna.Study) -> Iterator[None]:
    """Within the block, ``study._get_trials`` answers repeated uncached reads from the first one.

    Reads through the study's own cache (``use_cache=True``) are already answered once per
    suggestion by Optuna and pass through.
    """
    read = study._get_trials
    memo: dict[tuple[optuna.trial.TrialState, ...] | None, list[optuna.trial.FrozenTrial]] = {}

    def get_trials(deepcopy: bool = True, states: Container[optuna.trial.TrialState] | None = None,
                   use_cache: bool = False) -> list[optuna.trial.FrozenTrial]:
        if use_cache:
            return read(deepcopy=deepcopy, states=states, use_cache=True)
        key = tuple(states) if states is not None else None
        if key not in memo:
            memo[key] = read(deepcopy=False, states=states, use_cache=False)
        # A new list each time (a caller may reorder it); copies of the trials if asked for.
        return copy.deepcopy(memo[key]) if deepcopy else list(memo[key])

    study._get_trials = get_trials  # type: ignore[method-assign]
    try:
        yield
    finally:
        del study._get_trials  # the class's method again


@contextmanager
def split_once() -> Iterator[None]:
    """Within the block, TPE's split of the trials into good and bad is computed once per input.

    Every subspace splits the same trials with the same number of good ones (the split looks at the
    objectives only), and the split sorts the whole history non-dominated: after ~750 trials it was
    16 % of the driver's time here, done a dozen times over per suggestion. Optuna calls it by its
    module-level name, which is what is replaced for the block (the driver samples on one thread).
    """
    split = _tpe_sampler._split_trials
    memo: dict[tuple[Any, ...], tuple[list[Any], list[Any]]] = {}

    def split_trials(study: optuna.Study, trials: list[optuna.trial.FrozenTrial],
                     n_below: int) -> tuple[list[Any], list[Any]]:
        key = (n_below, tuple(t._trial_id for t in trials))  # one study per block
        if key not in memo:
            memo[key] = split(study, trials, n_below)
        below, above = memo[key]
        return list(below), list(above)

    _tpe_sampler._split_trials = split_trials
    try:
        yield
    finally:
        _tpe_sampler._split_trials = split


class ReadOnceTPESampler(optuna.samplers.TPESampler):
    """``optuna.samplers.TPESampler`` (same arguments, same proposals) with the study's trials read,
    and split into good and bad, once per suggestion instead of once per subspace (module docstring)."""

    def sample_relative(self, study: optuna.Study, trial: optuna.trial.FrozenTrial,
                        search_space: dict[str, optuna.distributions.BaseDistribution]) -> dict[str, Any]:
        with trials_read_once(study), split_once():
            return super().sample_relative(study, trial, search_space)
