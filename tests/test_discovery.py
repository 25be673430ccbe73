"""NATS service discovery (micro v1): nodes answer $SRV.PING/INFO/STATS natively.

Discovery here uses plain nats-py requests, the way any NATS tool does, and
every reply is validated against the published micro v1 JSON schemas
(vendored in tests/schemas/, see its README).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import jsonschema
import nats
import nats.errors
import pytest
import pytest_asyncio
from nats.aio.client import Client as NatsClient
from nats.micro.service import ServiceInfo, ServiceStats

import clstr
from clstr import Client, Envelope, MemoryTransport, Node, Router
from clstr.demo_app import MESSAGE_TYPES, app
from clstr.discovery import (
    DEFAULT_SERVICE_NAME,
    ServiceDiscovery,
    ShardStats,
    control_subject,
    discover,
)
from clstr.handlers import shard_released
from clstr.testing import NatsServer
from clstr.transports.nats import NatsOptions, NatsTransport

SCHEMAS = Path(__file__).parent / "schemas"
NODE_IDS = ["node-1", "node-2", "node-3"]
NUM_SHARDS = 16


def _validator(name: str) -> jsonschema.Draft7Validator:
    schema = json.loads((SCHEMAS / f"{name}_response.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(
        schema, format_checker=jsonschema.Draft7Validator.FORMAT_CHECKER
    )


VALIDATORS = {verb: _validator(verb.lower()) for verb in ("PING", "INFO", "STATS")}


def check_reply(verb: str, reply: dict[str, Any]) -> None:
    """Validate ``reply`` against its schema, plus what clstr promises beyond it."""
    VALIDATORS[verb].validate(reply)
    assert isinstance(reply["metadata"], dict)
    if verb == "INFO":
        assert isinstance(reply["description"], str)
        for endpoint in reply["endpoints"]:
            assert isinstance(endpoint["metadata"], dict)
    if verb == "STATS":
        # RFC 3339 in UTC; the schema's date-time format is not checked without extras.
        assert reply["started"].endswith("Z")
        datetime.fromisoformat(reply["started"].replace("Z", "+00:00"))


@dataclass
class Cluster:
    """Three nodes with discovery on one server, under a prefix and service name of their own."""

    url: str
    prefix: str
    name: str
    nodes: list[Node] = field(default_factory=list)
    discoveries: list[ServiceDiscovery] = field(default_factory=list)
    transports: list[NatsTransport] = field(default_factory=list)

    def node(self, node_id: str) -> Node:
        return next(n for n in self.nodes if n.node_id == node_id)


@pytest.fixture
def names() -> tuple[str, str]:
    """A prefix and a service name no other test uses on the shared server."""
    tag = uuid.uuid4().hex[:8]
    return f"disc{tag}", f"clstr-test-{tag}"


@pytest_asyncio.fixture
async def cluster(clstr_nats_server: NatsServer, names: tuple[str, str]) -> AsyncIterator[Cluster]:
    """Three running nodes of the demo app, each with its discovery responder."""
    prefix, name = names
    made = Cluster(clstr_nats_server.url, prefix, name)
    try:
        for node_id in NODE_IDS:
            transport = await NatsTransport.connect(made.url, NatsOptions(name=node_id))
            made.transports.append(transport)
            stats = ShardStats()
            node = Node(
                transport,
                stats.wrap(app(node_id)),
                node_id=node_id,
                nodes=NODE_IDS,
                num_shards=NUM_SHARDS,
                prefix=prefix,
            )
            await node.start()
            made.nodes.append(node)
            discovery = ServiceDiscovery(node, transport, name=name, shard_stats=stats)
            await discovery.start()
            made.discoveries.append(discovery)
        yield made
    finally:
        for discovery in made.discoveries:
            await discovery.stop()
        for node in made.nodes:
            await node.stop()
        for transport in made.transports:
            await transport.close()


@pytest_asyncio.fixture
async def nc(clstr_nats_server: NatsServer) -> AsyncIterator[NatsClient]:
    """A plain nats-py connection, as a NATS tool would have."""
    conn = await nats.connect(clstr_nats_server.url)
    try:
        yield conn
    finally:
        await conn.close()


async def gather(
    nc: NatsClient, subject: str, *, expected: int, timeout: float = 5.0
) -> list[dict[str, Any]]:
    """Publish an empty request on ``subject``; collect ``expected`` JSON replies on an inbox."""
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    replies: list[dict[str, Any]] = []
    try:
        await nc.publish(subject, b"", reply=inbox)
        async with asyncio.timeout(timeout):
            while len(replies) < expected:
                msg = await sub.next_msg(timeout=timeout)
                replies.append(json.loads(msg.data))
    finally:
        await sub.unsubscribe()
    return replies


class TestPing:
    async def test_ping_by_name_finds_every_node(self, cluster: Cluster, nc: NatsClient) -> None:
        """$SRV.PING.<name> is answered once per node, with the node id as service id."""
        replies = await gather(nc, f"$SRV.PING.{cluster.name}", expected=3)
        for reply in replies:
            check_reply("PING", reply)
        assert sorted(r["id"] for r in replies) == NODE_IDS
        assert {r["name"] for r in replies} == {cluster.name}
        assert {r["version"] for r in replies} == {clstr.__version__}
        assert {r["metadata"]["clstr.prefix"] for r in replies} == {cluster.prefix}

    async def test_ping_all_services_includes_the_nodes(
        self, cluster: Cluster, nc: NatsClient
    ) -> None:
        """The name-less $SRV.PING reaches the nodes too, as `nats micro ls` sends it."""
        replies = await discover(cluster.transports[0], "PING", None, quiet=0.3, timeout=3.0)
        ours = sorted(r["id"] for r in replies if r.get("name") == cluster.name)
        assert ours == NODE_IDS

    async def test_ping_by_id_reaches_one_node(self, cluster: Cluster, nc: NatsClient) -> None:
        """$SRV.PING.<name>.<id> is answered by that node alone."""
        msg = await nc.request(f"$SRV.PING.{cluster.name}.node-2", b"", timeout=2)
        reply = json.loads(msg.data)
        check_reply("PING", reply)
        assert reply["id"] == "node-2"


class TestInfo:
    async def test_info_lists_one_endpoint_per_owned_shard(
        self, cluster: Cluster, nc: NatsClient
    ) -> None:
        """INFO has an endpoint per shard the node serves, on its subject and queue group."""
        replies = await gather(nc, f"$SRV.INFO.{cluster.name}", expected=3)
        seen: list[int] = []
        for reply in replies:
            check_reply("INFO", reply)
            assert reply["description"] == ""
            node = cluster.node(reply["id"])
            shards = [int(e["name"].removeprefix("shard-")) for e in reply["endpoints"]]
            assert shards == node.shards
            for endpoint, shard in zip(reply["endpoints"], shards, strict=True):
                assert endpoint["subject"] == f"{cluster.prefix}.shard.{shard}"
                assert endpoint["queue_group"] == cluster.prefix
            seen += shards
        assert sorted(seen) == list(range(NUM_SHARDS))

    async def test_info_follows_shards_as_they_move(self, cluster: Cluster, nc: NatsClient) -> None:
        """A released shard leaves INFO at once, and comes back when acquired again."""
        node = cluster.node("node-1")
        shard = node.shards[0]
        subject = control_subject("INFO", cluster.name, "node-1")

        async def endpoints() -> list[str]:
            msg = await nc.request(subject, b"", timeout=2)
            reply = json.loads(msg.data)
            check_reply("INFO", reply)
            return [e["name"] for e in reply["endpoints"]]

        assert f"shard-{shard}" in await endpoints()
        await node.release(shard)
        assert f"shard-{shard}" not in await endpoints()
        await node.acquire(shard)
        assert f"shard-{shard}" in await endpoints()

    async def test_nats_py_micro_parses_the_replies(self, cluster: Cluster, nc: NatsClient) -> None:
        """nats-py's own micro types read INFO and STATS replies without a missing field."""
        info = json.loads((await nc.request(f"$SRV.INFO.{cluster.name}.node-3", b"")).data)
        stats = json.loads((await nc.request(f"$SRV.STATS.{cluster.name}.node-3", b"")).data)
        parsed_info = ServiceInfo.from_dict(info)
        parsed_stats = ServiceStats.from_dict(stats)
        assert parsed_info.id == parsed_stats.id == "node-3"
        assert len(parsed_info.endpoints) == len(cluster.node("node-3").shards)
        assert len(parsed_stats.endpoints) == len(parsed_info.endpoints)


