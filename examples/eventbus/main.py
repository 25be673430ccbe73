"""An event bus on JetStream: ingest, poll with a cursor, consume on clstr nodes, rescale.

The example starts a nats-server (``clstr.testing.NatsServer``) and:

1. builds an :class:`~clstr.eventbus.EventBus` of 4 shards on a
   :class:`~clstr.eventbus.JetStreamAdapter`, with a producer nonce file, and
   ingests 5,000 order events without awaiting anything (``ingest`` is a plain
   call: it hashes the customer to a shard ring and returns);
2. starts two consumer nodes (clstr ``Node`` with ``KvMembership``): a
   :class:`~clstr.eventbus.BusConsumer` on each consumes the bus shards that map
   to the cluster shards it owns, checkpointing in JetStream KV;
3. polls the stream from a separate client (:class:`~clstr.eventbus.BusReader`),
   page by page, keeping only paid orders, resuming from each page's cursor;
4. adds two shards while ingesting 2,000 more events, and asks ``suggest_scaling``;
5. stops one node gracefully: its shards move to the other with their
   checkpoints, and 1,000 more events are consumed there;
6. shuts the bus down and prints the stats invariant:
   ``events_dispatched + events_dropped == events_ingested``.

Run it:  python examples/eventbus/main.py
"""

import asyncio
import logging
import sys
import tempfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import structlog

from clstr import Envelope, Node, assign_shards
from clstr.eventbus import (
    BusConfig,
    BusConsumer,
    BusReader,
    ConsumerSettings,
    Event,
    EventBus,
    JetStreamAdapter,
    PollRequest,
    StoredEvent,
    cluster_shard_of,
)
from clstr.membership import KvMembership, KvSettings
from clstr.testing import NatsServer
from clstr.transports.nats import NatsOptions, NatsTransport

NUM_SHARDS = 16  # cluster shards of the consumer nodes
FAST = KvSettings(heartbeat_interval=0.25, heartbeat_ttl=1.0, reconcile_interval=0.25)
TYPES = ("order.placed", "order.paid", "order.shipped")


async def no_requests(env: Envelope) -> bytes:
    return b""  # these nodes only consume; they serve no requests


class Tally:
    """The consumer's handler: counts what each node handled, and sees duplicates."""

    def __init__(self) -> None:
        self.by_node: Counter[str] = Counter()
        self.shards: dict[str, set[int]] = {}
        self.seen: Counter[int] = Counter()

    def handler(self, node_id: str):
        async def handle(events: Sequence[StoredEvent]) -> None:
            self.by_node[node_id] += len(events)
            self.shards.setdefault(node_id, set()).update(e.shard for e in events)
            self.seen.update(int(e.payload.split(b":")[0]) for e in events)

        return handle

    async def wait_for(self, total: int) -> None:
        async with asyncio.timeout(20):
            while len(self.seen) < total:  # noqa: ASYNC110 - a count, not an event
                await asyncio.sleep(0.05)


def order(i: int) -> Event:
    return Event(f"customer-{i % 97}", f"{i}:{TYPES[i % 3]}".encode(), TYPES[i % 3])


async def settled(nodes: list[Node]) -> None:
    """Wait until each node serves the cluster shards HRW gives it (handoffs done)."""
    owners = assign_shards([n.node_id for n in nodes], NUM_SHARDS)

    def serving() -> bool:
        return all(set(n.shards) == {s for s, o in owners.items() if o == n.node_id} for n in nodes)

    async with asyncio.timeout(20):
        while not serving():  # noqa: ASYNC110 - node state, no event to await
            await asyncio.sleep(0.05)


async def start_node(url: str, node_id: str, tally: Tally) -> tuple[Node, NatsTransport]:
    transport = await NatsTransport.connect(url, NatsOptions(name=node_id))
    node = Node(
        transport,
        no_requests,
        node_id=node_id,
        num_shards=NUM_SHARDS,
        membership=KvMembership(settings=FAST),
    )
    settings = ConsumerSettings(checkpoint_interval=0.2, refresh_interval=0.2)
    BusConsumer(node, "orders", tally.handler(node_id), settings=settings).bind()
    await node.start()
    return node, transport


