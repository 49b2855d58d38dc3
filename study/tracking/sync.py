"""robust-study sync: log what a study could not log while its MLflow server was away."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from study.config import ConfigError
from study.tracking.replay import _Runs, replay_trial
from study.tracking.store import PARENT_ARTIFACTS, _client, check_reachable
from study.tracking.trial_files import trial_files_from_dir

# --------------------------------------------------------------------------- sync command


@dataclass
class SyncReport:
    trials: int  # trials found on disk
    replayed: int  # trials whose runs were (re)logged
    parent_logged: bool


def sync_study(study_dir: Path) -> SyncReport:
    """Log into MLflow whatever of a study is missing there, from the study's files.

    For ``robust-study sync NAME``: after a study failed because its tracking server was away.
    Idempotent: complete runs are left alone, so it can be run any number of times.

    Raises:
        ConfigError: no such study, or the tracking store still unreachable.
    """
    state_file = study_dir / "study.json"
    if not state_file.is_file():
        raise ConfigError(f"sync: no study in {study_dir} (no study.json)")
    state = json.loads(state_file.read_text())
    uri, parent_run_id = state["tracking_uri"], state["parent_run_id"]
    name = state.get("spec", {}).get("name", study_dir.name)
    check_reachable(uri)
    client = _client(uri)
    experiment_id = state.get("experiment_id") or client.get_run(parent_run_id).info.experiment_id
    records = []
    if (study_dir / "trials.json").is_file():
        records = json.loads((study_dir / "trials.json").read_text())
    status_of = {r.get("trial_id"): r.get("status") for r in records}
    runs = _Runs(client, experiment_id, parent_run_id, name)
    trials = replayed = 0
    for trial_dir in sorted(p for p in (study_dir / "tune").glob("*") if (p / "params.json").is_file()):
        files = trial_files_from_dir(trial_dir)
        if files is None:
            continue
        if records and files.trial_id not in status_of:
            continue  # not one of the study's trials (see MlflowTrialLogger._retire_lost_trials)
        files = trial_files_from_dir(trial_dir, status_of.get(files.trial_id))
        trials += 1
        if files is not None and not runs.is_complete(files.trial_id):
            replay_trial(runs, files)
            replayed += 1
    parent_logged = False
    parent = client.get_run(parent_run_id)
    if records and parent.info.status != "FINISHED":
        from mlflow.entities import Metric

        from study.tracking.verification import log_verification

        log_verification(runs, records)
        for artifact in PARENT_ARTIFACTS:
            if (study_dir / artifact).is_file():
                client.log_artifact(parent_run_id, str(study_dir / artifact))
        now = int(time.time() * 1000)
        summary = {
            "trials_completed": sum(r.get("status") == "completed" for r in records),
            "trials_failed": sum(r.get("status") != "completed" for r in records),
            "front_size": sum(bool(r.get("on_front")) for r in records),
            "final_front_size": sum(bool(r.get("on_final_front")) for r in records),
            "front_unverified": sum(r.get("verified") is False for r in records),
        }
        client.log_batch(parent_run_id, metrics=[Metric(k, float(v), now, 0) for k, v in summary.items()])
        client.set_terminated(parent_run_id, "FINISHED")
        parent_logged = True
    return SyncReport(trials, replayed, parent_logged)
