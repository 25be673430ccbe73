"""``clstr conformance``: docs/protocol.md's cases against a live cluster, as a table.

The cases live in :mod:`clstr.testing.conformance`, imported only when the
command runs (the testing kit is no dependency of the other commands).
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from ._common import EXIT_FAILED, EXIT_OK
from ._connection import connect
from ._parser import Subcommands, add_command, seconds

if TYPE_CHECKING:
    from ..testing.conformance import CaseResult

__all__ = ["add_parser", "render_results", "run"]


def add_parser(sub: Subcommands, env: Mapping[str, str]) -> None:
    """Add ``conformance``."""
    conformance = add_command(
        sub,
        env,
        "conformance",
        "send docs/protocol.md's cases to a live cluster and print what passed "
        "(the cluster options say where: --nats-url, --prefix, --shards, --seed)",
        run=run,
    )
    conformance.add_argument(
        "--timeout",
        type=seconds,
        default=5.0,
        help="seconds to wait for each reply (default 5)",
    )


def run(args: argparse.Namespace) -> int:
    """Run every case; exit 0 when none failed (skipped ones do not count), else 1."""
    return asyncio.run(_conformance(args))


async def _conformance(args: argparse.Namespace) -> int:
    from ..testing.conformance import run_cases

    async with connect(args) as transport:
        results = await run_cases(
            transport,
            prefix=args.prefix,
            num_shards=args.shards,
            seed=args.seed,
            timeout=args.timeout,
        )
    print(render_results(results))
    return EXIT_FAILED if any(r.outcome == "fail" for r in results) else EXIT_OK


def render_results(results: Sequence[CaseResult]) -> str:
    """One row per case (name, protocol.md section, outcome, detail), then the counts."""
    header = ("CASE", "SECTION", "RESULT", "DETAIL")
    rows = [(r.name, r.section, r.outcome, r.detail) for r in results]
    name_width = max(len(row[0]) for row in [header, *rows])
    section_width = max(len(row[1]) for row in [header, *rows])
    lines = [
        "  ".join(
            (name.ljust(name_width), section.ljust(section_width), outcome.ljust(6), detail)
        ).rstrip()
        for name, section, outcome, detail in [header, *rows]
    ]
    counts = {outcome: sum(r.outcome == outcome for r in results) for outcome in _OUTCOMES}
    lines += [
        "",
        f"{len(results)} cases: {counts['pass']} passed, {counts['fail']} failed, "
        f"{counts['skip']} skipped",
    ]
    if any(r.outcome == "skip" and "conformance app" in r.detail for r in results):
        lines.append(
            "the conformance app's cases run against nodes that serve its message types, "
            "e.g. clstr node --app clstr.testing.conformance:app"
        )
    return "\n".join(lines)


_OUTCOMES = ("pass", "fail", "skip")
