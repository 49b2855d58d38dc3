"""One trial, one record, one MLflow run: the attempts of a trial (retries, the continuation after an
interrupted driver is resumed) share its Ray Tune id and are counted once, keeping the final one."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from study.results.identity import duplicated, one_record_per_trial, trial_id_from_dir
from tests.audits import audit_facts as _audit

DIR = "_trainable_1ff494ed_7_defense=cas,training_recipe=f_2026-12-03_13-50-11"


def _result(folder: str, metrics: dict, error: Exception | None = None) -> SimpleNamespace:
    """What Ray Tune hands the runner for one trial (the fields collect_records reads)."""
    return SimpleNamespace(
        metrics=metrics, config={"defense": "none"}, error=error, path=f"/study/tune/{folder}", checkpoint=None
    )


def _final(trial_id: str, clean: float, timestamp: int) -> dict:
    return {
        "trial_id": trial_id,
        "final": 1,
        "status": "completed",
        "trusted": 1,
        "flags_json": "[]",
        "val_clean_accuracy": clean,
        "val_robust_accuracy": clean / 2,
        "timestamp": timestamp,
    }


def test_trial_id_is_read_from_tunes_folder_name() -> None:
    assert trial_id_from_dir(DIR) == "1ff494ed"
    assert trial_id_from_dir("trial_00001") is None  # not a Tune folder name
    assert trial_id_from_dir("_") is None


def test_duplicated_names_each_repeated_id_once() -> None:
    assert duplicated(["a", "b", "a", "c", "a", "b"]) == ["a", "b"]
    assert duplicated(["a", "b"]) == []


def test_a_trial_cut_before_its_first_report_and_rerun_is_one_record_with_its_final_result() -> None:
    # Attempt 1: the driver was interrupted before the trial reported (no metrics: its id is only
    # in its folder's name). Attempt 2, after resume: the same trial, now with its final report.
    from study.orchestration.runner import collect_records

    cut = _result(DIR, {})
    rerun = _result(DIR, _final("1ff494ed", 0.8, timestamp=200))
    other = _result("_trainable_aaaa0000_1_defense=none_2026-12-03_13-40-00", _final("aaaa0000", 0.7, 100))
    for grid in ([cut, rerun, other], [rerun, cut, other], [other, rerun, cut]):
        records = collect_records(SimpleNamespace(), grid)
        assert sorted(r["trial_id"] for r in records) == ["1ff494ed", "aaaa0000"]
        kept = next(r for r in records if r["trial_id"] == "1ff494ed")
        assert kept["status"] == "completed" and kept["val_clean_accuracy"] == 0.8
        assert [r["number"] for r in records] == [0, 1]


def test_the_same_trial_twice_keeps_the_final_result_over_a_later_unfinished_attempt() -> None:
    from study.orchestration.runner import collect_records

    final = _result(DIR, _final("1ff494ed", 0.8, timestamp=100))
    later_epoch = _result(DIR, {"trial_id": "1ff494ed", "epoch": 1, "final": 0, "timestamp": 300})
    died = _result(DIR, {"trial_id": "1ff494ed", "epoch": 1, "timestamp": 400}, error=RuntimeError("worker died"))
    records = collect_records(SimpleNamespace(), [later_epoch, final, died])
    assert len(records) == 1
    assert records[0]["status"] == "completed" and records[0]["val_clean_accuracy"] == 0.8


def test_a_stopped_trial_keeps_the_times_of_its_last_epoch_report_and_a_failed_one_has_none() -> None:
    # Early stopping ends a trial on a per-epoch report: its record keeps when it ran and how long
    # it trained, but no objective (it was never attacked).
    from study.orchestration.runner import collect_records

    epoch = {"epoch": 2, "final": 0, "status": "running", "val_clean_accuracy": 0.5, "timestamp": 50,
             "started_at": 1000.0, "ended_at": 1012.5, "trained_seconds": 9.25}
    stopped = _result("_trainable_bbbb0000_2_defense=none_2026-12-03_13-40-00", {**epoch, "trial_id": "bbbb0000"})
    failed = _result("_trainable_cccc0000_3_defense=none_2026-12-03_13-40-00", {**epoch, "trial_id": "cccc0000"},
                     error=RuntimeError("worker died"))
    by_id = {r["trial_id"]: r for r in collect_records(SimpleNamespace(), [stopped, failed])}
    assert by_id["bbbb0000"]["status"] == "stopped"
    assert (by_id["bbbb0000"]["started_at"], by_id["bbbb0000"]["ended_at"]) == (1000.0, 1012.5)
    assert by_id["bbbb0000"]["train_seconds"] == 9.25
    assert by_id["bbbb0000"]["val_clean_accuracy"] is None and by_id["bbbb0000"]["eval_seconds"] is None
    assert by_id["cccc0000"]["status"] == "failed"
    assert by_id["cccc0000"]["started_at"] is None and by_id["cccc0000"]["train_seconds"] is None


def test_two_unfinished_attempts_keep_the_later_one_and_no_trial_is_dropped() -> None:
    records = [
        {"trial_id": "a", "status": "stopped", "val_clean_accuracy": None, "finished_at": 5},
        {"trial_id": "b", "status": "failed", "val_clean_accuracy": None, "finished_at": 1},
        {"trial_id": "a", "status": "failed", "val_clean_accuracy": None, "finished_at": 9},
    ]
    kept, twice = one_record_per_trial(records)
    assert twice == ["a"]
    assert [(r["trial_id"], r["status"]) for r in kept] == [("b", "failed"), ("a", "failed")]


# --------------------------------------------------------------------------- MLflow


@pytest.fixture
def store(tmp_path: Path):
    from study.tracking import _client, ensure_experiment

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = _client(uri)
    experiment_id = ensure_experiment(client, "identity", tmp_path / "mlartifacts")
    parent = client.create_run(experiment_id, run_name="study").info.run_id
    return SimpleNamespace(uri=uri, client=client, experiment_id=experiment_id, parent=parent, root=tmp_path)


def _trial_dir(root: Path) -> Path:
    folder = root / "tune" / DIR
    folder.mkdir(parents=True)
    (folder / "params.json").write_text(json.dumps({"defense": "none"}))
    lines = [
        {"trial_id": "1ff494ed", "epoch": 1, "final": 0, "epoch_val_accuracy": 0.5, "timestamp": 100},
        _final("1ff494ed", 0.8, timestamp=200),
    ]
    (folder / "result.json").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    return folder


def _children(store) -> list:
    from study.tracking import PARENT_TAG

    runs = store.client.search_runs([store.experiment_id], max_results=100)
    return [r for r in runs if r.data.tags.get(PARENT_TAG) == store.parent]


def test_logging_a_trial_again_from_another_driver_reuses_its_run(store) -> None:
    # The interrupted driver and the resumed one each build their own trial -> run table: the
    # second must find the first's run by the trial id, not create another.
    from study.tracking import TRIAL_ID_TAG, _Runs, replay_trial, trial_files_from_dir

    folder = _trial_dir(store.root)
    for _ in range(2):
        replay_trial(_Runs(store.client, store.experiment_id, store.parent, "identity"), trial_files_from_dir(folder))
    children = _children(store)
    assert [c.data.tags[TRIAL_ID_TAG] for c in children] == ["1ff494ed"]
    assert children[0].info.status == "FINISHED"
    history = store.client.get_metric_history(children[0].info.run_id, "val_clean_accuracy")
    assert [m.value for m in history] == [0.8]  # logged twice, stored once


def test_two_runs_of_one_trial_are_read_as_one_and_the_extra_is_retired(store) -> None:
    # A store holding two runs of one trial (an older version, two drivers on one study): the
    # table keeps the complete one and the reconciliation at the study's end removes the other.
    from study.tracking import PARENT_TAG, STUDY_TAG, TRIAL_ID_TAG, MlflowTrialLogger, _Runs

    tags = {PARENT_TAG: store.parent, TRIAL_ID_TAG: "1ff494ed", STUDY_TAG: "identity"}
    finished = store.client.create_run(store.experiment_id, run_name="trial-1ff494ed", tags=tags).info.run_id
    store.client.set_terminated(finished, "FINISHED")
    store.client.create_run(store.experiment_id, run_name="trial-1ff494ed", tags=tags)  # a later attempt's
    runs = _Runs(store.client, store.experiment_id, store.parent, "identity")
    assert runs.run_id("1ff494ed") == finished
    logger = MlflowTrialLogger(store.uri, store.experiment_id, store.parent, "identity")
    trial = SimpleNamespace(
        trial_id="1ff494ed", status="TERMINATED", path=None, config={"defense": "none"}, last_result={}, checkpoint=None
    )
    logger.on_experiment_end([trial])
    children = _children(store)
    assert [c.info.run_id for c in children] == [finished]


# --------------------------------------------------------------------------- an interrupted search


def _trial(trial_id: str, status: str) -> SimpleNamespace:
    return SimpleNamespace(trial_id=trial_id, status=status)


def _run_watch(before: list, events: list, after: list) -> list[str] | None:
    """Drive an InterruptWatch as Tune's loop does: steps, trial ends, then the experiment's end."""
    import pickle

    from study.orchestration.interrupt import InterruptWatch, unfinished_trials

    watch = pickle.loads(pickle.dumps(InterruptWatch("/study/x")))  # Tune restores its own copy
    if before is not None:
        watch.on_step_begin(0, before)
    for kind, trial in events:
        getattr(watch, f"on_trial_{kind}")(1, [], trial)
    watch.on_experiment_end(after)
    return unfinished_trials("/study/x")


def test_a_search_that_ended_every_trial_is_not_interrupted() -> None:
    a, b, c = _trial("a", "TERMINATED"), _trial("b", "TERMINATED"), _trial("c", "ERROR")
    # a ended under an earlier driver (resumed study); b completed (or was stopped early), c failed here.
    events = [("complete", b), ("error", c)]
    assert _run_watch([a, _trial("b", "PENDING"), _trial("c", "PENDING")], events, [a, b, c]) == []


def test_trials_cut_by_an_interrupt_are_unfinished_although_tune_marks_them_terminated() -> None:
    # Ctrl-C: Tune stops the running trial (status TERMINATED, no completion event) and leaves the
    # pending one PENDING; both are continued by resume, so the study must not be finished.
    done, cut, pending = _trial("a", "TERMINATED"), _trial("b", "TERMINATED"), _trial("c", "PENDING")
    before = [_trial("a", "RUNNING"), _trial("b", "RUNNING")]
    assert _run_watch(before, [("complete", done)], [done, cut, pending]) == ["b", "c"]


def test_an_interrupt_before_the_first_step_leaves_the_restored_unfinished_trials_unfinished() -> None:
    assert _run_watch(None, [], [_trial("a", "TERMINATED"), _trial("b", "PENDING")]) == ["b"]


def test_no_watch_means_no_verdict() -> None:
    from study.orchestration.interrupt import unfinished_trials

    assert unfinished_trials("/study/never-ran") is None


# --------------------------------------------------------------------------- the audit


def test_the_audit_names_a_trial_recorded_twice() -> None:
    from study.bench import scale
    from study.bench.load import audit_problems

    assert audit_problems(_audit()) == []
    # The reported incident: 145 records, 144 distinct ids, one MLflow run too many.
    twice = _audit(
        records=4, duplicate_trial_ids=["1ff494ed"], mlflow_children=4, mlflow_duplicate_trial_ids=["1ff494ed"]
    )
    problems = audit_problems(twice)
    assert any("trials.json" in p and "1ff494ed" in p for p in problems), problems
    assert any("MLflow" in p and "1ff494ed" in p for p in problems), problems
    # bench scale's verdict is this audit's.
    assert scale.consistent(_audit()) and not scale.consistent(twice)


def test_the_audit_reports_completed_trials_optuna_was_told_as_failed() -> None:
    # What an interrupted driver that closed its cut trials' Optuna trials left after resume.
    from study.bench.load import audit_problems

    problems = audit_problems(_audit(optuna_states={"COMPLETE": 1, "FAIL": 2}))
    assert len(problems) == 1 and problems[0].startswith("Optuna"), problems
