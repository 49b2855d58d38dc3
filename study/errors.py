"""The user-facing error type, at the bottom of the import graph (every layer may raise it)."""

from __future__ import annotations

__all__ = ["ConfigError"]


class ConfigError(ValueError):
    """A user-facing configuration problem; its message is one line (the CLI prints it, exit 2)."""
