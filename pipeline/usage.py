"""One way for every command to report a user mistake: one line on stderr, exit code 2.

A mistake in how a command was called (a missing path, a bad ``--set``, an unknown
subcommand) must never end in a traceback, and must say what is wrong and how to fix it in
a line a shell user reads at a glance. Two pieces make that true everywhere:

* :class:`UsageError`, raised by a command's own checks (before Ray starts or a model
  loads) and caught once, in the command's ``main``;
* :class:`OneLineParser`, an :class:`argparse.ArgumentParser` whose ``error`` prints one
  line (the mistake and a pointer to ``--help``) instead of argparse's usage block.

Example:
    >>> p = OneLineParser(prog="demo")
    >>> _ = p.add_argument("path")
    >>> try:
    ...     p.parse_args([])
    ... except SystemExit as exc:
    ...     exc.code
    2
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import NoReturn

#: Exit code of every usage or config error.
EXIT_USAGE = 2


class UsageError(ValueError):
    """A mistake in the command line or its inputs, phrased for the user as one line."""


def one_line(message: object) -> str:
    """``message`` on one line: any line breaks a library put in become ``"; "``."""
    parts = [p.strip() for p in str(message).splitlines() if p.strip()]
    return "; ".join(parts) or type(message).__name__


def report(prog: str, message: object) -> int:
    """Print ``prog: error: message`` as one line on stderr; returns :data:`EXIT_USAGE`."""
    print(f"{prog}: error: {one_line(message)}", file=sys.stderr)
    return EXIT_USAGE


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line naming the mistake and ``--help``.

    Subparsers made with ``add_subparsers`` are of the same class, so every subcommand
    reports its mistakes the same way.
    """

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")


def existing_path(value: str, what: str, fix: str) -> Path:
    """``value`` as a path that exists, else a :class:`UsageError` naming ``what`` and ``fix``."""
    path = Path(value).expanduser()
    if not path.exists():
        raise UsageError(f"{what} not found: {value} ({fix})")
    return path


def existing_dir(value: str, what: str, fix: str) -> Path:
    """``value`` as an existing directory, else a :class:`UsageError` naming ``what`` and ``fix``."""
    path = existing_path(value, what, fix)
    if not path.is_dir():
        raise UsageError(f"{what} is not a directory: {value} ({fix})")
    return path


def existing_file(value: str, what: str, fix: str) -> Path:
    """``value`` as an existing regular file, else a :class:`UsageError` naming ``what`` and ``fix``."""
    path = existing_path(value, what, fix)
    if not path.is_file():
        raise UsageError(f"{what} is not a file: {value} ({fix})")
    return path
