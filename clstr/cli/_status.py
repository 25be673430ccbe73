"""``clstr status``: the cluster as its nodes describe it: nodes, shard counts,
the shard map."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Mapping

from ._common import EXIT_FAILED, EXIT_OK
from ._connection import connect
from ._parser import Subcommands, add_command, seconds

__all__ = ["add_parser", "run"]


def add_parser(sub: Subcommands, env: Mapping[str, str]) -> None:
    """Add ``status``."""
    status = add_command(sub, env, "status", "the cluster: nodes, shard counts, shard map", run=run)
    status.add_argument("--json", action="store_true", help="print JSON for scripts")
    status.add_argument(
        "--wait",
        type=seconds,
        default=None,
        metavar="SECONDS",
        help="wait up to SECONDS until every shard has an owner",
    )
    status.add_argument(
        "--timeout",
        type=seconds,
        default=2.0,
        help="seconds to wait for each node's answer (default 2)",
    )


def run(args: argparse.Namespace) -> int:
    """Print the cluster view; exit 1 when a shard has no owner."""
    return asyncio.run(_status(args))


async def _status(args: argparse.Namespace) -> int:
    import json

    from ..observe import gather_view, render_table

    loop = asyncio.get_running_loop()
    async with connect(args) as transport:
        deadline = loop.time() + args.wait if args.wait is not None else None
        while True:
            view = await gather_view(
                transport,
                num_shards=args.shards,
                prefix=args.prefix,
                seed=args.seed,
                service_name=args.service_name,
                probe_timeout=args.timeout,
                shards_given=args.shards_explicit,
            )
            if view.complete or deadline is None or loop.time() >= deadline:
                break
            # No event announces a node's arrival to a bystander: poll until the deadline.
            await asyncio.sleep(0.25)
    if args.json:
        print(json.dumps(view.to_json(), indent=2))
    else:
        print(render_table(view))
    return EXIT_OK if view.complete else EXIT_FAILED
