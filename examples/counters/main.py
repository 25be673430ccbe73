"""Strict and lax counters on a three-node cluster over an embedded nats-server.

The nodes serve counters (``serve_counters``): one entity per counter key,
its value in JetStream KV, saved before each reply. A ``StrictCounter`` keeps
stock: every decrement is a request to the key's owner, so an order that
would take the stock below zero is seen and put back. A ``LaxCounter``
counts page views: ``inc_nowait`` is a local add, flushed every 20 ms in one
batch per owner. Then a node stops, and every count is still there.

    python examples/counters/main.py
"""

from __future__ import annotations

import asyncio
import sys

import structlog

from clstr import Client
from clstr.counters import Counter, LaxCounter, StrictCounter, serve_counters
from clstr.entities import KvStateStore, Sharding
from clstr.membership import KvMembership, KvSettings
from clstr.testing import NatsServer
from clstr.transports.nats import NatsTransport

NUM_SHARDS = 16
SETTINGS = KvSettings(heartbeat_interval=0.25, heartbeat_ttl=2.0, reconcile_interval=0.25)


async def start_node(url: str, node_id: str) -> tuple[Sharding, NatsTransport]:
    transport = await NatsTransport.connect(url)
    runner = Sharding(
        transport,
        num_shards=NUM_SHARDS,
        node_id=node_id,
        membership=lambda group: KvMembership(settings=SETTINGS),
        store=KvStateStore(transport),
    )
    serve_counters(runner)  # every namespace's counters
    await runner.start()
    return runner, transport


async def order(stock: StrictCounter, sku: str, quantity: int) -> bool:
    """Take ``quantity`` from the stock of ``sku``, or nothing when short."""
    left = await stock.inc(sku, -quantity)
    if left < 0:
        await stock.inc(sku, quantity)  # put it back: the order fails
        return False
    return True


async def report(counter: Counter, keys: list[str]) -> str:
    """Generic code: takes either counter."""
    values = [f"{key}={await counter.get(key)}" for key in keys]
    return f"{counter.namespace}: " + " ".join(values)


async def main() -> None:
    structlog.configure(
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        wrapper_class=structlog.make_filtering_bound_logger(30),
    )
    async with NatsServer(jetstream=True) as server:
        nodes = [await start_node(server.url, f"node-{n}") for n in (1, 2, 3)]
        client_transport = await NatsTransport.connect(server.url)
        client = Client(client_transport, num_shards=NUM_SHARDS)

        stock = StrictCounter(client, "stock")
        await stock.set("tea", 5)
        for quantity in (2, 2, 2, 1):
            ok = await order(stock, "tea", quantity)
            print(f"order {quantity} tea: {'ok' if ok else 'refused (short)'}")
        print(await report(stock, ["tea"]))

        views = LaxCounter(client, "views")  # flushed every 20 ms
        pages = ["/", "/docs", "/pricing"]
        for n in range(3000):
            views.inc_nowait(pages[n % 3])  # no network, no await
        print(f"3000 views added; unflushed now: {sum(views.unflushed().values())}")
        await views.flush()
        print(f"flushed in {views.stats.messages} batch messages")
        print(await report(views, pages))

        runner, transport = nodes.pop(0)
        print(f"stopping {runner.node_id}")
        await runner.shutdown()
        await transport.close()
        for n in range(30):
            views.inc_nowait(pages[n % 3])
        print(await report(views, pages))  # get flushes the key's views first
        print(await report(stock, ["tea"]))
        await views.close()  # flushes what is left and stops the flusher

        await stock.close()
        await client.close()
        await client_transport.close()
        for runner, transport in nodes:
            await runner.shutdown()
            await transport.close()


if __name__ == "__main__":
    asyncio.run(main())
