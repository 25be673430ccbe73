"""A credit ledger served by two regions that share one store, and a client that
uses the closest region and fails over without double-charging.

Three nats-servers: the store (JetStream: the journals and account snapshots)
and two regions, ``east`` and ``west``, each a clstr cluster of its own with
one ledger node. The client reaches east directly and west through a proxy that
adds 20 ms each way, so it picks east. It credits an account, reserves part of
it and settles the reservation (a second settle is refused), refuses an
overdraft. Then east's nats-server is killed: the client sees east go down and
sends the next charge to west, the same nonce again returns the same event,
and the account's events show each charge once, whichever region appended it.

    python examples/ledger/main.py
"""

from __future__ import annotations

import asyncio
import sys

import structlog

from clstr.client import EdgeClient, EdgeSettings, Endpoint
from clstr.ledger import (
    EventOptions,
    InsufficientFundsError,
    LedgerClient,
    LedgerEvent,
    LedgerService,
    LedgerSettings,
    ReservationClosedError,
)
from clstr.testing import NatsServer, TcpProxy
from clstr.transports.nats import NatsTransport

NUM_SHARDS = 16


async def region_node(
    url: str, store_url: str, node_id: str
) -> tuple[LedgerService, list[NatsTransport]]:
    """One ledger node: its region's NATS for requests, the store for its data."""
    transport = await NatsTransport.connect(url)
    store = await NatsTransport.connect(store_url)
    service = LedgerService(
        transport,
        store=store,
        num_shards=NUM_SHARDS,
        node_id=node_id,
        nodes=[node_id],  # one node per region here; KvMembership for more
        settings=LedgerSettings(sweep_interval=0.2),
    )
    await service.start()
    return service, [transport, store]


def show(e: LedgerEvent) -> str:
    return (
        f"#{e.sequence} {e.kind} {e.amount:+d} -> balance {e.balance}, "
        f"available {e.available} (event {e.id}, nonce {e.nonce})"
    )


async def main() -> None:
    structlog.configure(
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        wrapper_class=structlog.make_filtering_bound_logger(40),
    )
    async with (
        NatsServer(jetstream=True) as store,
        NatsServer(jetstream=True) as east,
        NatsServer(jetstream=True) as west,
        TcpProxy(west.host, west.port, delay=0.020) as far,
    ):
        east_node, east_conns = await region_node(east.url, store.url, "east-1")
        west_node, west_conns = await region_node(west.url, store.url, "west-1")
        edge = EdgeClient(
            [Endpoint((east.url,), "east"), Endpoint((far.url,), "west")],
            num_shards=NUM_SHARDS,
            settings=EdgeSettings(probe_interval=0.5, attempt_timeout=1.0),
        )
        async with edge:
            ledger = LedgerClient(edge)
            for status in ledger.edges():
                print(f"edge {status.name}: healthy, {status.latency_ms:.1f} ms")
            print(f"active edge: {ledger.health().active}")

            print(
                show(await ledger.create_event("credits", "ann", 100, EventOptions(note="top-up")))
            )
            hold = await ledger.reserve("credits", "ann", 40, ttl=30)
            print(f"reserved {hold.amount} as {hold.id}")
            print(show(await ledger.settle("credits", "ann", hold.id, amount=25)))
            try:
                await ledger.settle("credits", "ann", hold.id)
            except ReservationClosedError as exc:
                print(f"second settle refused: {type(exc).__name__}")
            try:
                await ledger.create_event("credits", "ann", -500, EventOptions(min_balance=0))
            except InsufficientFundsError as exc:
                print(f"overdraft refused: {type(exc).__name__}")

            print("killing east's nats-server")
            await asyncio.to_thread(east.kill)
            charge = EventOptions(nonce="order-7")
            event = await ledger.create_event("credits", "ann", -10, charge)
            print(f"charge order-7 via {ledger.health().active}: {show(event)}")
            again = await ledger.create_event("credits", "ann", -10, charge)
            print(f"charge order-7 again: same event: {again == event}")

            history = await ledger.events("credits", "ann")
            print(f"events of credits/ann: {len(history)}")
            for e in history:
                print(f"  {show(e)}")
            view = await ledger.get_account("credits", "ann")
            print(
                f"ann: balance {view.balance} = sum of her events {sum(e.amount for e in history)}"
            )
            balances = await ledger.get_balances("credits")
            print(
                f"balances: {[(r.account, r.balance) for r in balances.accounts]}, "
                f"partial {balances.partial}"
            )
        await asyncio.to_thread(east.start)  # let east's node leave cleanly
        for service, conns in ((west_node, west_conns), (east_node, east_conns)):
            await service.shutdown()
            for conn in conns:
                await conn.close()


if __name__ == "__main__":
    asyncio.run(main())
