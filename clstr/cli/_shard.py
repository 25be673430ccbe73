"""``clstr shard KEY``: the shard of a key, computed here (no cluster needed)."""

from __future__ import annotations

import argparse
from collections.abc import Mapping

from ..hashing import shard_for_key
from ._common import EXIT_OK, check_key
from ._parser import Subcommands, add_command

__all__ = ["add_parser", "run"]


def add_parser(sub: Subcommands, env: Mapping[str, str]) -> None:
    """Add ``shard``."""
    shard = add_command(sub, env, "shard", "print the shard of KEY (offline)", run=run)
    shard.add_argument("key", metavar="KEY", help="the routing key (non-empty)")


def run(args: argparse.Namespace) -> int:
    """Print the shard of ``args.key``."""
    check_key(args.key)
    print(shard_for_key(args.key, args.shards, args.seed))
    return EXIT_OK
