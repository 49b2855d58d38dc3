"""argparse pieces of the ``robust-study`` command line.

Usage errors are one line naming the command and where its help is; ``--version`` and choices
that live in heavier modules are looked up only when used, so ``--help`` stays quick.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

EXIT_BAD_INPUT = 2
PROGRAM = "robust-study"


def program_version() -> str:
    """The installed package's version; the source tree's pyproject.toml when not installed."""
    from importlib import metadata

    try:
        return metadata.version(PROGRAM)
    except metadata.PackageNotFoundError:
        pass
    import tomllib

    try:
        with (Path(__file__).resolve().parents[1] / "pyproject.toml").open("rb") as f:
            return str(tomllib.load(f)["project"]["version"])
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        return "(version unknown)"


class Parser(argparse.ArgumentParser):
    """Usage errors as one line on stderr naming the command and its help, exit status 2.

    Its sub-command parsers are of the same class (argparse's default), so theirs are too.
    """

    #: The sub-command parsers by name (set by whoever adds them).
    commands: Mapping[str, argparse.ArgumentParser]

    def error(self, message: str) -> NoReturn:
        message = " ".join(message.split())
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: {message} (see {self.prog} --help)\n")


class VersionAction(argparse.Action):
    """``--version``: the program's name and version, looked up only when asked for."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS, help: str | None = None) -> None:
        super().__init__(option_strings, dest=dest, default=argparse.SUPPRESS, nargs=0, help=help)

    def __call__(self, parser: argparse.ArgumentParser, *args: Any) -> NoReturn:
        print(f"{parser.prog} {program_version()}")
        parser.exit()


class LazyChoices(Sequence[str]):
    """argparse choices read from ``load()`` on first use (a table in a module that is slow to
    import and that neither ``--help`` nor most commands need)."""

    def __init__(self, load: Callable[[], Sequence[str]]) -> None:
        self._load = load

    def __getitem__(self, index: Any) -> Any:
        return self._load()[index]

    def __len__(self) -> int:
        return len(self._load())

    def __iter__(self) -> Iterator[str]:
        return iter(self._load())

    def __contains__(self, name: object) -> bool:
        return name in self._load()


def count(text: str) -> int:
    """A whole number of at least 1 (an argparse ``type``)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return value


def port(text: str) -> int:
    """A TCP port number (an argparse ``type``)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number from 1 to 65535, got {text!r}")
    return value


def fraction(text: str) -> float:
    """A number above 0 and at most 1 (an argparse ``type``)."""
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0.0 < value <= 1.0:  # NaN fails too
        raise argparse.ArgumentTypeError(f"expected a number above 0 and at most 1, got {text!r}")
    return value
