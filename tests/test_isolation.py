"""Isolation: clusters with different subject prefixes share a NATS system unseen.

Two clusters, ``alpha`` and ``beta``, with the same number of shards, the
same node ids and the same keys, on one nats-server (and on one memory
network): every request is handled by its own cluster, and no message of one
ever reaches the other's subjects or nodes.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest
import pytest_asyncio

from clstr import Client, Envelope, Node, NoShardOwnerError, Transport
from clstr.testing import NatsServer
from clstr.transports.nats import NatsOptions, NatsTransport

Connect = Callable[[str], Awaitable[Transport]]

NUM_SHARDS = 8
NODE_IDS = ["node-0", "node-1"]
PREFIXES = ["alpha", "beta"]
KEYS = [f"user-{i}" for i in range(40)]


@dataclass
class Seen:
    """What the nodes of one cluster handled."""

    cluster: str
    keys: Counter[str] = field(default_factory=Counter)

    async def __call__(self, env: Envelope) -> bytes:
        self.keys[env.key or ""] += 1
        return self.cluster.encode()


@dataclass
class Deployment:
    """One cluster: its nodes, its client and what its nodes saw."""

    prefix: str
    seen: Seen
    nodes: list[Node]
    client: Client


async def deploy(connect: Connect, prefix: str) -> Deployment:
    """Start a cluster under ``prefix`` (nodes with the same ids in every cluster)."""
    seen = Seen(prefix)
    nodes = []
    for node_id in NODE_IDS:
        node = Node(
            await connect(f"{prefix}-{node_id}"),
            seen,
            node_id=node_id,
            nodes=NODE_IDS,
            num_shards=NUM_SHARDS,
            prefix=prefix,
        )
        await node.start()
        nodes.append(node)
    client = Client(await connect(f"{prefix}-client"), num_shards=NUM_SHARDS, prefix=prefix)
    return Deployment(prefix, seen, nodes, client)


@pytest_asyncio.fixture
async def clusters(connect: Connect) -> AsyncIterator[dict[str, Deployment]]:
    """The alpha and beta clusters, on one transport of the parametrized kind."""
    made = {p: await deploy(connect, p) for p in PREFIXES}
    try:
        yield made
    finally:
        for d in made.values():
            for node in d.nodes:
                await node.stop()


class TestPrefixIsolation:
    """Each cluster serves its own requests only, on both transports."""

    async def test_requests_stay_in_their_cluster(self, clusters: dict[str, Deployment]) -> None:
        """Both clusters get the same keys; each request is answered by its own cluster."""
        for _ in range(2):
            for prefix, d in clusters.items():
                replies = await asyncio.gather(*(d.client.request_key(k, "t") for k in KEYS))
                assert set(replies) == {prefix.encode()}
        for d in clusters.values():
            assert d.seen.keys == Counter(dict.fromkeys(KEYS, 2))
            assert sum(n.stats.received for n in d.nodes) == 2 * len(KEYS)

    async def test_stopped_cluster_is_not_served_by_the_other(
        self, clusters: dict[str, Deployment]
    ) -> None:
        """With beta's nodes gone, beta's requests find no owner, though alpha serves
        the same shards."""
        alpha, beta = clusters["alpha"], clusters["beta"]
        for node in beta.nodes:
            await node.stop()
        with pytest.raises(NoShardOwnerError):
            await beta.client.request_key("user-1", "t")
        assert await alpha.client.request_key("user-1", "t") == b"alpha"
        assert sum(beta.seen.keys.values()) == 0

    async def test_notifications_stay_in_their_cluster(
        self, clusters: dict[str, Deployment]
    ) -> None:
        """Fire-and-forget messages reach only their own cluster too."""
        alpha, beta = clusters["alpha"], clusters["beta"]
        for key in KEYS:
            await alpha.client.notify_key(key, "t")
        # Per-key FIFO: once a request for each key is answered, its note ran.
        await asyncio.gather(*(alpha.client.request_key(k, "t") for k in KEYS))
        assert alpha.seen.keys == Counter(dict.fromkeys(KEYS, 2))
        assert sum(beta.seen.keys.values()) == 0


class TestWireIsolation:
    """On NATS, no message of one cluster ever crosses the other's subjects."""

    async def test_subject_spaces_do_not_overlap(self, clstr_nats_server: NatsServer) -> None:
        """A wildcard spy on each prefix sees only its own cluster's envelopes."""
        transports: list[NatsTransport] = []

        async def connect(name: str) -> Transport:
            transport = await NatsTransport.connect(clstr_nats_server.url, NatsOptions(name=name))
            transports.append(transport)
            return transport

        spied: dict[str, list[str]] = {p: [] for p in PREFIXES}
        spy = await connect("spy")

        def record(prefix: str) -> Callable[[bytes, str | None], None]:
            return lambda data, reply: spied[prefix].append(data.hex())

        for prefix in PREFIXES:
            await spy.subscribe(f"{prefix}.>", record(prefix))
        deployments = [await deploy(connect, p) for p in PREFIXES]
        try:
            for d in deployments:
                await asyncio.gather(*(d.client.request_key(k, d.prefix) for k in KEYS))
            alpha_bodies, beta_bodies = set(spied["alpha"]), set(spied["beta"])
            assert len(spied["alpha"]) == len(spied["beta"]) == len(KEYS)
            assert not alpha_bodies & beta_bodies
            # Every envelope names its own cluster's message type.
            assert all(bytes.fromhex(b).find(b"alpha") >= 0 for b in alpha_bodies)
            assert all(bytes.fromhex(b).find(b"beta") >= 0 for b in beta_bodies)
        finally:
            for d in deployments:
                for node in d.nodes:
                    await node.stop()
            for transport in transports:
                await transport.close()
