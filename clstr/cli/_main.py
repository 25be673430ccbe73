"""The ``clstr`` command's entry point: the registry of command groups, the
parser built from them, and :func:`main`, which runs the chosen command and
turns its failures into one line and an exit code."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
from collections.abc import Mapping, Sequence
from typing import Final, Protocol

from . import (
    _bench,
    _conformance,
    _control,
    _counter,
    _dashboard,
    _dev,
    _ledger,
    _node,
    _request,
    _shard,
    _status,
)
from ._common import CliError, configure_logging
from ._parser import Runner, Subcommands, top_parser

__all__ = ["COMMANDS", "build_parser", "main"]


class CommandGroup(Protocol):
    """A module that adds one or more ``clstr`` commands."""

    def add_parser(self, sub: Subcommands, env: Mapping[str, str]) -> None:
        """Add the group's commands to ``sub``, each calling the group's ``run``."""

    def run(self, args: argparse.Namespace) -> int:
        """Run the command ``args`` name; return the exit code."""


#: The command groups, in the order ``clstr --help`` lists their commands.
COMMANDS: Final[Sequence[CommandGroup]] = (
    _dev,  # dev up, demo
    _request,  # request, notify
    _status,  # status
    _dashboard,  # dashboard
    _shard,  # shard
    _node,  # node
    _control,  # cordon, uncordon, drain
    _conformance,  # conformance
    _bench,  # bench
    _counter,  # counter inc|get|set|del|clear|serve
    _ledger,  # ledger serve|up|event|balance|account|events|reserve|settle|release|edges
)


def build_parser(environ: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    """The ``clstr`` argument parser, its defaults read from ``environ`` (default
    ``os.environ``; see :data:`~clstr.cli.ENV_VARS`).

    Raises :class:`CliError` when an environment variable holds a value no
    option accepts in a way argparse cannot report (a yes/no flag).
    """
    env = os.environ if environ is None else environ
    parser, sub = top_parser(env)
    for group in COMMANDS:
        group.add_parser(sub, env)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``clstr`` command; returns the exit code."""
    try:
        args = build_parser().parse_args(argv)
        configure_logging(args.log_level or args.default_log_level, json_lines=args.log_json)
        handler: Runner = args.handler
        code = handler(args)
        try:
            sys.stdout.flush()  # here, where a closed pipe is still handled below
        except BrokenPipeError:
            raise
        except OSError:  # the terminal is gone (SIGHUP): nobody left to tell
            _drop_stdout()
        return code
    except CliError as exc:
        print(f"clstr: error: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        print("clstr: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader of our output went away (`clstr status | head -1`): end
        # quietly, with the status a shell shows for a command SIGPIPE killed.
        _drop_stdout()
        return 128 + signal.SIGPIPE


def _drop_stdout() -> None:
    """Point stdout at /dev/null: what is still buffered would fail again at exit
    (and turn the exit code into 120)."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


if __name__ == "__main__":
    raise SystemExit(main())
