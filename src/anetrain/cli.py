"""The ``anetrain`` command line: argument parsing and error-to-exit-code mapping, nothing else.

Each subcommand is a module in ``anetrain.commands`` exposing ``ORDER`` (its place in ``anetrain --help``)
and ``register(subparsers)``, which adds its sub-parser (with help for every option and its default) and sets
``func`` to the function that runs it; the modules are found automatically. Errors the user can
act on (:class:`~anetrain.errors.AnetrainError`) become one line on stderr and exit status 2; a traceback is
printed only with ``--debug``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys
import traceback
from collections.abc import Sequence
from types import ModuleType
from typing import NoReturn

from . import __version__, commands
from .errors import AnetrainError


def command_modules() -> list[ModuleType]:
    """Every module of ``anetrain.commands``, in ``ORDER``."""
    mods = [
        importlib.import_module(f"{commands.__name__}.{m.name}")
        for m in pkgutil.iter_modules(commands.__path__)
    ]
    return sorted(
        (m for m in mods if hasattr(m, "register")), key=lambda m: (getattr(m, "ORDER", 100), m.__name__)
    )


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows each option's default and keeps description paragraphs as written."""


class Parser(argparse.ArgumentParser):
    """Usage errors as one line (``anetrain: error: ...``) and exit status 2, like every other bad input."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"anetrain: error: {self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="anetrain",
        description="Train small Llama-family language models with explicit forward/backward kernels.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"anetrain {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in command_modules():
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or bool(os.environ.get("ANETRAIN_DEBUG"))
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help()
            return 2
        rc = args.func(args)
        return int(rc or 0)
    except AnetrainError as e:
        if debug:
            traceback.print_exc()
        print(f"anetrain: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("anetrain: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (e.g. `anetrain generate | head`): not an error.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


def run() -> None:
    sys.exit(main())
