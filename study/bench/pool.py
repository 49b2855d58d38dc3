"""The benchmarks' worker processes: fresh interpreters, one torch thread each, the caller's log levels.

Spawned, never forked. A forked child inherits the parent's torch state, and once the parent's
autograd engine has started its threads, torch refuses any backward pass in a forked child
("Unable to handle autograd's threading in combination with fork-based multiprocessing"). Whether
it has depends on what ran before in that process (CI met it when ``bench evaluation`` ran in a
pytest worker after other tests had trained models), so a benchmark must not depend on it.

A spawned worker starts without the caller's logging set-up; the initializer gives it the root
handler's format and every ``study.*`` logger's level, so a benchmark's ``-v`` progress lines
written by its workers still appear (and the trials' integrity warnings stay as quiet as the
caller made them).
"""

from __future__ import annotations

import logging
import multiprocessing
from concurrent.futures import ProcessPoolExecutor

__all__ = ["spawn_pool"]

_DEFAULT_FORMAT = "%(levelname)s %(name)s: %(message)s"


def _log_setup() -> tuple[int, str, dict[str, int]]:
    root = logging.getLogger()
    fmt = _DEFAULT_FORMAT
    for handler in root.handlers:
        # Formatter keeps its format string in _fmt (no public accessor); fall back to ours.
        fmt = getattr(handler.formatter, "_fmt", None) or fmt
        break
    levels = {name: logger.level for name, logger in logging.Logger.manager.loggerDict.items()
              if name.startswith("study") and isinstance(logger, logging.Logger) and logger.level}
    return root.level, fmt, levels


def _worker_init(root_level: int, fmt: str, levels: dict[str, int]) -> None:
    import torch

    torch.set_num_threads(1)  # one core per worker: the benchmarks count core-seconds
    logging.basicConfig(level=root_level, format=fmt)
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


def spawn_pool(workers: int) -> ProcessPoolExecutor:
    """A pool of ``workers`` spawned processes set up as described above."""
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init,
                               initargs=_log_setup())