class TestStats:
    async def test_stats_count_requests_and_errors_per_shard(
        self, cluster: Cluster, nc: NatsClient
    ) -> None:
        """STATS counts each shard's handled requests and handler errors, in nanoseconds."""
        client = Client(cluster.transports[0], num_shards=NUM_SHARDS, prefix=cluster.prefix)
        key = "user-7"
        shard = client.shard_for(key)
        owner = next(n for n in cluster.nodes if shard in n.shards)
        for _ in range(3):
            await client.key(key).request_raw("echo", b"\x01")
        with pytest.raises(clstr.NoHandlerError):
            await client.key(key).request_raw("no-such-type")

        msg = await nc.request(f"$SRV.STATS.{cluster.name}.{owner.node_id}", b"", timeout=2)
        reply = json.loads(msg.data)
        check_reply("STATS", reply)
        endpoint = next(e for e in reply["endpoints"] if e["name"] == f"shard-{shard}")
        assert endpoint["num_requests"] == 4
        assert endpoint["num_errors"] == 1
        assert "NoHandlerError" in endpoint["last_error"]
        assert endpoint["processing_time"] > 0
        assert endpoint["average_processing_time"] == endpoint["processing_time"] // 4
        assert endpoint["data"] == {"shard": shard, "node_id": owner.node_id}

    async def test_stats_data_holds_the_live_shard_map(
        self, cluster: Cluster, nc: NatsClient
    ) -> None:
        """STATS `data` carries the node's shards and queue; together they cover every shard."""
        replies = await gather(nc, f"$SRV.STATS.{cluster.name}", expected=3)
        covered: list[int] = []
        for reply in replies:
            check_reply("STATS", reply)
            data = reply["data"]
            node = cluster.node(reply["id"])
            assert data["node_id"] == node.node_id
            assert data["shards"] == node.shards
            assert data["num_shards"] == NUM_SHARDS
            assert data["state"] == "running"
            assert {"queued", "running", "handled", "errors", "rejected"} <= data.keys()
            covered += data["shards"]
        assert sorted(covered) == list(range(NUM_SHARDS))

    async def test_stats_follows_shards_as_they_move(
        self, cluster: Cluster, nc: NatsClient
    ) -> None:
        """A shard handed from node-1 to node-2 leaves node-1's STATS endpoints and
        `data`, and appears in node-2's, at once."""
        giver, taker = cluster.node("node-1"), cluster.node("node-2")
        shard = giver.shards[0]

        async def stats(node_id: str) -> tuple[list[int], list[int]]:
            subject = control_subject("STATS", cluster.name, node_id)
            reply = json.loads((await nc.request(subject, b"", timeout=2)).data)
            check_reply("STATS", reply)
            by_endpoint = [e["data"]["shard"] for e in reply["endpoints"]]
            for endpoint in reply["endpoints"]:
                assert endpoint["data"] == {"shard": endpoint["data"]["shard"], "node_id": node_id}
            return by_endpoint, reply["data"]["shards"]

        assert stats_has(await stats("node-1"), shard)
        assert not stats_has(await stats("node-2"), shard)
        await giver.release(shard)
        await taker.acquire(shard)
        assert not stats_has(await stats("node-1"), shard)
        assert stats_has(await stats("node-2"), shard)
        await taker.release(shard)
        await giver.acquire(shard)
        assert stats_has(await stats("node-1"), shard)
        assert not stats_has(await stats("node-2"), shard)

    async def test_the_map_survives_parsing_into_the_schema_types(
        self, cluster: Cluster, nc: NatsClient
    ) -> None:
        """A tool that parses STATS into nats-py's ServiceStats loses the top-level `data`,
        yet rebuilds the whole shard map from the endpoints' `data`, a standard field."""
        replies = await gather(nc, f"$SRV.STATS.{cluster.name}", expected=3)
        owners: dict[int, str] = {}
        for reply in replies:
            parsed = ServiceStats.from_dict(reply)
            for endpoint in parsed.endpoints:
                assert isinstance(endpoint.data, dict)
                owners[endpoint.data["shard"]] = endpoint.data["node_id"]
        assert owners == {shard: node.node_id for node in cluster.nodes for shard in node.shards}
        assert sorted(owners) == list(range(NUM_SHARDS))


