"""The ``clstr`` command.

``clstr demo`` starts an embedded nats-server and a 3-node cluster and sends
real requests through it, printing which node answered each key.
``clstr shard KEY`` prints a key's shard offline.

The CLI is the one place that configures logging (the library never does).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import structlog

from . import Client, Envelope, KeyHandler, Node, Router, shard_for_key
from .hashing import owner_of

__all__ = ["main"]


def configure_logging(level: str = "warning", json: bool = False) -> None:
    """Configure structlog for the command line (console, or JSON when asked)."""
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso"),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
    )


@dataclass
class Greet:
    """Demo request: greet a user."""

    name: str


@dataclass
class Greeting:
    """Demo reply: the greeting, the node that made it, and the user's visit count."""

    text: str
    node: str
    visits: int


def demo_handler(node_id: str) -> KeyHandler:
    """The demo service: one entity per user key that counts the user's visits."""

    def user(key: str) -> Router:
        visits = 0
        router = Router()

        @router.on(Greet)
        async def greet(msg: Greet) -> Greeting:
            nonlocal visits
            visits += 1
            return Greeting(f"hello {msg.name}", node_id, visits)

        @router.on("echo")
        async def echo(env: Envelope) -> bytes:
            return env.data

        return router

    return KeyHandler(user)


async def run_demo(nodes: int, shards: int, keys: int, rounds: int) -> int:
    """Start nats-server + ``nodes`` nodes, send requests, print who answered."""
    from .testing import NatsServer
    from .transports.nats import NatsOptions, NatsTransport

    ids = [f"node-{i + 1}" for i in range(nodes)]
    with NatsServer() as server:
        print(f"nats-server {server.url} (embedded, JetStream on)")
        started: list[Node] = []
        transports = []
        try:
            for node_id in ids:
                transport = await NatsTransport.connect(server.url, NatsOptions(name=node_id))
                transports.append(transport)
                node = Node(
                    transport, demo_handler(node_id), node_id=node_id, nodes=ids, num_shards=shards
                )
                await node.start()
                started.append(node)
                print(f"{node_id}: serving {len(node.shards)} of {shards} shards")
            client = await Client.connect(server.url, num_shards=shards)
            async with client:
                answered: dict[str, int] = {}
                for round_ in range(rounds):
                    for k in range(keys):
                        key = f"user-{k}"
                        reply = await client.key(key).call(Greet(name=key), Greeting)
                        expected = owner_of(client.shard_for(key), ids)
                        assert reply.node == expected, "HRW owner mismatch"
                        answered[reply.node] = answered.get(reply.node, 0) + 1
                        if round_ == rounds - 1:
                            print(
                                f"  {key:<10} shard {client.shard_for(key):>3} -> {reply.node}"
                                f"  ({reply.text}, visit {reply.visits})"
                            )
                print("requests answered per node:", dict(sorted(answered.items())))
        finally:
            for node in started:
                await node.stop()
            for transport in transports:
                await transport.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``clstr`` command."""
    parser = argparse.ArgumentParser(prog="clstr", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default="warning", help="debug, info, warning, error")
    parser.add_argument("--log-json", action="store_true", help="log JSON lines")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run a local cluster on an embedded nats-server")
    demo.add_argument("--nodes", type=int, default=3)
    demo.add_argument("--shards", type=int, default=64)
    demo.add_argument("--keys", type=int, default=12)
    demo.add_argument("--rounds", type=int, default=3)

    shard = sub.add_parser("shard", help="print the shard of a key (offline)")
    shard.add_argument("key")
    shard.add_argument("--shards", type=int, default=64)
    shard.add_argument("--seed", default="")

    args = parser.parse_args(argv)
    configure_logging(args.log_level, args.log_json)
    if args.command == "demo":
        return asyncio.run(run_demo(args.nodes, args.shards, args.keys, args.rounds))
    if args.command == "shard":
        print(shard_for_key(args.key, args.shards, args.seed))
        return 0
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
