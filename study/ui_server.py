"""Run a server (the MLflow UI) for as long as ``robust-study`` runs, and no longer.

The server gets a session of its own, so a terminal's Ctrl-C or hang-up reaches ``robust-study``
only; ``robust-study`` then stops the server's whole session (its workers too) and waits for it.
The same stop runs on SIGTERM (a service manager, ``kill``), on SIGHUP and on any other exit.
A process that ``robust-study`` is SIGKILLed out of cannot stop anything: the server then lives on
in its own session.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Self

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
SIGNAL_NAMES: dict[int, str] = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM", signal.SIGHUP: "SIGHUP"}
_HAVE_PROC = Path("/proc/self/stat").exists()


class _Stop(BaseException):
    """Raised by the signal handler to leave the wait for the server (like KeyboardInterrupt)."""


class _Signals:
    """The stop signals, caught while the server runs.

    The handler only interrupts the wait for the server (``armed``); a signal that arrives while
    the server starts or while it is being stopped is remembered, never raised, so that neither
    a half-started server nor a half-finished stop is left behind. Repeated signals are ignored.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self.armed = False
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: object) -> None:
        if self.received is None:
            self.received = signum
        if self.armed:
            self.armed = False
            raise _Stop

    def __enter__(self) -> Self:
        # Python delivers signals to the main thread only; elsewhere the caller's handlers stay.
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]


def serve(cmd: Sequence[str], *, name: str, grace: float = 5.0, env: Mapping[str, str] | None = None) -> int:
    """Run ``cmd`` (in ``env``, default this process's environment) until it exits or a stop
    signal arrives, then stop everything it started.

    Returns:
        The server's exit status when it ended by itself (128 + N when a signal N ended it), or
        128 + the signal number when ``robust-study`` was stopped: 130 for Ctrl-C, 143 for
        SIGTERM, 129 for SIGHUP (the shell's convention).
    """
    proc: subprocess.Popen[bytes] | None = None
    code = 0
    with _Signals() as signals:
        try:
            proc = subprocess.Popen(list(cmd), start_new_session=True, env=env)
            signals.armed = True
            if signals.received is None:  # no signal arrived while the server started
                code = proc.wait()
            signals.armed = False
        except _Stop:
            pass
        finally:
            signals.armed = False
            if proc is not None:
                stop_session(proc, grace)
        if signals.received is not None:
            label = SIGNAL_NAMES.get(signals.received, f"signal {signals.received}")
            try:
                print(f"{name}: stopped by {label}", file=sys.stderr, flush=True)
            except OSError:  # after a hang-up the terminal may be gone; the server is stopped
                pass
            return 128 + signals.received
    return 128 - code if code < 0 else code


def stop_session(proc: subprocess.Popen, grace: float = 5.0) -> None:
    """SIGTERM every process of ``proc``'s session, SIGKILL what is left after ``grace`` s.

    ``proc`` must have been started with ``start_new_session=True``: its pid is then the id of
    its session and of its process group.
    """
    sid = proc.pid
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        if not _alive(proc):  # nothing left: its ids may already name someone else's processes
            return
        _signal_session(sid, sig)
        deadline = time.monotonic() + wait
        while _alive(proc) and time.monotonic() < deadline:
            time.sleep(0.05)


def _alive(proc: subprocess.Popen) -> bool:
    proc.poll()  # reaps the server itself once it exits, so it is not left as a zombie
    return bool(session_members(proc.pid)) if _HAVE_PROC else _group_exists(proc.pid)


def _signal_session(sid: int, sig: int) -> None:
    # The process group covers everything that did not move to a group of its own; a member that
    # did is still in the session, so it is signalled by pid.
    try:
        os.killpg(sid, sig)
    except (ProcessLookupError, PermissionError):
        pass
    for pid in session_members(sid) if _HAVE_PROC else ():
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def session_members(sid: int) -> list[int]:
    """Pids of the running processes of session ``sid`` (zombies are not running: skipped)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # it exited while we looked
            continue
        # Fields after the command name, which may itself contain spaces and parentheses.
        state, _ppid, _pgrp, session = stat.rsplit(")", 1)[1].split()[:4]
        if int(session) == sid and state not in ("Z", "X"):
            members.append(int(entry.name))
    return members


def _group_exists(pgid: int) -> bool:
    # Without /proc (macOS) the only probe is the group; a zombie member counts as present here.
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
