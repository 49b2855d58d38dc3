"""The program limits glibc's malloc arenas before anything else runs, unless the user chose."""

from __future__ import annotations

import subprocess
import sys

import pytest

from study.malloc import limit_arenas

glibc = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")


@glibc
def test_glibc_accepts_the_limit_in_a_fresh_process() -> None:
    code = "from study.malloc import limit_arenas; print(limit_arenas())"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": ":".join(sys.path)})
    assert proc.stdout.split() == ["True"], proc.stderr


def test_a_limit_the_user_set_is_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    import ctypes

    monkeypatch.setenv("MALLOC_ARENA_MAX", "8")
    monkeypatch.setattr(ctypes, "CDLL", lambda *a, **k: pytest.fail("mallopt called although the user set the limit"))
    assert limit_arenas() is False


def test_the_program_limits_the_arenas_before_its_command(monkeypatch: pytest.MonkeyPatch) -> None:
    import study.cli as cli

    calls: list[str] = []
    monkeypatch.setattr("study.malloc.limit_arenas", lambda: calls.append("limit") or True)
    monkeypatch.setattr(cli, "main", lambda argv=None: calls.append("command") or 0)
    monkeypatch.setattr("gc.freeze", lambda: None)
    assert cli.entry() == 0
    assert calls == ["limit", "command"]
