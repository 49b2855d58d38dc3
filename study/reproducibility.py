"""What decides a trial's numbers besides its config, recorded with the trial and applied on re-run.

A trial's weights and accuracies depend on torch's intra-op thread count (a reduction split over
more threads sums in another order: different rounding, different weights after a few steps), on
the deterministic-algorithm switches (GPU kernels that accumulate with atomics), on the seeds, on
the device and on the library versions. A study trains each trial with one thread per reserved
CPU (Ray's rule); a re-run from the command line would otherwise take torch's default (every
core) and land on other numbers. So the trial config carries a ``reproducibility`` section:
``threads`` and ``deterministic`` are applied for the duration of the trial (and the process's
settings restored afterwards); ``environment`` records the device type and library versions the
numbers came from, and a re-run in another environment says so in one warning line.
docs/reproducibility.md says what is and is not bit-reproducible.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import random
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib import metadata
from typing import Any, TypeVar

from study.config import ENVIRONMENT_KEYS, ReproducibilityConfig, TrialConfig

log = logging.getLogger(__name__)

LIBRARIES = ENVIRONMENT_KEYS[1:]  # torch, torchvision, torchattacks, numpy

R = TypeVar("R")


def threads_for_cpus(cpus: float) -> int:
    """Ray's rule for a worker with ``cpus`` reserved (OMP_NUM_THREADS): the floor, at least 1."""
    return max(1, math.floor(cpus))


def current_environment(device_type: str) -> dict[str, str]:
    """The device (CPU instruction set or GPU model) and the installed versions of the libraries
    that compute the numbers."""
    import torch

    # The kernels torch picks depend on the CPU's vector instructions and on the GPU model.
    if device_type == "cuda":
        # Without CUDA the trial itself refuses the device, with one line; no traceback from here.
        device = f"cuda {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "cuda (none found)"
    else:
        device = f"{device_type} {torch.backends.cpu.get_cpu_capability()}"
    env = {"device": device, "torch": torch.__version__}  # with its build tag (+cpu, +cu130)
    for name in LIBRARIES[1:]:
        try:
            env[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            env[name] = "not installed"
    return env


def environment_differences(recorded: dict[str, str], current: dict[str, str]) -> list[str]:
    """``name recorded (here current)`` for every recorded entry the current environment differs in."""
    return [f"{k} {v} (here {current.get(k, 'unknown')})" for k, v in recorded.items() if v != current.get(k)]


def warn_if_environment_differs(name: str, recorded: dict[str, str], current: dict[str, str]) -> bool:
    """One warning line when the trial was recorded elsewhere; True if it warned."""
    differences = environment_differences(recorded, current)
    if differences:
        log.warning(
            "trial %r was recorded with %s: its numbers may differ from the recorded ones (docs/reproducibility.md)",
            name,
            ", ".join(differences),
        )
    return bool(differences)


#: The environment switch torch.compile's code generator (inductor) reads its determinism from
#: when it is first imported.
INDUCTOR_DETERMINISTIC = "TORCHINDUCTOR_DETERMINISTIC"


@contextmanager
def deterministic_algorithms(mode: bool) -> Iterator[None]:
    """``torch.use_deterministic_algorithms(mode, warn_only=True)`` for the block, without loading
    torch's compiler into a process that has not loaded it; everything is restored afterwards.

    The public function also sets the flag of inductor (the code generator behind
    torch.compile), and to do so imports it, and with it torch._dynamo: 1.5 s here. A trial
    loads them anyway (torch.optim does), but a verification worker or ``robust-study evaluate``
    does not otherwise: a small verification took 3.7-3.8 s, 2.25 s without the import. So
    while inductor is not loaded only torch's own flag is set, and inductor's environment
    switch is set to match, which an inductor loaded later in the block (by a trial's
    optimizer) reads; once it is loaded the public function sets both. Either way compiled code
    follows ``mode``.
    """
    import torch

    def set_flags(on: bool, warn_only: bool) -> None:
        if "torch._inductor.config" in sys.modules:
            torch.use_deterministic_algorithms(on, warn_only=warn_only)
        else:
            torch._C._set_deterministic_algorithms(on, warn_only=warn_only)

    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    env = os.environ.get(INDUCTOR_DETERMINISTIC)
    os.environ[INDUCTOR_DETERMINISTIC] = "1" if mode else "0"
    # warn_only: a kernel without a deterministic version (some CUDA backward passes) warns
    # instead of failing a trial hours into a study.
    set_flags(mode, warn_only=True)
    try:
        yield
    finally:
        set_flags(*before)
        if env is None:
            os.environ.pop(INDUCTOR_DETERMINISTIC, None)
        else:
            os.environ[INDUCTOR_DETERMINISTIC] = env


@contextmanager
def applied(
    settings: ReproducibilityConfig, *, device_type: str, seed: int, name: str = "trial"
) -> Iterator[dict[str, Any]]:
    """Apply ``settings`` (threads, determinism, seeds) for the block; restore torch's afterwards.

    Yields the settings in force, with the environment filled in: what a re-run needs to record.
    """
    import numpy as np
    import torch

    environment = current_environment(device_type)
    if settings.environment:
        warn_if_environment_differs(name, settings.environment, environment)
    before = (torch.get_num_threads(), torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    threads = settings.threads or before[0]
    torch.set_num_threads(threads)
    torch.backends.cudnn.deterministic = settings.deterministic
    torch.backends.cudnn.benchmark = not settings.deterministic and before[2]
    if settings.deterministic and device_type == "cuda":
        # cuBLAS is deterministic only with a fixed workspace (torch's reproducibility notes); it
        # reads this when the process first uses it, so it helps a fresh process or Ray worker.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    # The trial seeds torch itself; Python's and numpy's generators too, for code that draws from them.
    random.seed(seed)
    np.random.seed(seed)
    try:
        with deterministic_algorithms(settings.deterministic):
            yield {
                "threads": threads,
                "deterministic": settings.deterministic,
                "environment": environment,
            }
    finally:
        torch.set_num_threads(before[0])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[1], before[2]


def reproducible(run: Callable[..., R]) -> Callable[..., R]:
    """Run ``run(config, ...)`` under the config's reproducibility settings and attach to its
    result (``result.reproducibility``) the settings in force, for :func:`pinned`."""

    @functools.wraps(run)
    def wrapper(config: TrialConfig, *args: Any, **kwargs: Any) -> R:
        device_type = _device_type(config.device)
        with applied(config.reproducibility, device_type=device_type, seed=config.seed, name=config.name) as used:
            result = run(config, *args, **kwargs)
        result.reproducibility = used  # type: ignore[attr-defined]
        return result

    return wrapper


def _device_type(device: str) -> str:
    """``auto`` as study.trial.resolve_device reads it (which also refuses a missing CUDA)."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device).type


def pinned(config: TrialConfig, used: dict[str, Any] | None) -> TrialConfig:
    """``config`` with the settings a run actually used (the thread count torch's default gave,
    the environment), so that the saved config re-runs to the same numbers."""
    if not used:
        return config
    return config.model_copy(update={"reproducibility": ReproducibilityConfig.model_validate(used)})
