"""The edge client over three separate clusters sharing one store: it picks the
closest healthy cluster, fails over once when that one is killed mid-request,
and the ledger holds exactly one event per nonce. Then the edge client alone,
over two clusters of plain handlers: the failover carries the first attempt's
request id, and a caller's cancellation stays one.

Topology (docs/ledger.md): four nats-servers, none routed to another. Three are
regions A, B and C, each a clstr cluster of its own (its own subjects, its own
JetStream for its node's machine id) with one ledger node; the fourth is the
store, the JetStream every ledger node keeps the journals and snapshots in. The
client reaches each region through a TcpProxy: A 40 ms away, C 8 ms, B next door.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from clstr import Envelope, Node, NoShardOwnerError, Router
from clstr.client import EdgeClient, EdgeSettings, Endpoint
from clstr.ledger import (
    EventOptions,
    InsufficientFundsError,
    Journal,
    LedgerClient,
    LedgerService,
    LedgerSettings,
    decode_event,
)
from clstr.testing import NatsServer, TcpProxy
from clstr.transports.nats import NatsTransport

from _support import eventually

NUM_SHARDS = 8
DELAYS = {"A": 0.040, "B": 0.0, "C": 0.008}
EDGES = EdgeSettings(probe_interval=0.5, probe_timeout=1.0, attempt_timeout=1.5)


@dataclass
class Regions:
    store: NatsServer
    servers: dict[str, NatsServer]
    proxies: dict[str, TcpProxy]
    services: dict[str, LedgerService]
    edge: EdgeClient
    ledger: LedgerClient
    journal: Journal


@contextlib.asynccontextmanager
async def regions() -> AsyncIterator[Regions]:
    async with contextlib.AsyncExitStack() as stack:
        store = await stack.enter_async_context(NatsServer(jetstream=True))
        servers: dict[str, NatsServer] = {}
        proxies: dict[str, TcpProxy] = {}
        services: dict[str, LedgerService] = {}
        for name, delay in DELAYS.items():
            server = await stack.enter_async_context(NatsServer(jetstream=True))
            servers[name] = server
            proxies[name] = await stack.enter_async_context(
                TcpProxy(server.host, server.port, delay=delay)
            )
        journal_transport = await NatsTransport.connect(store.url)
        stack.push_async_callback(journal_transport.close)
        for name, server in servers.items():
            transport = await NatsTransport.connect(server.url)
            store_transport = await NatsTransport.connect(store.url)
            stack.push_async_callback(store_transport.close)
            stack.push_async_callback(transport.close)
            node = f"{name.lower()}1"
            service = LedgerService(
                transport,
                store=store_transport,
                num_shards=NUM_SHARDS,
                node_id=node,
                nodes=[node],
                settings=LedgerSettings(sweep_interval=0.2),
            )
            await service.start()
            stack.push_async_callback(service.shutdown)
            services[name] = service
        edge = EdgeClient(
            [Endpoint((proxy.url,), name) for name, proxy in proxies.items()],
            num_shards=NUM_SHARDS,
            timeout=5.0,
            settings=EDGES,
        )
        await stack.enter_async_context(edge)
        journal = Journal(journal_transport, LedgerSettings())
        yield Regions(store, servers, proxies, services, edge, LedgerClient(edge), journal)


async def nonce_events(journal: Journal, account: str, nonce: str) -> list[object]:
    found = []
    position = 0
    while (hit := await journal.next_after("credits", account, position)) is not None:
        position, body = hit
        event = decode_event("credits", account, position, body)
        if event.nonce == nonce:
            found.append(event)
    return found


class TestEdges:
    async def test_the_client_picks_the_closest_healthy_cluster(self) -> None:
        """After the parallel probe on first use the client sends to B (lowest
        latency); the latencies it measured reflect the proxies' delays, and
        health() says all three are healthy."""
        async with regions() as r:
            event = await r.ledger.create_event("credits", "ann", 10)
            assert event.origin == "b1"
            status = {e.name: e for e in r.ledger.edges()}
            assert r.edge.active == "B"
            assert status["B"].active
            assert status["A"].latency_ms is not None
            assert status["C"].latency_ms is not None
            assert status["A"].latency_ms >= 2 * DELAYS["A"] * 1000
            assert status["C"].latency_ms >= 2 * DELAYS["C"] * 1000
            assert status["A"].latency_ms > status["C"].latency_ms
            health = r.ledger.health()
            assert (health.ok, health.active, health.healthy, health.total) == (True, "B", 3, 3)

    async def test_failover_on_a_kill_mid_request_makes_one_event(self) -> None:
        """B's replies are held, the request's event lands in the store, then B's
        server is killed: the client fails over once to C (the next closest, not the
        slow A) with the same nonce, gets the event B appended, and the journal holds
        that nonce once; later requests go to C."""
        async with regions() as r:
            await r.ledger.create_event("credits", "ann", 100)
            r.proxies["B"].stall(upstream=False)  # requests reach B; its replies wait
            call = asyncio.ensure_future(
                r.ledger.create_event("credits", "ann", -30, EventOptions(nonce="charge-1"))
            )
            async with asyncio.timeout(10):
                while not await nonce_events(r.journal, "ann", "charge-1"):  # noqa: ASYNC110
                    await asyncio.sleep(0.01)  # the store is polled: nothing tells this process
            assert not call.done()
            await asyncio.to_thread(r.servers["B"].kill)
            await r.proxies["B"].cut()  # the killed server's connections reset
            loop = asyncio.get_running_loop()
            cut_at = loop.time()
            event = await call
            # At once on the dropped connection, not after the attempt's 1.5 s.
            assert loop.time() - cut_at < 1.0
            assert (event.origin, event.balance) == ("b1", 70)
            assert len(await nonce_events(r.journal, "ann", "charge-1")) == 1
            assert r.edge.active == "C"
            status = {e.name: e for e in r.ledger.edges()}
            assert not status["B"].healthy
            assert status["B"].failovers == 1
            after = await r.ledger.create_event("credits", "ann", -5)
            assert (after.origin, after.balance) == ("c1", 65)
            again = await r.ledger.create_event(
                "credits", "ann", -30, EventOptions(nonce="charge-1")
            )
            assert again == event
            await asyncio.to_thread(r.servers["B"].start)  # its node can leave cleanly

    async def test_a_refusal_does_not_fail_over(self) -> None:
        """A ledger refusal is an answer, not a failure: it is raised as is, from the
        active cluster, and nothing fails over."""
        async with regions() as r:
            with pytest.raises(InsufficientFundsError):
                await r.ledger.create_event("credits", "bob", -1, EventOptions(min_balance=0))
            assert r.edge.active == "B"
            assert all(e.failovers == 0 and e.healthy for e in r.ledger.edges())

    async def test_a_recovered_cluster_wins_back_its_traffic(self) -> None:
        """When B comes back its probes succeed and, being the closest, it is active
        again (the client sticks to C only while B is down)."""
        async with regions() as r:
            await asyncio.to_thread(r.servers["B"].kill)
            await r.proxies["B"].cut()
            await eventually(lambda: r.edge.active == "C", 10)
            assert (await r.ledger.create_event("credits", "cy", 1)).origin == "c1"
            await asyncio.to_thread(r.servers["B"].start)
            await r.proxies["B"].heal()
            await eventually(lambda: r.edge.active == "B", 20)
            assert (await r.ledger.create_event("credits", "cy", 1)).origin == "b1"


class TestNoEndpoint:
    async def test_no_healthy_endpoint_is_no_owner_within_the_deadline(self) -> None:
        """With every endpoint unreachable a call fails with NoShardOwnerError, naming
        each endpoint's problem, once its deadline passes."""
        async with TcpProxy("127.0.0.1", 9) as dead:
            await dead.cut()
            settings = EdgeSettings(probe_timeout=0.2, connect_timeout=0.3)
            async with EdgeClient(
                [dead.url], num_shards=NUM_SHARDS, timeout=0.5, settings=settings
            ) as edge:
                with pytest.raises(NoShardOwnerError, match="cannot connect"):
                    await edge.key("k").request_raw("t")
                assert not edge.health().ok


