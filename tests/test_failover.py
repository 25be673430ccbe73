"""NATS server failover: kill the server a node uses, then the one the client uses.

A 3-server NATS cluster (routes, JetStream on); two nodes and a client, each
given every server URL (in a different order, so that the node and the client
start on different servers). Keyed requests run all along on several workers;
a per-key counter handler applies each effect. The client's retry policy
carries one request id across a request's attempts: it resends at once on
``no_owner`` / ``not_owner``, and after ``ATTEMPT_TIMEOUT`` when a message
was lost with the dying server; the node answers a resent id with its first
reply. So no request fails and no effect applies twice.

Run with ``pytest -s`` to see the worst latency measured around each kill
(docs/reliability.md quotes them).
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import os
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import pytest
import pytest_asyncio
from prometheus_client import CollectorRegistry

from clstr import Client, Envelope, Node, PrometheusMetrics, RequestError, TransportError
from clstr.client import RetryPolicy
from clstr.testing import NatsCluster
from clstr.transports.base import ConnectionEvent
from clstr.transports.nats import NatsOptions, NatsTransport

NUM_SHARDS = 16
NODE_IDS = ["node-0", "node-1"]
KEYS = [f"account-{i}" for i in range(24)]
WORKERS = 8
DEADLINE = 5.0  # a few seconds, as an application would give
# Resend a message lost with a dying server after this long: the worst latency
# during a failover is about this plus the reconnect time.
ATTEMPT_TIMEOUT = float(os.environ.get("CLSTR_FAILOVER_ATTEMPT_TIMEOUT", "1.0"))
# Load keeps running this long after the failed-over connection is back, and
# until RESUMED requests sent after the reconnect are done.
SETTLE = 1.0
RESUMED = 20

# Fail over fast: detect a dead server by its closed socket, try the next at once.
OPTIONS = NatsOptions(reconnect_time_wait=0.1, connect_timeout=1.0, randomize_servers=False)


@dataclass
class Counters:
    """The per-key counter the cluster serves: each run of the handler is one effect."""

    applied: Counter[str] = field(default_factory=Counter)

    async def __call__(self, env: Envelope) -> bytes:
        key = env.key or ""
        self.applied[key] += 1
        return str(self.applied[key]).encode()


@dataclass
class Load:
    """What the load generator saw."""

    succeeded: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    # (start time, latency) of every successful request, on time.monotonic().
    samples: list[tuple[float, float]] = field(default_factory=list)
    # (start, end) of every request, failed ones included.
    spans: list[tuple[float, float]] = field(default_factory=list)

    def worst(self, start: float, end: float) -> float:
        """The worst latency of requests that started in ``[start, end]``."""
        return max((lat for t, lat in self.samples if start <= t <= end), default=0.0)

    def in_flight(self, start: float, end: float) -> int:
        """Requests sent before ``end`` that were not answered before ``start``."""
        return sum(1 for sent, done in self.spans if sent <= end and done >= start)

    def sent(self, start: float, end: float = float("inf")) -> int:
        """Requests sent in ``[start, end]`` and done by now."""
        return sum(1 for t, _ in self.spans if start <= t <= end)


async def call(client: Client, key: str, load: Load) -> None:
    """One application request: the client's retry policy does the rest."""
    started = time.monotonic()
    try:
        await client.request_key(key, "inc")
    except (RequestError, TransportError) as exc:
        load.failures.append(f"{key}: {type(exc).__name__}: {exc}")
        return
    finally:
        load.spans.append((started, time.monotonic()))
    load.succeeded[key] += 1
    load.samples.append((started, time.monotonic() - started))


async def drive(client: Client, load: Load, stop: asyncio.Event) -> None:
    """Keep ``WORKERS`` requests in flight until ``stop`` is set."""
    keys = itertools.cycle(KEYS)

    async def worker() -> None:
        while not stop.is_set():
            await call(client, next(keys), load)

    async with asyncio.TaskGroup() as tg:
        for _ in range(WORKERS):
            tg.create_task(worker())


def server_index(cluster: NatsCluster, transport: NatsTransport) -> int:
    """The index of the server ``transport`` is connected to now."""
    url = transport.connected_url
    assert url is not None, "the transport is not connected"
    return cluster.urls.index(url)


def wait_event(transport: NatsTransport, wanted: ConnectionEvent) -> asyncio.Event:
    """An event set once ``transport`` reports ``wanted``."""
    event = asyncio.Event()

    def listener(happened: ConnectionEvent) -> None:
        if happened is wanted:
            event.set()

    transport.add_listener(listener)
    return event


@pytest.fixture(scope="module")
def nats_cluster() -> Iterator[NatsCluster]:
    """A 3-server NATS cluster with routes and JetStream, for this module."""
    with NatsCluster(size=3, name="failover") as cluster:
        yield cluster


@dataclass
class Deployment:
    """Two nodes and a client on the NATS cluster."""

    cluster: NatsCluster
    handler: Counters
    nodes: list[Node]
    node_transports: list[NatsTransport]
    client: Client
    client_transport: NatsTransport
    registry: CollectorRegistry

    def retries_total(self) -> float:
        """All retries the client made so far."""
        return sum(self.retries().values())

    def retries(self) -> dict[str, float]:
        """Retries the client made, by reason (the error code that caused them)."""
        found: dict[str, float] = {}
        for metric in self.registry.collect():
            for sample in metric.samples:
                if sample.name == "clstr_cluster_request_retries_total":
                    found[sample.labels["reason"]] = sample.value
        return found