async def main() -> int:
    async with NatsServer() as server:
        print(f"nats-server {server.url}")
        producer = await NatsTransport.connect(server.url, NatsOptions(name="producer"))
        nonce = Path(tempfile.mkdtemp()) / "orders.nonce"
        bus = EventBus(
            BusConfig(
                name="orders",
                shards=4,
                adapter=JetStreamAdapter(producer),
                producer_nonce_path=nonce,
            )
        )
        await bus.start()
        tally = Tally()
        nodes = []
        try:
            # 1. ingest: a plain call per event; the shard workers batch into JetStream.
            ingested = 0
            for i in range(5000):
                await bus.ingest_wait(order(i)) if i % 1024 == 1023 else bus.ingest(order(i))
                ingested += 1
            await bus.flush()
            stats = bus.stats()
            print(
                f"ingested {stats.events_ingested} events on {len(stats.shards)} shards, "
                f"{stats.batches_dispatched} batches into JetStream"
            )

            # 2. consumer nodes share the bus shards by clstr membership.
            for node_id in ("node-a", "node-b"):
                nodes.append(await start_node(server.url, node_id, tally))
            await settled([node for node, _ in nodes])
            await tally.wait_for(ingested)
            for node, _ in nodes:
                mine = [
                    b
                    for b in sorted(bus.rings)
                    if cluster_shard_of("orders", b, NUM_SHARDS) in node.shards
                ]
                print(f"  {node.node_id} owns bus shards {mine} (via cluster shards it serves)")

            # 3. poll from any client: merged pages, resumed from each cursor.
            async with await NatsTransport.connect(server.url) as client:
                reader = BusReader.jetstream(client, "orders")
                request = PollRequest(limit=500, filter="type=order.paid")
                paid, pages = 0, 0
                while True:
                    page = await reader.poll(request)
                    paid += len(page.events)
                    pages += 1
                    request = request.from_cursor(page.cursor)
                    if not page.has_more:
                        break
            print(f"polled {paid} paid orders in {pages} pages (cursor: {page.cursor[:24]}...)")

            # 4. rescale while ingesting; the rule's advice.
            added = await bus.add_shards(2)
            for i in range(ingested, ingested + 2000):
                await bus.ingest_wait(order(i))
            ingested += 2000
            await bus.flush()
            print(f"added shards {added}; now {sorted(bus.rings)}")
            advice = bus.suggest_scaling()
            print(f"suggest_scaling: {advice.action.value} ({advice.reason})")
            await tally.wait_for(ingested)

            # 5. a graceful stop moves node-a's shards, with their checkpoints, to node-b.
            node_a, transport_a = nodes.pop(0)
            await node_a.stop()
            await transport_a.close()
            print("node-a stopped: its bus shards move to node-b")
            for i in range(ingested, ingested + 1000):
                await bus.ingest_wait(order(i))
            ingested += 1000
            await bus.flush()
            await tally.wait_for(ingested)
            twice = sum(1 for n in tally.seen.values() if n > 1)
            print(f"consumed {len(tally.seen)} events ({dict(tally.by_node)}), {twice} twice")
        finally:
            for node, transport in nodes:
                await node.stop()
                await transport.close()
            final = await bus.shutdown()
            await producer.close()

        # 6. the invariant after shutdown.
        print(
            f"invariant: dispatched + dropped == ingested: {final.events_dispatched} + "
            f"{final.events_dropped} == {final.events_ingested}; "
            f"shutdown_was_lossy={final.shutdown_was_lossy}"
        )
        ok = final.events_dispatched + final.events_dropped == final.events_ingested
        return 0 if ok and final.events_ingested == ingested else 1


if __name__ == "__main__":
    structlog.configure(
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
    )
    sys.exit(asyncio.run(main()))
