"""``clstr bench``: the benchmarks of :mod:`clstr.bench`, which is imported (and
adds its options) only when the command is used or its help is asked for."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import inspect
from collections.abc import Mapping
from typing import Any

from ._common import CliError
from ._parser import Parser, Subcommands

__all__ = ["add_parser", "run"]


def add_parser(sub: Subcommands, env: Mapping[str, str]) -> None:
    """Add ``bench``, its options left to ``clstr.bench``."""
    bench = sub.add_parser("bench", help="benchmarks (clstr.bench)")
    bench.lazy = _load_bench
    bench.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Run the benchmarks (sync or async ``clstr.bench.run``); its result is the exit code."""
    problem = getattr(args, "bench_problem", None)
    if problem is not None:
        raise CliError(f"{problem}; update clstr, or run the benchmarks in benchmarks/")
    result = args.bench_module.run(args)
    if inspect.isawaitable(result):
        result = asyncio.run(_await(result))
    return int(result or 0)


async def _await(awaitable: Any) -> Any:
    return await awaitable


def _load_bench(parser: Parser) -> None:
    """Fill the ``bench`` parser from ``clstr.bench``, or make it report why it cannot."""
    try:
        bench = importlib.import_module("clstr.bench")
    except ImportError as exc:
        if isinstance(exc, ModuleNotFoundError) and exc.name in ("clstr.bench", None):
            problem = "clstr bench is not available in this build (no clstr.bench module)"
        else:
            problem = f"clstr bench cannot load: {exc}"
        parser.ignore_args = True
        parser.set_defaults(bench_problem=problem)
        return
    bench.add_arguments(parser)
    parser.set_defaults(bench_module=bench)
