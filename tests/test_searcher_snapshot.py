"""The searcher's part of Tune's snapshot: what resume needs, not the whole Optuna study.

Ray Tune snapshots the searcher after every trial; the study's searcher keeps the Optuna study in
optuna.db, so its snapshot holds the unfinished trials' Optuna ids and not every finished trial.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import yaml
from conftest import write_spec


def _final(clean: float, robust: float) -> dict[str, Any]:
    return {"val_clean_accuracy": clean, "val_robust_accuracy": robust, "final": 1, "status": "completed",
            "trusted": 1, "flags_json": json.dumps([])}


def _searcher(tmp_path: Path, name: str = "snap") -> Any:
    from study.orchestration.searcher import make_searcher
    from study.spec import parse_spec

    spec = parse_spec(yaml.safe_load(write_spec(tmp_path, name, trials=200).read_text()))
    study_dir = tmp_path / name
    study_dir.mkdir(exist_ok=True)
    return spec, study_dir, make_searcher(spec, study_dir)


def _run(searcher: Any, first: int, count: int) -> None:
    for i in range(first, first + count):
        searcher.suggest(f"t{i}")
        searcher.on_trial_complete(f"t{i}", result=_final(0.5 + i / 1000, 0.4 - i / 1000))


def test_snapshot_does_not_grow_with_finished_trials(tmp_path: Path) -> None:
    from ray.tune.search.optuna import OptunaSearch

    _, _, searcher = _searcher(tmp_path)
    _run(searcher, 0, 5)
    searcher.save(str(tmp_path / "after5.pkl"))
    ray_after5 = tmp_path / "ray5.pkl"
    OptunaSearch.save(searcher, str(ray_after5))
    _run(searcher, 5, 45)
    searcher.save(str(tmp_path / "after50.pkl"))
    ray_after50 = tmp_path / "ray50.pkl"
    OptunaSearch.save(searcher, str(ray_after50))

    grown = (tmp_path / "after50.pkl").stat().st_size - (tmp_path / "after5.pkl").stat().st_size
    ray_grown = ray_after50.stat().st_size - ray_after5.stat().st_size
    # 45 more finished trials add their Tune ids to the set of completed ones ("t49": a few bytes
    # each) and nothing else; Ray's own save adds each trial's parameters, values and attributes.
    assert grown <= 45 * 16, grown
    assert ray_grown > 45 * 200, ray_grown
    state = pickle.loads((tmp_path / "after50.pkl").read_bytes())
    assert state["_ot_study"] is None and state["_ot_trials"] == {}


def test_restored_searcher_finishes_the_running_trial_in_optuna(tmp_path: Path) -> None:
    import optuna
    from ray import cloudpickle

    from study.orchestration.searcher import optuna_storage_url

    spec, study_dir, searcher = _searcher(tmp_path)
    at_creation = cloudpickle.dumps(searcher)  # Tune keeps the searcher as created in tuner.pkl
    _run(searcher, 0, 3)
    running = searcher.suggest("running")
    number = searcher._ot_trials["running"].number
    searcher.save(str(tmp_path / "state.pkl"))

    # A new driver, as Tune's restore: the searcher from tuner.pkl, then its snapshot.
    fresh = cloudpickle.loads(at_creation)
    fresh.restore(str(tmp_path / "state.pkl"))
    assert set(fresh._ot_trials) == {"running"}
    assert fresh._ot_trials["running"].number == number
    assert fresh._ot_trials["running"].params["defense"] == running["defense"]
    fresh.on_trial_complete("t0", result=_final(0.9, 0.9))  # already finished: ignored
    fresh.on_trial_complete("running", result=_final(0.8, 0.3))

    study = optuna.load_study(study_name=spec.name, storage=optuna_storage_url(study_dir))
    trial = study.trials[number]
    assert trial.state == optuna.trial.TrialState.COMPLETE
    assert trial.values == [0.8, 0.3]
    assert trial.user_attrs["status"] == "completed"
    assert [t.values for t in study.trials[:3]] == [[0.5, 0.4], [0.501, 0.399], [0.502, 0.398]]
    # The restored searcher goes on proposing in the same Optuna study.
    before = len(study.trials)
    fresh.suggest("next")
    assert fresh._ot_trials["next"].number == before
    assert study.trials[before].state == optuna.trial.TrialState.RUNNING


def test_snapshot_written_by_rays_own_save_still_restores(tmp_path: Path) -> None:
    from ray import cloudpickle
    from ray.tune.search.optuna import OptunaSearch

    _, _, searcher = _searcher(tmp_path)
    at_creation = cloudpickle.dumps(searcher)
    _run(searcher, 0, 2)
    searcher.suggest("running")
    OptunaSearch.save(searcher, str(tmp_path / "old.pkl"))  # a study snapshotted before the change

    fresh = cloudpickle.loads(at_creation)
    fresh.restore(str(tmp_path / "old.pkl"))
    assert set(fresh._ot_trials) == {"t0", "t1", "running"}
    fresh.on_trial_complete("running", result=_final(0.7, 0.2))
    assert fresh._ot_study.trials[-1].values == [0.7, 0.2]
