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
# Load keeps running this long after the failed-over connection is back.
SETTLE = 1.0

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

    def worst(self, start: float, end: float) -> float:
        """The worst latency of requests that started in ``[start, end]``."""
        return max((lat for t, lat in self.samples if start <= t <= end), default=0.0)


async def call(client: Client, key: str, load: Load) -> None:
    """One application request: the client's retry policy does the rest."""
    started = time.monotonic()
    try:
        await client.request_key(key, "inc")
    except (RequestError, TransportError) as exc:
        load.failures.append(f"{key}: {type(exc).__name__}: {exc}")
        return
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
            back = wait_event(d.node_transports[0], ConnectionEvent.RECONNECTED)
            killed_at = time.monotonic()
            await asyncio.to_thread(d.cluster.kill, victim)
            await asyncio.wait_for(back.wait(), 10)
            node_reconnect = time.monotonic() - killed_at
            await asyncio.sleep(SETTLE)  # load runs on: this is the measurement window
            node_window = (killed_at - ATTEMPT_TIMEOUT, time.monotonic())
            await asyncio.to_thread(d.cluster.restart, victim)

            # 2. The server the client is connected to.
            victim = server_index(d.cluster, d.client_transport)
            back = wait_event(d.client_transport, ConnectionEvent.RECONNECTED)
            killed_at2 = time.monotonic()
            await asyncio.to_thread(d.cluster.kill, victim)
            await asyncio.wait_for(back.wait(), 10)
            client_reconnect = time.monotonic() - killed_at2
            await asyncio.sleep(SETTLE)
            client_window = (killed_at2 - ATTEMPT_TIMEOUT, time.monotonic())
        finally:
            stop.set()
            await driver

        node_worst = load.worst(*node_window)
        client_worst = load.worst(*client_window)
        print(
            f"\nfailover: {sum(load.succeeded.values())} requests, {len(load.failures)} failed, "
            f"client retries by reason: {d.retries()}\n"
            f"  baseline worst latency            {baseline * 1000:8.1f} ms\n"
            f"  node's server killed:   reconnect {node_reconnect * 1000:8.1f} ms, "
            f"worst request latency {node_worst * 1000:8.1f} ms\n"
            f"  client's server killed: reconnect {client_reconnect * 1000:8.1f} ms, "
            f"worst request latency {client_worst * 1000:8.1f} ms"
        )
        assert load.failures == []
        # Exactly once: every effect applied belongs to one successful request.
        assert d.handler.applied == load.succeeded
        assert node_worst < DEADLINE
        assert client_worst < DEADLINE


async def _until(predicate: object, timeout: float = 10.0) -> None:
    assert callable(predicate)
    async with asyncio.timeout(timeout):
        while not predicate():  # noqa: ASYNC110 - progress of a load generator, no event
            await asyncio.sleep(0.01)
