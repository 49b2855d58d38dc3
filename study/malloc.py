"""The driver's allocator: at most two glibc malloc arenas.

glibc gives threads that allocate at once arenas of their own (up to eight per core) and keeps
memory freed in them for reuse. The study's driver runs many threads (Ray's, gRPC's, the
tracking thread), and over a long study that memory is most of its growth: ``bench scale`` with
2,000 trials grew 208 MB per 1,000 trials with glibc's default and 84 MB with two arenas (live
Python objects: 61 MB; docs/benchmarks.md, *Scale*). Two arenas are what ``MALLOC_ARENA_MAX=2``
gives; set here, at the program's start before any thread exists, a user need not remember it.
A value the user set in the environment is left alone, and elsewhere than glibc nothing changes.
"""

from __future__ import annotations

import os
import sys

#: mallopt's parameter number for the arena limit (M_ARENA_MAX in glibc's malloc.h).
_M_ARENA_MAX = -8


def limit_arenas(count: int = 2) -> bool:
    """Ask glibc for at most ``count`` arenas; True when it accepted."""
    if not sys.platform.startswith("linux") or "MALLOC_ARENA_MAX" in os.environ:
        return False
    import ctypes

    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    return bool(mallopt(_M_ARENA_MAX, count))
