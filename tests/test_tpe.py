"""The study's TPE reads the study's trials once per suggestion and proposes exactly what Optuna's
TPESampler proposes (study/orchestration/tpe.py)."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import optuna
import pytest

from study.bench.scale import scale_spec, synthetic_objectives
from study.orchestration.tpe import ReadOnceTPESampler, trials_read_once

ARGS = {"seed": 3, "n_startup_trials": 8, "multivariate": True, "group": True, "constant_liar": True}


def _history(db: Path, space: Any, n: int) -> None:
    """``n`` finished trials drawn at random over the demo's conditional space, in SQLite."""
    study = optuna.create_study(storage=f"sqlite:///{db}", study_name="s", directions=["maximize", "maximize"],
                                sampler=optuna.samplers.RandomSampler(seed=1))
    for _ in range(n):
        trial = study.ask()
        study.tell(trial, list(synthetic_objectives(space.suggest(trial))))


def _suggestions(db: Path, space: Any, sampler: optuna.samplers.BaseSampler) -> tuple[list[dict], list[int]]:
    """Five suggestions with two trials running (constant liar lies about them), and how many times
    each suggestion read every trial from the storage."""
    study = optuna.load_study(storage=f"sqlite:///{db}", study_name="s", sampler=sampler)
    storage = study._storage
    reads = {"n": 0}
    real = storage.get_all_trials

    def counted(*args: Any, **kwargs: Any) -> Any:
        reads["n"] += 1
        return real(*args, **kwargs)

    storage.get_all_trials = counted  # type: ignore[method-assign]
    running = [study.ask() for _ in range(2)]
    for trial in running:
        space.suggest(trial)
    proposals, per_suggestion = [], []
    for _ in range(5):
        before = reads["n"]
        trial = study.ask()
        proposals.append(space.suggest(trial))
        per_suggestion.append(reads["n"] - before)
        study.tell(trial, list(synthetic_objectives(proposals[-1])))
    return proposals, per_suggestion


def test_read_once_tpe_proposes_what_optunas_tpe_proposes_with_a_fraction_of_the_reads(tmp_path: Path) -> None:
    optuna.logging.set_verbosity(logging.WARNING)
    space = scale_spec(tmp_path / "results").conditional_space()  # the demo's space: a dozen subspaces
    _history(tmp_path / "a.db", space, 40)
    shutil.copy(tmp_path / "a.db", tmp_path / "b.db")
    plain, plain_reads = _suggestions(tmp_path / "a.db", space, optuna.samplers.TPESampler(**ARGS))
    once, once_reads = _suggestions(tmp_path / "b.db", space, ReadOnceTPESampler(**ARGS))
    assert once == plain, (once_reads, plain_reads)
    assert len({p["defense"] for p in plain}) > 1  # the comparison spans more than one branch
    # Optuna's TPE reads once per subspace it samples; the study's reads once per suggestion
    # (plus the study's own reads in ask/tell, the same for both).
    assert all(o < p for o, p in zip(once_reads, plain_reads)), (once_reads, plain_reads)
    assert max(p - o for o, p in zip(once_reads, plain_reads)) >= 5, (once_reads, plain_reads)


def test_the_memo_lasts_one_block_and_keeps_deepcopy_and_state_filters(tmp_path: Path) -> None:
    optuna.logging.set_verbosity(logging.WARNING)
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'c.db'}", directions=["maximize", "maximize"])
    study.tell(study.ask(), [0.1, 0.2])
    running = study.ask()
    complete = (optuna.trial.TrialState.COMPLETE,)
    with trials_read_once(study):
        first = study._get_trials(deepcopy=False, states=complete)
        study.tell(running, [0.3, 0.4])  # not seen again inside the block: the first read stands
        assert [t.number for t in study._get_trials(deepcopy=False, states=complete)] == [0]
        assert study._get_trials(deepcopy=False, states=complete) is not first  # a new list each time
        copied = study._get_trials(deepcopy=True, states=complete)
        assert copied[0] is not first[0] and copied[0].values == first[0].values
        assert [t.number for t in study._get_trials(deepcopy=False)] == [0, 1]  # other filters read anew
    assert [t.number for t in study._get_trials(deepcopy=False, states=complete)] == [0, 1]
    assert "_get_trials" not in vars(study)


def test_the_study_samples_with_it() -> None:
    from study.orchestration.searcher import make_sampler

    pytest.importorskip("ray")
    spec = scale_spec("results")
    assert isinstance(make_sampler(spec), ReadOnceTPESampler)


def test_the_split_is_computed_once_per_input_within_the_block_and_optunas_is_back_after() -> None:
    from optuna.samplers._tpe import sampler as tpe_module

    from study.orchestration.tpe import split_once

    optuna.logging.set_verbosity(logging.WARNING)
    study = optuna.create_study(directions=["maximize", "maximize"])
    for values in ([0.9, 0.1], [0.1, 0.9], [0.5, 0.5], [0.2, 0.2]):
        study.tell(study.ask(), values)
    trials = study.get_trials(deepcopy=False)
    optunas = tpe_module._split_trials
    calls = []

    def counting(*args: Any) -> Any:
        calls.append(args[2])
        return optunas(*args)

    tpe_module._split_trials = counting
    try:
        with split_once():
            first = tpe_module._split_trials(study, trials, 3)
            again = tpe_module._split_trials(study, list(trials), 3)
            other = tpe_module._split_trials(study, trials, 1)
            assert tpe_module._split_trials is not counting
        assert tpe_module._split_trials is counting  # what was there before the block
    finally:
        tpe_module._split_trials = optunas
    assert calls == [3, 1]  # the repeated input was answered from the first split
    # By hand: the three non-dominated trials (#0, #1, #2) are the good ones when three are asked
    # for; #3 (0.2, 0.2) is dominated by #2.
    assert [t.number for t in first[0]] == [0, 1, 2] and [t.number for t in first[1]] == [3]
    assert again == first and again[0] is not first[0]  # equal, in new lists
    assert len(other[0]) == 1
