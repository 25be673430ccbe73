"""The ``clstr bench`` command: its options, and a run from options to report."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import importlib.util
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Final

from ._children import ChildOptions, find_py_spy
from ._registry import GROUPS, REGISTERED, SPECS
from ._report import (
    MARKDOWN_TEMPLATE,
    build_rows,
    format_table,
    markdown_section,
    run_meta,
    update_markdown,
    write_plot,
)
from ._runner import measure
from ._specs import FULL_SIZES, QUICK_SIZES, BenchError

_DESCRIPTION: Final = (
    "Benchmarks: clstr against raw nats-py and bare asyncio, in the same run (``clstr bench``)."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``clstr bench`` options to ``parser``."""
    parser.add_argument(
        "--quick", action="store_true", help="tiny counts, one run: proves it works (CI)"
    )
    parser.add_argument(
        "--runs", type=int, default=None, help="runs per measurement; report medians (3)"
    )
    parser.add_argument(
        "--only",
        default="",
        metavar="NAME,...",
        help=f"run only these measurements: {', '.join(GROUPS)}",
    )
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON")
    parser.add_argument(
        "--markdown",
        metavar="PATH",
        help="update the results table in this Markdown file (docs/benchmarks.md)",
    )
    parser.add_argument(
        "--plot", metavar="PATH", help="write a PNG bar chart of the ratios (needs matplotlib)"
    )
    parser.add_argument(
        "--uvloop", action="store_true", help="run both sides on uvloop (needs uvloop)"
    )
    parser.add_argument(
        "--profile",
        metavar="DIR",
        help="profile every worker; write DIR/<worker>.top.txt (py-spy) or DIR/<worker>.txt",
    )
    parser.add_argument(
        "--profiler",
        choices=("pyinstrument", "py-spy"),
        default="pyinstrument",
        help="pyinstrument (in-process, default) or py-spy (outside; biased to syscalls)",
    )
    parser.add_argument(
        "--nats-url", metavar="URL", help="use this nats-server instead of starting one"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="seconds any one step may take before the run is aborted (300; quick: 60)",
    )
    parser.add_argument(
        "--strict", action="store_true", help="exit with status 1 when a target is missed"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def _selected(only: str) -> list[str]:
    if not only:
        return list(GROUPS)
    wanted = [name.strip() for name in only.split(",") if name.strip()]
    unknown = [name for name in wanted if name not in GROUPS]
    if unknown:
        raise BenchError(f"unknown measurement(s) {unknown}; choose from {', '.join(GROUPS)}")
    return [g for g in GROUPS if g in wanted]


def _check_uvloop(wanted: bool) -> None:
    """Fail before any worker starts when ``--uvloop`` cannot work."""
    if not wanted:
        return
    try:
        importlib.import_module("uvloop")
    except ImportError as exc:
        raise BenchError("--uvloop needs uvloop: pip install 'clstr[bench]'") from exc


def run(args: argparse.Namespace) -> int:
    """Run ``clstr bench`` with parsed ``args``; return the exit status."""
    try:
        names = _selected(args.only)
        sizes = QUICK_SIZES if args.quick else FULL_SIZES
        runs = args.runs if args.runs is not None else (1 if args.quick else 3)
        if runs < 1:
            raise BenchError(f"--runs must be >= 1, got {runs}")
        if args.profile:
            if args.profiler == "pyinstrument" and importlib.util.find_spec("pyinstrument") is None:
                raise BenchError("--profile needs pyinstrument: pip install 'clstr[bench]'")
            if args.profiler == "py-spy" and find_py_spy() is None:
                raise BenchError("--profile needs py-spy: pip install 'clstr[bench]'")
            args.profile = os.path.abspath(args.profile)
            Path(args.profile).mkdir(parents=True, exist_ok=True)
        if not hasattr(args, "argv_echo"):
            args.argv_echo = _echo_argv(args)
        _check_uvloop(args.uvloop)
        timeout = args.timeout if args.timeout is not None else (60.0 if args.quick else 300.0)
        options = ChildOptions(
            uvloop=args.uvloop,
            timeout=timeout,
            profile_dir=Path(args.profile) if args.profile else None,
            profiler=args.profiler,
        )
        groups = [group for group in REGISTERED if group.name in names]
        collected = asyncio.run(
            measure(
                groups,
                sizes=sizes,
                runs=runs,
                options=options,
                nats_url=args.nats_url,
                progress=not args.no_progress,
            )
        )
        rows = build_rows(SPECS, collected)
        meta = run_meta(args, sizes, runs)
        print(f"clstr bench: {meta['loop']}, median of {runs} run(s)")
        print(format_table(rows))
        if args.json:
            payload = {"meta": meta, "results": [asdict(r) for r in rows]}
            Path(args.json).write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
        if args.markdown:
            path = Path(args.markdown)
            text = path.read_text(encoding="utf-8") if path.exists() else MARKDOWN_TEMPLATE
            section = "uvloop" if args.uvloop else "asyncio"
            path.write_text(update_markdown(text, section, markdown_section(rows, meta)))
        if args.plot:
            write_plot(rows, Path(args.plot), f"clstr / baseline, {meta['loop']}, {meta['date']}")
    except BenchError as exc:
        print(f"clstr bench: {exc}", file=sys.stderr)
        return 1
    if args.strict and any(r.passed is False for r in rows):
        return 1
    return 0


def _echo_argv(args: argparse.Namespace) -> list[str]:
    """The options of this run that shape the results, as a command line (for the reports)."""
    echo = []
    for flag in ("quick", "uvloop"):
        if getattr(args, flag):
            echo.append(f"--{flag}")
    for option in ("runs", "only", "markdown", "plot"):
        value = getattr(args, option)
        if value:
            echo.append(f"--{option} {value}")
    return echo


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m clstr.bench``: the same as ``clstr bench``."""
    parser = argparse.ArgumentParser(prog="clstr bench", description=_DESCRIPTION)
    add_arguments(parser)
    return run(parser.parse_args(argv))