class TestFailoverRequestId:
    @pytest.mark.parametrize("failure", ["reply lost", "connection dropped"])
    async def test_the_failover_carries_the_first_attempts_request_id(self, failure: str) -> None:
        """Two clusters of plain handlers that record the request id of each call: the
        first attempt reaches the near cluster, then its reply is held (the attempt
        times out) or its connection drops; the one failover reaches the far cluster
        with the very request id the near one saw, and its answer is the call's."""
        seen: list[tuple[str, str | None]] = []
        arrived = asyncio.Event()
        go_on = asyncio.Event()

        def router(cluster: str) -> Router:
            routes = Router()

            @routes.on("op")
            async def op(env: Envelope) -> bytes:
                seen.append((cluster, env.id))
                if cluster == "near":
                    arrived.set()
                    await go_on.wait()
                return cluster.encode()

            return routes

        async with contextlib.AsyncExitStack() as stack:
            proxies: dict[str, TcpProxy] = {}
            for cluster, delay in (("near", 0.0), ("far", 0.02)):
                server = await stack.enter_async_context(NatsServer(jetstream=False))
                transport = await NatsTransport.connect(server.url)
                stack.push_async_callback(transport.close)
                node = Node(
                    transport,
                    router(cluster),
                    num_shards=NUM_SHARDS,
                    node_id=f"{cluster}-1",
                    stop_timeout=0.2,
                )
                await stack.enter_async_context(node)
                proxies[cluster] = await stack.enter_async_context(
                    TcpProxy(server.host, server.port, delay=delay)
                )
            stack.callback(go_on.set)
            settings = EdgeSettings(probe_interval=0.5, probe_timeout=1.0, attempt_timeout=0.5)
            edge = EdgeClient(
                [Endpoint((proxy.url,), name) for name, proxy in proxies.items()],
                num_shards=NUM_SHARDS,
                timeout=5.0,
                settings=settings,
            )
            await stack.enter_async_context(edge)
            assert edge.active == "near"
            call = asyncio.ensure_future(edge.key("k").request_raw("op"))
            await arrived.wait()
            if failure == "reply lost":
                proxies["near"].stall(upstream=False)  # its reply waits in the proxy
                go_on.set()
            else:
                await proxies["near"].cut()
            assert await call == b"far"
            near, far = seen
            assert near[0] == "near"
            assert far == ("far", near[1])
            assert near[1]
            status = {e.name: e for e in edge.edges()}
            assert status["near"].failovers == 1
            proxies["near"].resume()


class TestCancellation:
    async def test_a_callers_cancellation_stays_a_cancellation(self) -> None:
        """Cancelling the task of a call in flight raises CancelledError in it, as for
        any awaitable: the edge client takes it for neither a dropped connection nor a
        reason to fail over."""
        router = Router()
        started = asyncio.Event()

        @router.on("slow")
        async def slow(data: bytes) -> bytes:
            started.set()
            await asyncio.sleep(30)
            return data

        async with NatsServer(jetstream=False) as server:
            transport = await NatsTransport.connect(server.url)
            try:
                async with (
                    Node(transport, router, num_shards=NUM_SHARDS, node_id="n1", stop_timeout=0.2),
                    EdgeClient([server.url], num_shards=NUM_SHARDS, settings=EDGES) as edge,
                ):
                    call = asyncio.ensure_future(edge.key("k").request_raw("slow"))
                    await started.wait()
                    call.cancel()
                    with pytest.raises(asyncio.CancelledError):
                        await call
                    assert [e.failovers for e in edge.edges()] == [0]
                    assert edge.health().ok
            finally:
                await transport.close()
