"""Errors a user can act on.

Every reader and every command raises :class:`AnetrainError` (or a subclass) for bad input. The CLI turns
it into a single line on stderr and exit status 2; a traceback is shown only with ``--debug``. Anything
else that escapes is a bug in anetrain and is reported as such.
"""

from __future__ import annotations

import os


class AnetrainError(Exception):
    """A problem with the user's input or environment, described in one line."""

    exit_code = 2


class InputError(AnetrainError):
    """A file that cannot be used: the message names the file and the problem."""

    def __init__(self, path: str | os.PathLike[str], problem: str) -> None:
        self.path = os.fspath(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class ConfigError(AnetrainError):
    """An invalid model or training configuration."""


def require(condition: bool, path: str | os.PathLike[str], problem: str) -> None:
    """Raise :class:`InputError` for ``path`` unless ``condition`` holds."""
    if not condition:
        raise InputError(path, problem)