@pytest_asyncio.fixture
async def deployment(nats_cluster: NatsCluster) -> AsyncIterator[Deployment]:
    """Nodes on servers 0 and 1 first, the client on server 2 first; all URLs to each."""
    urls = nats_cluster.urls
    made: list[NatsTransport] = []

    async def connect(name: str, first: int) -> NatsTransport:
        order = urls[first:] + urls[:first]
        transport = await NatsTransport.connect(order, dataclasses.replace(OPTIONS, name=name))
        made.append(transport)
        return transport

    handler = Counters()
    registry = CollectorRegistry()
    nodes: list[Node] = []
    try:
        node_transports = [await connect(n, i) for i, n in enumerate(NODE_IDS)]
        for node_id, transport in zip(NODE_IDS, node_transports, strict=True):
            node = Node(transport, handler, node_id=node_id, nodes=NODE_IDS, num_shards=NUM_SHARDS)
            await node.start()
            nodes.append(node)
        client_transport = await connect("client", 2)
        client = Client(
            client_transport,
            num_shards=NUM_SHARDS,
            timeout=DEADLINE,
            retry=RetryPolicy(
                initial_backoff=0.01, max_backoff=0.1, attempt_timeout=ATTEMPT_TIMEOUT
            ),
            metrics=PrometheusMetrics(registry),
        )
        yield Deployment(
            nats_cluster, handler, nodes, node_transports, client, client_transport, registry
        )
        await client.close()
    finally:
        for node in nodes:
            await node.stop()
        for transport in made:
            await transport.close()
        # Leave every server running for the next test.
        await asyncio.to_thread(nats_cluster.start)


class TestServerFailover:
    """Requests keep succeeding, exactly once each, while NATS servers die under them."""

    async def test_kill_node_server_then_client_server(self, deployment: Deployment) -> None:
        """Killing the node's server, then the client's, fails no request and
        applies no effect twice."""
        d = deployment
        load = Load()
        stop = asyncio.Event()
        driver = asyncio.create_task(drive(d.client, load, stop))
        try:
            await _until(lambda: len(load.samples) >= 200)
            baseline = max(lat for _, lat in load.samples)

            # 1. The server node-0 is connected to.
            victim = server_index(d.cluster, d.node_transports[0])
            assert victim != server_index(d.cluster, d.client_transport)
            node_kill = await kill_and_wait(d, victim, d.node_transports[0], load)
            await asyncio.to_thread(d.cluster.restart, victim)

            # 2. The server the client is connected to.
            victim = server_index(d.cluster, d.client_transport)
            client_kill = await kill_and_wait(d, victim, d.client_transport, load)
        finally:
            stop.set()
            await driver

        print(
            f"\nfailover: {sum(load.succeeded.values())} requests, {len(load.failures)} failed, "
            f"client retries by reason: {d.retries()}\n"
            f"  baseline worst latency            {baseline * 1000:8.1f} ms\n"
            f"  node's server killed:   {node_kill.describe(load)}\n"
            f"  client's server killed: {client_kill.describe(load)}"
        )
        assert load.failures == []
        # Exactly once: every effect applied belongs to one successful request.
        assert d.handler.applied == load.succeeded
        for kill in (node_kill, client_kill):
            # Each kill hit live traffic: requests were in flight when the server
            # died, and some had to be resent (lost with the server, or no
            # responder while subscriptions moved). (kill_and_wait also waited
            # for requests sent after the reconnect to succeed.)
            assert load.in_flight(kill.killed_at, kill.killed_done) > 0
            assert kill.retries > 0
            assert load.worst(*kill.window) < DEADLINE


@dataclass
class Kill:
    """One server kill and what the load saw around it (times on time.monotonic())."""

    killed_at: float  # just before the kill
    killed_done: float  # the process is gone
    back_at: float  # the connection that used it is back
    window: tuple[float, float]  # requests that started here met the failover
    retries: float  # client retries during the window

    def describe(self, load: Load) -> str:
        return (
            f"reconnect {(self.back_at - self.killed_at) * 1000:8.1f} ms, "
            f"worst request latency {load.worst(*self.window) * 1000:8.1f} ms, "
            f"{load.in_flight(self.killed_at, self.killed_done)} requests in flight at the kill, "
            f"{self.retries:.0f} retries, "
            f"{load.sent(self.back_at, self.window[1])} sent after the reconnect"
        )


async def kill_and_wait(d: Deployment, victim: int, transport: NatsTransport, load: Load) -> Kill:
    """Kill server ``victim``, wait for ``transport`` to reconnect elsewhere, let the
    load run ``SETTLE`` seconds more and until requests sent after the reconnect
    succeed: the measurement window."""
    back = wait_event(transport, ConnectionEvent.RECONNECTED)
    retries_before = d.retries_total()
    killed_at = time.monotonic()
    await asyncio.to_thread(d.cluster.kill, victim)
    killed_done = time.monotonic()
    await asyncio.wait_for(back.wait(), 10)
    back_at = time.monotonic()
    await asyncio.sleep(SETTLE)  # load runs on: this is the measurement window
    await _until(lambda: load.sent(back_at) >= RESUMED)
    return Kill(
        killed_at,
        killed_done,
        back_at,
        (killed_at - ATTEMPT_TIMEOUT, time.monotonic()),
        d.retries_total() - retries_before,
    )


async def _until(predicate: object, timeout: float = 10.0) -> None:
    assert callable(predicate)
    async with asyncio.timeout(timeout):
        while not predicate():  # noqa: ASYNC110 - progress of a load generator, no event
            await asyncio.sleep(0.01)
