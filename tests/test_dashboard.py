"""The dashboard without a browser: its data against real clusters on a real
nats-server, its HTTP server, and the time-in-node histogram nodes publish.

The page in a real browser (and a node killed under it) is tested in
test_dashboard_browser.py.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from clstr import Client, Envelope, Node, assign_shards, shard_for_key
from clstr.membership import KvMembership, KvSettings
from clstr.observe import (
    ClusterWatch,
    Dashboard,
    DashboardSettings,
    LatencyHistogram,
    ServiceDiscovery,
    ShardStats,
    serve_dashboard,
)
from clstr.observe._latency import (
    NUM_BUCKETS,
    bucket_bounds,
    bucket_index,
    counts_from_json,
    quantile,
)
from clstr.testing import NatsServer
from clstr.transports.nats import NatsOptions, NatsTransport

NUM_SHARDS = 16
FAST_KV = KvSettings(heartbeat_interval=0.25, heartbeat_ttl=2.0, reconcile_interval=0.25)
FAST = DashboardSettings(
    poll_interval=0.3,
    discovery_timeout=0.2,
    silent_after=0.7,
    rate_window=2.0,
    latency_window=3.0,
    connect_timeout=1.0,
    retry_interval=0.3,
)
SCHEMAS = Path(__file__).parent / "schemas"

Snapshot = dict[str, Any]


async def until(
    watch: ClusterWatch, check: Callable[[Snapshot], bool], timeout: float = 15.0
) -> Snapshot:
    """The first snapshot that passes ``check`` (waiting on the watch's updates)."""
    async with asyncio.timeout(timeout):
        while not check(watch.snapshot):
            await watch.changed(watch.version)
    return watch.snapshot


def owned_by(snapshot: Snapshot) -> dict[str, int]:
    counts: dict[str, int] = {}
    for shard in snapshot["shards"]:
        if shard["state"] == "owned":
            counts[shard["owner"]] = counts.get(shard["owner"], 0) + 1
    return counts


async def echo(env: Envelope) -> bytes:
    return env.data


@dataclass
class Running:
    node: Node
    discovery: ServiceDiscovery
    transport: NatsTransport

    async def stop(self) -> None:
        await self.discovery.stop()
        await self.node.stop()
        await self.transport.close()


async def start_node(
    url: str,
    node_id: str,
    prefix: str,
    *,
    kv: bool,
    members: list[str],
    handler: Callable[[Envelope], Awaitable[bytes]] = echo,
    kv_settings: KvSettings = FAST_KV,
) -> Running:
    """A node answering discovery, on KV membership or a static member list."""
    transport = await NatsTransport.connect(url, NatsOptions(name=node_id))
    stats = ShardStats()
    placement: dict[str, Any] = (
        {"membership": KvMembership(settings=kv_settings)} if kv else {"nodes": members}
    )
    node = Node(
        transport,
        stats.wrap(handler),
        node_id=node_id,
        num_shards=NUM_SHARDS,
        prefix=prefix,
        **placement,
    )
    await node.start()
    discovery = ServiceDiscovery(node, transport, shard_stats=stats)
    await discovery.start()
    return Running(node, discovery, transport)


@asynccontextmanager
async def cluster(
    url: str, prefix: str, *, kv: bool, n: int = 3, **options: Any
) -> AsyncIterator[dict[str, Running]]:
    ids = [f"node-{i + 1}" for i in range(n)]
    nodes = {
        node_id: await start_node(url, node_id, prefix, kv=kv, members=ids, **options)
        for node_id in ids
    }
    try:
        yield nodes
    finally:
        await asyncio.gather(*(r.stop() for r in nodes.values()))


@pytest.fixture
def prefix() -> str:
    return f"d{uuid.uuid4().hex[:8]}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def http(
    port: int, path: str, *, method: str = "GET", host: str = "127.0.0.1"
) -> tuple[int, dict[str, str], bytes]:
    """One plain HTTP/1.1 request; the status, headers and body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"{method} {path} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
        await writer.drain()
        raw = await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split(" ")[1]), headers, body


class TestLatencyHistogram:
    def test_buckets_tile_the_range_and_record_agrees_with_bucket_index(self) -> None:
        """Every bucket's bounds map back to it, and the inlined record() files
        values in the buckets bucket_index names (edges and huge values too)."""
        for index in range(NUM_BUCKETS):
            low, high = bucket_bounds(index)
            assert bucket_index(low) == index == bucket_index(high - 1)
            if index:
                assert bucket_bounds(index - 1)[1] == low
        values = [0, -5, 1, 31, 32, 33, 63, 64, 10**6, 2**44, 2**45 - 1, 2**45, 2**60]
        values += [random.randrange(1, 2**40) for _ in range(2000)]
        histogram = LatencyHistogram()
        expected: dict[int, int] = {}
        for value in values:
            histogram.record(value)
            expected[bucket_index(value)] = expected.get(bucket_index(value), 0) + 1
        assert histogram.counts() == expected
        assert histogram.count == len(values)

    def test_percentiles_are_within_the_bucket_resolution(self) -> None:
        """p50, p90 and p99 of a wide log-normal sample are within 3.2 % of the exact values."""
        rng = random.Random(7)
        values = sorted(int(rng.lognormvariate(13, 1.5)) for _ in range(50_000))
        histogram = LatencyHistogram()
        for value in values:
            histogram.record(value)
        for q in (0.5, 0.9, 0.99):
            exact = values[math.ceil(q * len(values)) - 1]
            estimate = histogram.quantile(q)
            assert estimate is not None
            assert abs(estimate - exact) / exact < 0.032, (q, exact, estimate)

    def test_published_buckets_subtract_into_the_percentiles_of_an_interval(self) -> None:
        """Two published snapshots subtract into the distribution of what came between
        them: a reader needs no window on the node."""
        histogram = LatencyHistogram()
        for _ in range(1000):
            histogram.record(1_000)  # 1 µs, before
        before = counts_from_json(json.loads(json.dumps(histogram.to_json()))["buckets"])
        for _ in range(100):
            histogram.record(5_000_000)  # 5 ms, after
        published = json.loads(json.dumps(histogram.to_json()))
        after = counts_from_json(published["buckets"])
        delta = {i: c - before.get(i, 0) for i, c in after.items()}
        p50 = quantile(delta, 0.5)
        assert p50 is not None
        assert abs(p50 - 5e6) / 5e6 < 0.04
        assert published["count"] == 1100
        assert published["p50"] is not None
        assert published["p50"] < 2_000
        assert quantile({}, 0.5) is None


class TestTimeInNode:
    async def test_queue_wait_counts_as_time_in_node(self) -> None:
        """A message that arrived 50 ms before its handler ran counts at least 50 ms,
        though its handler took microseconds."""
        stats = ShardStats()
        handler = stats.wrap(echo)
        env = Envelope(type="t", data=b"", shard=1, key="k", ttl=5.0)
        await asyncio.sleep(0.05)
        await handler(env)
        await handler(Envelope(type="t", data=b"", shard=1, key="k"))  # no TTL: handler time
        p99 = stats.time_in_node.quantile(1.0)
        p0 = stats.time_in_node.quantile(0.0)
        assert p99 is not None
        assert p99 >= 0.05e9 * 0.97
        assert p0 is not None
        assert p0 < 0.01e9
        assert stats.counters(1).processing_time < 0.05e9

    async def test_stats_publish_time_in_node_and_still_validate(self, prefix: str) -> None:
        """STATS carries data.time_in_node (count, p50/p90/p99, buckets) and data.uptime
        after requests, and the reply still validates against the micro schema."""
        async with NatsServer() as server, cluster(server.url, prefix, kv=False, n=1) as nodes:
            client = await Client.connect(server.url, num_shards=NUM_SHARDS, prefix=prefix)
            async with client:
                for i in range(20):
                    await client.request_key(f"k{i}", "echo", b"x")
            stats = nodes["node-1"].discovery.stats()
        schema = json.loads((SCHEMAS / "stats_response.json").read_text())
        jsonschema.validate(json.loads(json.dumps(stats)), schema)
        latency = stats["data"]["time_in_node"]
        assert latency["unit"] == "ns"
        assert latency["count"] == 20
        assert 0 < latency["p50"] <= latency["p90"] <= latency["p99"]
        assert sum(row[2] for row in latency["buckets"]) == 20
        assert stats["data"]["uptime"] >= 0


class TestClusterData:
    async def test_kv_cluster_shows_owners_rates_latency_and_a_graceful_leave(
        self, prefix: str
    ) -> None:
        """Against a KV cluster the snapshot shows every shard owned as HRW places it,
        request rates and p50/p99 once requests flow, and after a node leaves: the
        event, its shards moved to the others, and all owned again."""
        async with NatsServer() as server, cluster(server.url, prefix, kv=True) as nodes:
            watch = ClusterWatch(
                lambda: NatsTransport.connect(server.url),
                nats_url=server.url,
                prefix=prefix,
                settings=FAST,
            )
            await watch.start()
            try:
                snap = await until(watch, lambda s: s["state"] == "ok" and s["membership"] == "kv")
                assert snap["num_shards"] == NUM_SHARDS
                assert all(s["owner"] == s["desired"] for s in snap["shards"])
                assert {n["node_id"] for n in snap["nodes"]} == set(nodes)
                client = await Client.connect(server.url, num_shards=NUM_SHARDS, prefix=prefix)
                async with client:
                    for i in range(60):
                        await client.request_key(f"user-{i}", "echo", b"hi")
                    snap = await until(
                        watch,
                        lambda s: (
                            (s["summary"]["rate"] or 0) > 0
                            and all(n["p50_ms"] is not None for n in s["nodes"])
                        ),
                    )
                for row in snap["nodes"]:
                    assert row["status"] == "running"
                    assert row["answering"]
                    assert row["p50_ms"] <= row["p99_ms"] < 1000
                    assert row["uptime"] is not None
                    assert row["version"]
                assert "<svg" in snap["charts"]["rate"]
                leaving = nodes.pop("node-2")
                await leaving.stop()
                snap = await until(
                    watch,
                    lambda s: s["state"] == "ok" and "node-2" not in owned_by(s),
                )
                assert set(owned_by(snap)) == {"node-1", "node-3"}
                texts = [e["text"] for e in snap["events"]]
                assert "node-2 left the cluster" in texts
                assert any("moved from node-2" in t for t in texts)
            finally:
                await watch.stop()

    async def test_a_joining_node_shows_a_held_shard_moving_then_owned(self, prefix: str) -> None:
        """A node joins a KV cluster of two while a handler runs on a shard HRW gives
        the newcomer: the snapshot shows that shard moving (still held by its old
        owner, the newcomer desired) for as long as the handler holds the handoff,
        then owned by the newcomer once it ends; the join and the move are events."""
        two, three = ["node-1", "node-2"], ["node-1", "node-2", "node-3"]
        before, after = assign_shards(two, NUM_SHARDS), assign_shards(three, NUM_SHARDS)
        shard = next(s for s in range(NUM_SHARDS) if after[s] == "node-3")
        key = next(k for i in range(1000) if shard_for_key(k := f"k{i}", NUM_SHARDS) == shard)
        old = before[shard]
        running, release = asyncio.Event(), asyncio.Event()

        async def hold(env: Envelope) -> bytes:
            if env.key == key:
                running.set()
                await release.wait()
            return env.data

        # The old owner drains its in-flight messages before it lets the shard go: a
        # handoff bound well past the test's waits keeps the shard moving until release.
        patient = replace(FAST_KV, handoff_timeout=60.0)
        options: dict[str, Any] = {"handler": hold, "kv_settings": patient}
        async with (
            NatsServer() as server,
            cluster(server.url, prefix, kv=True, n=2, **options),
        ):
            watch = ClusterWatch(
                lambda: NatsTransport.connect(server.url),
                nats_url=server.url,
                prefix=prefix,
                settings=FAST,
            )
            await watch.start()
            joined: Running | None = None
            client = await Client.connect(server.url, num_shards=NUM_SHARDS, prefix=prefix)
            try:
                snap = await until(watch, lambda s: s["state"] == "ok" and s["membership"] == "kv")
                assert snap["shards"][shard] == {"owner": old, "desired": old, "state": "owned"}
                call = asyncio.ensure_future(client.request_key(key, "echo", b"x", timeout=60))
                await running.wait()
                joined = await start_node(
                    server.url, "node-3", prefix, kv=True, members=three, **options
                )
                snap = await until(watch, lambda s: s["shards"][shard]["desired"] == "node-3")
                assert snap["shards"][shard] == {
                    "owner": old,
                    "desired": "node-3",
                    "state": "moving",
                }
                assert snap["state"] == "degraded"
                assert snap["summary"]["moving"] >= 1
                release.set()
                assert await call == b"x"
                snap = await until(
                    watch, lambda s: s["state"] == "ok" and s["shards"][shard]["owner"] == "node-3"
                )
                assert snap["shards"][shard] == {
                    "owner": "node-3",
                    "desired": "node-3",
                    "state": "owned",
                }
                assert all(
                    s["owner"] == s["desired"] == after[n] for n, s in enumerate(snap["shards"])
                )
                texts = [e["text"] for e in snap["events"]]
                assert any(t.startswith("node-3 joined") for t in texts), texts
                assert any(f"moved from {old} to node-3" in t for t in texts), texts
            finally:
                release.set()
                await client.close()
                await watch.stop()
                if joined is not None:
                    await joined.stop()

    async def test_static_cluster_map_comes_from_discovery(self, prefix: str) -> None:
        """Without membership buckets the map is what the nodes announce; a node that
        stops answering leaves its shards marked as held by a silent node."""
        async with NatsServer() as server, cluster(server.url, prefix, kv=False) as nodes:
            watch = ClusterWatch(
                lambda: NatsTransport.connect(server.url),
                nats_url=server.url,
                prefix=prefix,
                settings=FAST,
            )
            await watch.start()
            try:
                snap = await until(watch, lambda s: s["state"] == "ok")
                assert snap["membership"] == "discovery"
                assert all(s["desired"] is None for s in snap["shards"])
                gone = nodes.pop("node-3")
                await gone.stop()
                snap = await until(watch, lambda s: s["summary"]["silent"] > 0)
                assert snap["state"] == "degraded"
                silent = {s["owner"] for s in snap["shards"] if s["state"] == "silent"}
                assert silent == {"node-3"}
                assert any(
                    e["text"] == "node-3 stopped answering discovery" for e in snap["events"]
                )
            finally:
                await watch.stop()

    async def test_a_server_without_nodes_says_so(self, prefix: str) -> None:
        """Reachable NATS with no node under the prefix is the "empty" state, with a hint."""
        async with (
            NatsServer() as server,
            Dashboard(server.url, prefix=prefix, port=0, settings=FAST) as dashboard,
        ):
            snap = await until(dashboard.watch, lambda s: s["state"] == "empty")
        assert "clstr dev up" in snap["message"]
        assert snap["nodes"] == []


class TestHttp:
    async def test_unreachable_cluster_is_a_state_not_an_error(self) -> None:
        """With nothing listening at the NATS URL the page still loads and the state
        says the cluster is unreachable and why; the dashboard keeps retrying."""
        url = f"nats://127.0.0.1:{free_port()}"
        async with Dashboard(url, port=0, settings=FAST) as dashboard:
            snap = await until(dashboard.watch, lambda s: s["state"] == "unreachable")
            status, headers, body = await http(dashboard.port, "/")
            assert status == 200
            assert b"clstr dashboard" in body
            status, headers, body = await http(dashboard.port, "/api/state")
            assert status == 200
            assert headers["content-type"] == "application/json"
            assert json.loads(body)["state"] == "unreachable"
            version = dashboard.watch.version
            await until(dashboard.watch, lambda s: dashboard.watch.version > version + 1)
        assert "cannot reach NATS at " + url in snap["message"]
        assert "retrying" in snap["message"]

    async def test_routes_methods_and_the_host_check(self) -> None:
        """Static files come with a strict content policy; unknown paths are 404,
        other methods 405, and a Host that is not loopback 403 (DNS rebinding)."""
        async with Dashboard(f"nats://127.0.0.1:{free_port()}", port=0, settings=FAST) as dashboard:
            port = dashboard.port
            status, headers, _ = await http(port, "/dashboard.js")
            assert status == 200
            assert headers["content-type"].startswith("text/javascript")
            assert "script-src 'self'" in headers["content-security-policy"]
            assert (await http(port, "/dashboard.css"))[0] == 200
            assert (await http(port, "/nope"))[0] == 404
            assert (await http(port, "/", method="POST"))[0] == 405
            assert (await http(port, "/", host="evil.example"))[0] == 403
            assert (await http(port, "/", host="localhost"))[0] == 200

    async def test_events_stream_snapshots_and_stop_closes_them(self) -> None:
        """GET /events streams one snapshot per update as Server-Sent Events, and
        stop() ends open streams (no task is left)."""
        dashboard = Dashboard(f"nats://127.0.0.1:{free_port()}", port=0, settings=FAST)
        await dashboard.start()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", dashboard.port)
            writer.write(b"GET /events HTTP/1.1\r\nHost: localhost\r\n\r\n")
            head = await reader.readuntil(b"\r\n\r\n")
            assert b"text/event-stream" in head
            events = []
            async with asyncio.timeout(10):
                while len(events) < 2:
                    line = await reader.readline()
                    if line.startswith(b"data: "):
                        events.append(json.loads(line[6:]))
            assert {e["state"] for e in events} <= {"connecting", "unreachable"}
        finally:
            await dashboard.stop()
        async with asyncio.timeout(5):
            await reader.read()  # returns at the end of the stream: the server closed it
        assert reader.at_eof()
        writer.close()
        await writer.wait_closed()

    async def test_a_taken_port_is_a_configuration_error(self) -> None:
        """Binding a port in use fails at start with a message naming the address."""
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            sock.listen()
            port = sock.getsockname()[1]
            dashboard = Dashboard("nats://127.0.0.1:1", port=port, settings=FAST)
            with pytest.raises(Exception, match=f"cannot serve the dashboard on 127.0.0.1:{port}"):
                await dashboard.start()
            await dashboard.stop()

    async def test_serve_dashboard_runs_until_cancelled(self) -> None:
        """serve_dashboard calls ready with the started dashboard and stops cleanly
        when its task is cancelled; credentials in the URL never reach the page."""
        started: asyncio.Future[Dashboard] = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(
            serve_dashboard(
                f"nats://ann:secret@127.0.0.1:{free_port()}",
                port=0,
                settings=FAST,
                ready=started.set_result,
            )
        )
        dashboard = await started
        _, _, body = await http(dashboard.port, "/api/state")
        assert b"secret" not in body
        assert b"ann" not in body
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", dashboard.port)
