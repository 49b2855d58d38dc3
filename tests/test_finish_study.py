"""The study's end: Ray is stopped beside the artifacts, after the verification, and before the
study returns."""

from __future__ import annotations

import sys
import threading
import time
import types

import pytest

from study.spec import load_spec


@pytest.fixture
def end(monkeypatch: pytest.MonkeyPatch) -> dict:
    """finish_study with its collaborators recorded: the verification, a fake ``ray`` whose
    shutdown waits (up to 10 s) for the artifacts to start, and the artifacts themselves."""
    events: list[str] = []
    artifacts_started = threading.Event()

    def shutdown() -> None:
        events.append("shutdown started")
        events.append("shutdown saw the artifacts" if artifacts_started.wait(10) else "shutdown alone")
        time.sleep(0.3)  # longer than the faked rest of the study's end: it would return first
        events.append("shutdown finished")

    def write_artifacts(spec, records, front, final_front):
        artifacts_started.set()
        events.append("artifacts")
        return []

    monkeypatch.setitem(sys.modules, "ray", types.SimpleNamespace(shutdown=shutdown))
    monkeypatch.setattr("study.orchestration.searcher.close_orphaned_optuna_trials", lambda spec: None)
    monkeypatch.setattr("study.orchestration.verify.verify_front",
                        lambda spec, records, progress=False: events.append("verified"))
    monkeypatch.setattr("study.results.artifacts.write_study_artifacts", write_artifacts)
    monkeypatch.setattr("study.orchestration.importance.write_importances", lambda spec, path: (path, {}))
    study_run = types.SimpleNamespace(log_verification=lambda records: None, log_artifacts=lambda paths: None,
                                      log_metrics=lambda metrics: None,
                                      finish=lambda: events.append("parent run finished"))
    return {"events": events, "study_run": study_run}


def test_ray_stops_after_the_verification_beside_the_artifacts(end: dict, tmp_path) -> None:
    from study.orchestration.finish import finish_study

    spec = load_spec("demo").model_copy(update={"storage": str(tmp_path)})
    assert spec.verify
    finish_study(spec, [], end["study_run"], stop_ray=True)
    events = end["events"]
    events.append("returned")
    assert events[0] == "verified"
    assert "shutdown saw the artifacts" in events  # side by side, not one after the other
    assert events[-2:] == ["shutdown finished", "returned"]  # complete when the study returns
    assert "parent run finished" in events


def test_ray_the_study_did_not_start_is_left_running(end: dict, tmp_path) -> None:
    from study.orchestration.finish import finish_study

    spec = load_spec("demo").model_copy(update={"storage": str(tmp_path)})
    finish_study(spec, [], end["study_run"], stop_ray=False)
    assert not any(e.startswith("shutdown") for e in end["events"])
    assert end["events"][0] == "verified"
