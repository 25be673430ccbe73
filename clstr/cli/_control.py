"""``clstr cordon|uncordon|drain NODE_ID``: operations on one node with dynamic
membership, sent to that node's control subject."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Mapping

from ._common import EXIT_OK, CliError
from ._connection import connect
from ._parser import Subcommands, add_command, seconds

__all__ = ["add_parser", "run"]

_OPERATIONS = (
    ("cordon", "place no new shards on a node (kv membership); it hands back its shards"),
    ("uncordon", "let a cordoned node take shards again"),
    ("drain", "move every shard away from a node, then return (before stopping it)"),
)


def add_parser(sub: Subcommands, env: Mapping[str, str]) -> None:
    """Add ``cordon``, ``uncordon`` and ``drain``."""
    for op, text in _OPERATIONS:
        cmd = add_command(sub, env, op, text, run=run)
        cmd.add_argument("node_id", metavar="NODE_ID")
        cmd.add_argument("--timeout", type=seconds, default=60.0, help="seconds (default 60)")
        cmd.set_defaults(op=op)


def run(args: argparse.Namespace) -> int:
    """Ask node ``args.node_id`` to do ``args.op``; print when it is done."""
    return asyncio.run(_control(args))


async def _control(args: argparse.Namespace) -> int:
    import json

    from ..errors import NoShardOwnerError, RequestTimeoutError
    from ..membership import control_subject

    async with connect(args) as transport:
        subject = control_subject(args.prefix, args.node_id)
        try:
            reply = await transport.request(
                subject, json.dumps({"op": args.op}).encode(), args.timeout
            )
        except NoShardOwnerError:
            raise CliError(
                f"no node {args.node_id!r} with dynamic membership answers on {subject}; "
                "check the id (clstr status) and that it runs with --membership kv"
            ) from None
        except RequestTimeoutError:
            raise CliError(
                f"node {args.node_id!r} did not finish {args.op} within "
                f"{args.timeout}s; retry with a longer --timeout"
            ) from None
    answer = json.loads(reply)
    if not answer.get("ok"):
        raise CliError(f"{args.node_id}: {answer.get('error', 'refused')}")
    print(f"{args.node_id}: {args.op} done")
    return EXIT_OK
