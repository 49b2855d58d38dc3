"""A trial saves an epoch checkpoint only once spec.checkpoint_every_seconds of training have passed.

The trainable runs here without Ray: ray.tune's report, get_checkpoint and get_context are
replaced by recorders, and a stand-in trial reports epochs whose cumulative training seconds are
chosen so that the expected checkpoints follow by hand from the rule "save when the training
seconds since the last saved checkpoint reach the interval".
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from study.spec import StudySpec

# Cumulative training seconds at the end of epochs 1..5.
SECONDS = [10.0, 25.0, 70.0, 80.0, 140.0]


def _trial(seconds: list[float], first_epoch: int = 1):
    def trial(config: Any, *, on_epoch: Any = None, resume: Any = None, data: Any = None) -> Any:
        from study.training.loop import EpochReport
        from study.trial import TrialResult

        for i, s in enumerate(seconds):
            epoch = first_epoch + i
            on_epoch(EpochReport(epoch, {"val_accuracy": 0.5}, {"epoch": epoch, "seconds": s}))
        return TrialResult(status="completed", clean_accuracy=0.5, robust_accuracy=0.25, trusted=True,
                           epochs_run=first_epoch + len(seconds) - 1, split="val")

    return trial


def _without_ray(monkeypatch, report: Any, restored: Any = None) -> None:
    """ray.tune's report, get_checkpoint and get_context as the trainable sees them in a trial."""
    from ray import tune

    monkeypatch.setattr(tune, "report", report)
    monkeypatch.setattr(tune, "get_context", lambda: type("Ctx", (), {"get_trial_name": lambda self: "t"})())
    monkeypatch.setattr(tune, "get_checkpoint", lambda: restored)


def _run(monkeypatch, tmp_path: Path, every: float, seconds: list[float],
         resume_from: dict[str, Any] | None = None, first_epoch: int = 1) -> list[tuple[int, bool]]:
    """(epoch, saved a checkpoint) for every per-epoch report the trainable sent to Tune."""
    from ray import tune

    from study.orchestration import runner

    reports: list[tuple[dict[str, Any], Any]] = []
    restored = None
    if resume_from is not None:
        folder = tmp_path / "restored"
        folder.mkdir()
        torch.save(resume_from, folder / "state.pt")
        restored = tune.Checkpoint.from_directory(str(folder))
    _without_ray(monkeypatch, lambda metrics, checkpoint=None: reports.append((metrics, checkpoint)), restored)

    spec = StudySpec(name="interval", storage=str(tmp_path / "results"), checkpoint_every_seconds=every)
    runner._trainable({"defense": "none"}, spec.model_dump(mode="json"), trial_fn=_trial(seconds, first_epoch))
    epochs = [(int(m["epoch"]), c is not None) for m, c in reports if not m["final"]]
    assert len(epochs) == len(seconds) and reports[-1][0]["final"] == 1 and reports[-1][1] is not None
    return epochs


def test_every_epoch_with_interval_zero(monkeypatch, tmp_path: Path) -> None:
    assert _run(monkeypatch, tmp_path, 0.0, SECONDS) == [(1, True), (2, True), (3, True), (4, True), (5, True)]


def test_interval_of_60_seconds(monkeypatch, tmp_path: Path) -> None:
    # 70 - 0 >= 60 saves at epoch 3; then 80 - 70 = 10 and 140 - 70 = 70 >= 60 saves at epoch 5.
    assert _run(monkeypatch, tmp_path, 60.0, SECONDS) == [(1, False), (2, False), (3, True), (4, False), (5, True)]


def test_short_trial_saves_only_its_final_checkpoint(monkeypatch, tmp_path: Path) -> None:
    assert _run(monkeypatch, tmp_path, 600.0, SECONDS) == [(e, False) for e in range(1, 6)]


def test_resumed_trial_counts_from_its_checkpoint(monkeypatch, tmp_path: Path) -> None:
    # Resumed at 50 training seconds: 70 - 50 = 20 and 80 - 50 = 30 are short of 60, 140 - 50 = 90 is not.
    epochs = _run(monkeypatch, tmp_path, 60.0, [70.0, 80.0, 140.0], resume_from={"epoch": 2, "seconds": 50.0},
                  first_epoch=3)
    assert epochs == [(3, False), (4, False), (5, True)]


@pytest.mark.parametrize("every", [-1.0, 86_401.0])
def test_interval_out_of_range_is_refused(every: float) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="checkpoint_every_seconds"):
        StudySpec(name="interval", checkpoint_every_seconds=every)


def test_final_report_carries_each_flags_verdict_and_the_checkpoint_the_whole_flag(monkeypatch, tmp_path: Path) -> None:
    # Tune keeps the final report in every snapshot of the study; what each flag measured stays in
    # the trial's checkpoint (result.json), where evaluate and users read it.
    import json

    from study.orchestration import runner
    from study.results.records import trial_outcome
    from study.trial import TrialResult

    flags = [
        {"id": "R2", "name": "large_eps", "passed": True, "gate": True, "values": {"accuracy": 0.1}, "message": "ok"},
        {"id": "R6", "name": "more_restarts", "passed": False, "gate": False, "values": {"a": 0.28, "b": 0.26},
         "message": "twice the restarts lowers accuracy"},
        {"id": "R8", "name": "black_box", "passed": False, "gate": True, "values": {"broken": 3}, "message": "Square"},
    ]

    def trial(config: Any, *, on_epoch: Any = None, resume: Any = None, data: Any = None) -> Any:
        return TrialResult(status="completed", clean_accuracy=0.9, robust_accuracy=0.4, trusted=False,
                           epochs_run=1, split="val", flags=flags)

    reports: list[tuple[dict[str, Any], dict[str, Any]]] = []

    def report(metrics: dict[str, Any], checkpoint: Any = None) -> None:
        reports.append((metrics, json.loads((Path(checkpoint.path) / "result.json").read_text())))

    _without_ray(monkeypatch, report)
    spec = StudySpec(name="verdicts", storage=str(tmp_path / "results"))
    runner._trainable({"defense": "none"}, spec.model_dump(mode="json"), trial_fn=trial)
    (metrics, saved), = reports
    assert json.loads(metrics["flags_json"]) == [
        {"id": "R2", "name": "large_eps", "passed": True, "gate": True},
        {"id": "R6", "name": "more_restarts", "passed": False, "gate": False},
        {"id": "R8", "name": "black_box", "passed": False, "gate": True},
    ]
    assert trial_outcome(metrics, raised=False) == {"status": "completed", "trusted": False, "failed_gates": ["R8"]}
    assert saved["flags"] == flags