def stats_has(stats: tuple[list[int], list[int]], shard: int) -> bool:
    """Whether both the STATS endpoints and its `data` list ``shard``; they must agree."""
    by_endpoint, in_data = stats
    assert by_endpoint == in_data
    return shard in by_endpoint


class TestShardStatsWrapper:
    async def test_the_wrapped_handler_keeps_its_types_and_hooks(self) -> None:
        """A handler wrapped by ShardStats still names its message types (node info shows
        them) and still hears on_shard_released (a KeyHandler evicts that shard's keys)."""
        released: list[int] = []

        class Tracked(Router):
            async def on_shard_released(self, shard: int) -> None:
                released.append(shard)

        router = Tracked()
        router.register("b.type", _noop)
        router.register("a.type", _noop)
        wrapped = ShardStats().wrap(router)
        assert getattr(wrapped, "message_types", None) == ["a.type", "b.type"]
        await shard_released(wrapped, 7)
        assert released == [7]
        assert getattr(ShardStats().wrap(_noop), "message_types", "missing") is None

    async def test_node_info_lists_the_types_through_the_wrapper(self) -> None:
        """A node whose handler is wrapped answers node info with the Router's types."""
        network = MemoryTransport()
        node = Node(network.connect("n"), ShardStats().wrap(app("n")), node_id="n", num_shards=4)
        async with node, Client(network.connect("c"), num_shards=4) as client:
            info = await client.key("k").node_info()
        assert info.message_types == sorted(MESSAGE_TYPES)


