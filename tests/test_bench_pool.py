"""The benchmarks' worker pool: fresh interpreters (so the caller's torch state cannot break them),
one torch thread each, and the caller's log levels.

CI once failed because ``bench evaluation`` forked its workers from a pytest process whose autograd
engine had started its threads: torch then refuses every backward pass in the child. A spawned
worker has no such inheritance, which is what the first test checks (a module the caller imported
must not be there in the worker).
"""

from __future__ import annotations

import logging
import sys
import types

from study.bench.pool import spawn_pool

_MARKER = "robust_study_caller_only_module"


def _worker_state() -> dict[str, object]:
    import torch

    x = torch.randn(3, requires_grad=True)
    (x * x).sum().backward()  # a backward pass works in the worker
    return {"inherited": _MARKER in sys.modules, "threads": torch.get_num_threads(),
            "grad_ok": bool(torch.allclose(x.grad, 2 * x.detach()))}


def _log_from_worker(message: str) -> None:
    logging.getLogger("study.bench.probe").info(message)
    logging.getLogger("study.other.probe").info("quiet " + message)


def test_workers_are_fresh_interpreters_with_one_thread_that_can_train() -> None:
    sys.modules[_MARKER] = types.ModuleType(_MARKER)  # what a forked child would inherit
    try:
        with spawn_pool(1) as pool:
            state = pool.submit(_worker_state).result(timeout=120)
    finally:
        del sys.modules[_MARKER]
    assert state == {"inherited": False, "threads": 1, "grad_ok": True}


def test_workers_log_at_the_callers_levels(capfd) -> None:
    probe = logging.getLogger("study.bench.probe")
    before = probe.level
    probe.setLevel(logging.INFO)  # as `robust-study -v bench ...` sets its bench loggers
    try:
        with spawn_pool(1) as pool:
            pool.submit(_log_from_worker, "progress line 7").result(timeout=120)
    finally:
        probe.setLevel(before)
    err = capfd.readouterr().err
    # The caller's own format (pytest's here) came along with the level.
    assert any("study.bench.probe" in line and "progress line 7" in line for line in err.splitlines())
    # A logger the caller left at its default stays at the root's level (WARNING here): not shown.
    assert "quiet progress line 7" not in err
