"""The study's progress line and closing count name each ending as what it is: completed, stopped early, failed.

A trial the early stopping ends has only per-epoch reports (``final: 0``, ``status: running``);
before this was tested such trials were counted as failed and labelled "running".
"""

from __future__ import annotations

from types import SimpleNamespace

from study.orchestration.progress import ProgressLine


def _trial(defense: str, state: str = "TERMINATED", **result: object) -> SimpleNamespace:
    return SimpleNamespace(config={"defense": defense}, last_result=result, status=state)


def test_progress_line_counts_done_stopped_and_failed_apart(capsys) -> None:
    line = ProgressLine(5, ["max", "max"])
    running = _trial("kap", state="RUNNING")
    done = _trial("kap", final=1, status="completed", trusted=1, val_clean_accuracy=0.9, val_robust_accuracy=0.4)
    stopped = _trial("cas", final=0, status="running", epoch=2)
    diverged = _trial("kwta", final=1, status="diverged", reason="loss is nan")
    for t in (done, stopped, diverged):
        line.on_trial_complete(0, [running, t], t)
    line.on_trial_error(0, [running], _trial("kaf", state="ERROR"))
    out = capsys.readouterr().err.splitlines()
    assert len(out) == 4
    assert out[0].startswith("[  1/5]") and "done 1  running 1  stopped 0  failed 0" in out[0]
    assert "best val clean 90.0%  best val robust 40.0%  | kap: val clean 90.0% robust 40.0%" in out[0]
    assert "done 1  running 1  stopped 1  failed 0" in out[1] and out[1].endswith("| cas: stopped early at epoch 2")
    assert "stopped 1  failed 1" in out[2] and out[2].endswith("| kwta: diverged loss is nan")
    assert out[3].startswith("[  4/5]") and "stopped 1  failed 2" in out[3] and out[3].endswith("| kaf: error")


def test_the_studys_closing_count_keeps_stopped_early_apart_from_failed() -> None:
    from study.results.report import count_line

    records = ([{"status": "completed", "trusted": True}] * 3 + [{"status": "completed", "trusted": False}]
               + [{"status": "stopped", "trusted": False}] * 5 + [{"status": "diverged", "trusted": False},
                                                                  {"status": "failed", "trusted": False}])
    assert count_line("s", records, 80.4) == (
        "study s: 11 trials (4 completed, 5 stopped early, 2 failed, 1 untrusted) in 80s")