async def _noop(env: Envelope) -> bytes:
    return b""


class TestLifecycle:
    async def test_a_stopped_responder_no_longer_answers(
        self, cluster: Cluster, nc: NatsClient
    ) -> None:
        """After stop, the node's discovery subjects have no responders."""
        discovery = cluster.discoveries[0]
        await discovery.stop()
        with pytest.raises(nats.errors.NoRespondersError):
            await nc.request(control_subject("PING", cluster.name, discovery.id), b"", timeout=2)
        replies = await gather(nc, f"$SRV.PING.{cluster.name}", expected=2)
        assert sorted(r["id"] for r in replies) == ["node-2", "node-3"]

    async def test_names_outside_the_protocol_are_refused(self, cluster: Cluster) -> None:
        """A service name or id that is not one subject token is a configuration error."""
        node = cluster.nodes[0]
        transport = cluster.transports[0]
        with pytest.raises(clstr.ConfigurationError, match="letters, digits"):
            ServiceDiscovery(node, transport, name="my.service")
        with pytest.raises(clstr.ConfigurationError, match="service id"):
            ServiceDiscovery(node, transport, service_id="node 1")
        with pytest.raises(clstr.ConfigurationError, match="semantic version"):
            ServiceDiscovery(node, transport, version="1.0")

    def test_default_service_name_is_clstr(self) -> None:
        """Nodes announce themselves as the `clstr` service unless told otherwise."""
        assert DEFAULT_SERVICE_NAME == "clstr"
        assert control_subject("STATS", "clstr", "node-1") == "$SRV.STATS.clstr.node-1"
