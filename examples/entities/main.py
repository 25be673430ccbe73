"""Entities and a singleton on a three-node cluster over an embedded nats-server.

A shopping ``Cart`` is an entity: one instance per cart id, living on the node
that owns its shard, its state (a dataclass) kept in JetStream KV and saved
before each reply (write-through). A ``totals`` singleton runs on exactly one
node and reports, every second, how many carts and items the cluster holds.
When the node running the singleton stops, the singleton starts on another
one, and the carts of the stopped node come back elsewhere with their items.

    python examples/entities/main.py
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import nats.js.errors
import structlog

from clstr import DEFAULT_RETRY, Client, decode_payload
from clstr.entities import Entity, KvStateStore, Record, Sharding, Singleton, handles
from clstr.membership import KvMembership, KvSettings
from clstr.node import ShardContext
from clstr.testing import NatsServer
from clstr.transports.nats import NatsTransport

NUM_SHARDS = 16
SETTINGS = KvSettings(heartbeat_interval=0.25, heartbeat_ttl=2.0, reconcile_interval=0.25)


@dataclass
class AddItem:
    item: str


@dataclass
class Contents:
    pass


@dataclass
class CartView:
    cart: str
    items: list[str]
    node: str


@dataclass
class CartState:
    items: list[str] = field(default_factory=list)


@dataclass
class Report:
    node: str
    carts: int
    items: int


class Cart(Entity[CartState]):
    state_type = CartState  # saved in the KV bucket clstr_entity_Cart
    idle_timeout = 60.0

    @handles
    async def add(self, msg: AddItem) -> CartView:
        self.state.items.append(msg.item)
        return CartView(self.id, self.state.items, self.context.node_id)

    @handles
    async def contents(self, msg: Contents) -> CartView:
        return CartView(self.id, self.state.items, self.context.node_id)


def totals_singleton(store: KvStateStore, reports: asyncio.Queue[Report]) -> Singleton:
    """A singleton that sums every cart in the store once a second (and hands each
    report to ``reports`` too, for the example to await)."""

    async def totals(ctx: ShardContext) -> None:
        bucket = await store.bucket("Cart")
        print(f"[totals] started on {ctx.node_id} (token {ctx.token})", flush=True)
        while not ctx.stopping.is_set():
            carts = items = 0
            for key in await _keys(bucket):
                record = Record.decode((await bucket.get(key)).value)
                state = decode_payload(record.state, CartState)
                carts, items = carts + 1, items + len(state.items)
            print(f"[totals] on {ctx.node_id}: {carts} carts, {items} items", flush=True)
            reports.put_nowait(Report(ctx.node_id, carts, items))
            try:
                async with asyncio.timeout(1.0):
                    await ctx.stopping.wait()
            except TimeoutError:
                pass
        print(f"[totals] stopped on {ctx.node_id}", flush=True)

    return totals


async def _report(reports: asyncio.Queue[Report], wanted: Callable[[Report], bool]) -> None:
    """Wait (30 s at most) for the singleton's first report that is ``wanted``."""
    async with asyncio.timeout(30.0):
        while not wanted(await reports.get()):
            pass


async def _keys(bucket: Any) -> list[str]:
    try:
        return list(await bucket.keys())
    except nats.js.errors.NoKeysError:
        return []


async def start_runner(
    url: str, node_id: str, reports: asyncio.Queue[Report]
) -> tuple[Sharding, NatsTransport]:
    transport = await NatsTransport.connect(url)
    store = KvStateStore(transport)
    runner = Sharding(
        transport,
        num_shards=NUM_SHARDS,
        node_id=node_id,
        membership=lambda group: KvMembership(settings=SETTINGS),
        store=store,
    )
    runner.register_entity(Cart)
    runner.register_singleton("totals", totals_singleton(store, reports), grace=1.0)
    await runner.start()
    return runner, transport


async def main() -> None:
    structlog.configure(
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        wrapper_class=structlog.make_filtering_bound_logger(30),
    )
    async with NatsServer(jetstream=True) as server:
        reports: asyncio.Queue[Report] = asyncio.Queue()
        nodes = [await start_runner(server.url, f"node-{n}", reports) for n in (1, 2, 3)]
        runners = dict(nodes)
        by_id = {runner.node_id: (runner, transport) for runner, transport in runners.items()}
        client_transport = await NatsTransport.connect(server.url)
        # Shards move while the nodes join: the retry policy resends a request that
        # met no owner (or a node that just gave its shard away) until its deadline.
        client = Client(client_transport, num_shards=NUM_SHARDS, retry=DEFAULT_RETRY, timeout=15.0)
        for cart, item in [("ann", "tea"), ("bob", "jam"), ("ann", "bread"), ("cy", "milk")]:
            view = await client.entity(Cart, cart).call(AddItem(item), CartView)
            print(f"add {item:5} to {cart:3} -> {view.items} on {view.node}")
        await _report(reports, lambda r: r.carts == 3)

        singleton_shard = next(iter(runners)).singleton_shard("totals").shard
        host = next(r for r in runners if singleton_shard in r.nodes["default"].shards)
        print(f"stopping {host.node_id}, which runs the singleton")
        runner, transport = by_id.pop(host.node_id)
        await runner.shutdown()
        await transport.close()
        # The singleton starts on another node and reports.
        await _report(reports, lambda r: r.node != host.node_id)

        for cart in ("ann", "bob", "cy"):
            view = await client.entity(Cart, cart).call(Contents(), CartView)
            print(f"{cart:3} holds {view.items} on {view.node}")
        for runner, transport in by_id.values():
            await runner.shutdown()
            await transport.close()
        await client.close()
        await client_transport.close()


if __name__ == "__main__":
    asyncio.run(main())
