"""Dynamic membership on JetStream KV, with nodes in this process against a real server.

Each test gets its own nats-server (fresh KV buckets). Crashes of separate
node processes (SIGKILL) and the churn test live in test_churn.py.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import nats.js.errors
import pytest
import pytest_asyncio

from clstr import (
    ConfigurationError,
    Envelope,
    IdempotencyKeyReusedError,
    MemoryTransport,
    Node,
    NotOwnerError,
    RetryPolicy,
)
from clstr.client import Client
from clstr.hashing import assign_shards, shard_for_key
from clstr.membership import (
    ClusterState,
    KvMembership,
    KvSettings,
    MembershipEvent,
    MembershipEventKind,
    StaticMembership,
    control_subject,
)
from clstr.testing import NatsCluster, NatsServer, TcpProxy
from clstr.transports.nats import NatsOptions, NatsTransport

from _support import eventually

NUM_SHARDS = 32
# A 2 s TTL: short for fast tests, long enough that a loaded CI machine does
# not let a live node's heartbeat lapse.
FAST = KvSettings(heartbeat_interval=0.25, heartbeat_ttl=2.0, reconcile_interval=0.25)


@dataclass
class Record:
    """What ran where: (shard, node, start, end) per handler call."""

    calls: list[tuple[int, str, float, float]] = field(default_factory=list)

    def handler(self, node_id: str) -> Callable[[Envelope], Awaitable[bytes]]:
        async def handle(env: Envelope) -> bytes:
            start = time.monotonic()
            await asyncio.sleep(0)
            self.calls.append((env.shard, node_id, start, time.monotonic()))
            return node_id.encode()

        return handle


@dataclass
class Harness:
    url: str
    record: Record
    nodes: dict[str, Node] = field(default_factory=dict)
    transports: list[NatsTransport] = field(default_factory=list)

    async def connect(self, name: str, url: str | None = None) -> NatsTransport:
        transport = await NatsTransport.connect(
            url or self.url, NatsOptions(name=name, reconnect_time_wait=0.1)
        )
        self.transports.append(transport)
        return transport

    async def start(self, node_id: str, *, url: str | None = None, weight: float = 1.0) -> Node:
        node = Node(
            await self.connect(node_id, url),
            self.record.handler(node_id),
            node_id=node_id,
            num_shards=NUM_SHARDS,
            membership=KvMembership(weight=weight, settings=FAST),
            stop_timeout=5,
        )
        await node.start()
        self.nodes[node_id] = node
        return node

    def kv(self, node_id: str) -> KvMembership:
        membership = self.nodes[node_id].membership
        assert isinstance(membership, KvMembership)
        return membership

    async def settled(self, viewer: str, members: set[str], timeout: float = 15) -> ClusterState:
        """Wait until ``viewer`` sees exactly ``members`` and every shard at its desired owner."""
        kv = self.kv(viewer)
        async with asyncio.timeout(timeout):
            while True:
                state = kv.cluster_state()
                if set(state.members) == members and state.balanced:
                    served = {s for n in members for s in self.nodes[n].shards}
                    if served == set(range(NUM_SHARDS)):
                        return state
                await kv._changed()


@pytest_asyncio.fixture
async def harness() -> AsyncIterator[Harness]:
    async with NatsServer() as server:
        h = Harness(server.url, Record())
        try:
            yield h
        finally:
            for node in h.nodes.values():
                await node.stop()
            for transport in h.transports:
                await transport.close()


def assert_single_owner(calls: list[tuple[int, str, float, float]]) -> None:
    """No two nodes ever ran handlers of one shard at overlapping times."""
    by_shard: dict[int, list[tuple[float, float, str]]] = {}
    for shard, node, start, end in calls:
        by_shard.setdefault(shard, []).append((start, end, node))
    for shard, runs in by_shard.items():
        runs.sort()
        for (_s1, e1, n1), (s2, _e2, n2) in itertools.pairwise(runs):
            assert n1 == n2 or e1 <= s2, f"shard {shard}: {n1} and {n2} overlap"


class TestPlacement:
    async def test_two_nodes_split_every_shard_exactly_once(self, harness: Harness) -> None:
        """Two nodes end up serving disjoint shard sets that cover every shard, by HRW."""
        await harness.start("a")
        await harness.start("b")
        state = await harness.settled("a", {"a", "b"})
        assert sorted(state.shards_of("a") + state.shards_of("b")) == list(range(NUM_SHARDS))
        assert set(harness.nodes["a"].shards).isdisjoint(harness.nodes["b"].shards)

    async def test_join_moves_only_the_shards_the_new_node_wins(self, harness: Harness) -> None:
        """A node joining under load takes exactly the shards HRW gives it; no request fails."""
        await harness.start("a")
        await harness.start("b")
        before = (await harness.settled("a", {"a", "b"})).owners
        client = Client(
            await harness.connect("client"),
            num_shards=NUM_SHARDS,
            # As docs/membership.md advises: an attempt lost in a handoff is
            # re-sent (same id) instead of waiting out the whole deadline.
            retry=RetryPolicy(attempt_timeout=1.0),
            timeout=5,
        )
        stop = asyncio.Event()
        failures: list[BaseException] = []
        sent = 0

        async def load() -> None:
            nonlocal sent
            while not stop.is_set():
                try:
                    await client.request_key(f"k{sent % 97}", "x")
                except Exception as exc:
                    failures.append(exc)
                sent += 1

        driver = asyncio.create_task(load())
        await harness.start("c")
        after = await harness.settled("a", {"a", "b", "c"})
        await harness.settled("c", {"a", "b", "c"})
        stop.set()
        await driver
        moved = {s for s in before if after.owners[s] != before[s]}
        print(
            f"\njoin moved {len(moved)}/{NUM_SHARDS} shards "
            f"({len(moved) / NUM_SHARDS:.3f}; ideal 1/3)"
        )
        assert moved == set(after.shards_of("c"))
        assert failures == []
        assert sent > 0
        assert_single_owner(harness.record.calls)

    async def test_weights_are_honoured(self, harness: Harness) -> None:
        """A node with weight 3 gets clearly more shards than one with weight 1."""
        await harness.start("light", weight=1)
        await harness.start("heavy", weight=3)
        state = await harness.settled("light", {"light", "heavy"})
        assert len(state.shards_of("heavy")) > len(state.shards_of("light"))

    async def test_kv_membership_needs_nats(self) -> None:
        """KvMembership on a memory transport is refused with a clear error."""
        node = Node(
            MemoryTransport(),
            Record().handler("x"),
            num_shards=4,
            membership=KvMembership(),
        )
        with pytest.raises(ConfigurationError, match="NatsTransport"):
            await node.start()


class TestLeaving:
    async def test_graceful_leave_hands_shards_over(self, harness: Harness) -> None:
        """A node that stops hands its shards to the survivors, who serve all of them."""
        await harness.start("a")
        await harness.start("b")
        await harness.settled("a", {"a", "b"})
        leaver = harness.nodes.pop("b")
        started = time.monotonic()
        await leaver.stop()
        await harness.settled("a", {"a"})
        assert time.monotonic() - started < 5
        assert harness.nodes["a"].shards == list(range(NUM_SHARDS))

    async def test_graceful_stop_deletes_the_heartbeat_at_once(self, harness: Harness) -> None:
        """A stopping node deletes its heartbeat key itself: it is gone as stop
        returns, not a heartbeat TTL later."""
        await harness.start("a")
        await harness.start("b")
        await harness.settled("a", {"a", "b"})
        members = harness.kv("a")._beat().kv
        assert (await members.get("b")).value
        await harness.nodes.pop("b").stop()
        with pytest.raises((nats.js.errors.KeyDeletedError, nats.js.errors.KeyNotFoundError)):
            await members.get("b")

    async def test_crashed_node_shards_move_after_heartbeat_ttl(self, harness: Harness) -> None:
        """When a node's connection dies without a goodbye, survivors take its shards
        within the heartbeat TTL plus a small bound."""
        await harness.start("a")
        await harness.start("b")
        await harness.settled("a", {"a", "b"})
        crashed = harness.nodes.pop("b")
        started = time.monotonic()
        await crashed.transport.nc.close()  # type: ignore[attr-defined]
        await harness.settled("a", {"a"})
        took = time.monotonic() - started
        assert took < FAST.heartbeat_ttl + 3, f"took {took:.2f}s"
        await crashed.stop(timeout=1)

    async def test_drain_moves_shards_away_before_stop(self, harness: Harness) -> None:
        """drain() cordons the node and returns once every shard it held has moved."""
        await harness.start("a")
        await harness.start("b")
        await harness.settled("a", {"a", "b"})
        await harness.kv("b").drain(timeout=10)
        assert harness.nodes["b"].shards == []
        state = harness.kv("a").cluster_state()
        assert state.members["b"].cordoned
        await harness.settled("a", {"a", "b"})  # b is still a member, just owns nothing
        assert harness.nodes["a"].shards == list(range(NUM_SHARDS))

    async def test_drain_from_outside_over_the_control_subject(self, harness: Harness) -> None:
        """A JSON {"op": "drain"} request on the node's control subject drains it."""
        await harness.start("a")
        await harness.start("b")
        await harness.settled("a", {"a", "b"})
        operator = await harness.connect("operator")
        reply = await operator.request(control_subject("clstr", "b"), b'{"op": "drain"}', 10)
        assert json.loads(reply) == {"ok": True, "node_id": "b", "op": "drain"}
        assert harness.nodes["b"].shards == []
        bad = await operator.request(control_subject("clstr", "b"), b'{"op": "explode"}', 10)
        assert json.loads(bad)["ok"] is False

    async def test_stop_ends_a_heartbeat_whose_cancellation_was_swallowed(
        self, harness: Harness, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """On Python 3.11 nats-py's request (asyncio.wait_for) swallows a
        cancellation whose reply arrived in the same loop turn: the heartbeat
        loop must end anyway, and stop must not wait on it until its bound."""
        await harness.start("a")
        kv = harness.kv("a")
        heartbeat = next(t for t in asyncio.all_tasks() if t.get_name() == "clstr-heartbeat-a")
        renew = kv._heartbeat
        entered, swallowed = asyncio.Event(), asyncio.Event()

        async def swallowing_once() -> None:
            if asyncio.current_task() is heartbeat and not entered.is_set():
                entered.set()
                try:
                    await asyncio.Event().wait()
                except asyncio.CancelledError:
                    swallowed.set()  # and carry on, as wait_for does
            await renew()

        monkeypatch.setattr(kv, "_heartbeat", swallowing_once)
        await entered.wait()
        node = harness.nodes.pop("a")
        stopped = asyncio.get_running_loop().create_task(node.stop(timeout=60))
        await swallowed.wait()
        await stopped  # before the fix: hangs until the bound, then leaks the loop
        assert heartbeat.done()


class Counting:
    """Per-key counters: each "inc" adds one (not idempotent by itself); "held"
    waits for ``gate`` first."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.runs: list[tuple[str, str | None]] = []  # (node, request id) per call
        self.gate = asyncio.Event()
        self.entered = asyncio.Event()

    def handler(self, node_id: str) -> Callable[[Envelope], Awaitable[bytes]]:
        async def handle(env: Envelope) -> bytes:
            self.runs.append((node_id, env.id))
            if env.type == "held":
                self.entered.set()
                await self.gate.wait()
            key = env.key or ""
            self.counts[key] = self.counts.get(key, 0) + 1
            return b"%d" % self.counts[key]

        return handle


class TestIdentity:
    def test_heartbeat_interval_must_be_shorter_than_the_lease(self) -> None:
        """An interval the lease cannot outlast is refused: the node would fence
        itself between two heartbeats."""
        with pytest.raises(ConfigurationError, match="shorter than the lease"):
            KvMembership(settings=KvSettings(heartbeat_interval=2.5, heartbeat_ttl=3.0))
        KvMembership(settings=KvSettings(heartbeat_interval=2.0, heartbeat_ttl=3.0))

    async def test_a_second_live_node_with_the_same_id_is_refused(self, harness: Harness) -> None:
        """Two live nodes with one id would serve the same shards: the second one's
        start fails with an error naming the first."""
        await harness.start("a")
        twin = Node(
            await harness.connect("twin"),
            harness.record.handler("twin"),
            node_id="a",
            num_shards=NUM_SHARDS,
            membership=KvMembership(settings=FAST),
        )
        with pytest.raises(ConfigurationError, match="'a' is in use by a live node"):
            await twin.start()
        assert harness.nodes["a"].shards == list(range(NUM_SHARDS))

    async def test_a_restart_takes_over_its_dead_predecessors_heartbeat(
        self, harness: Harness
    ) -> None:
        """A node restarted under the same id before its old heartbeat expired
        (the old process is gone, nobody renews it) joins without waiting a TTL."""
        await harness.start("a")
        crashed = harness.nodes.pop("a")
        await crashed.transport.nc.close()  # type: ignore[attr-defined]
        await crashed.stop(timeout=1)
        started = time.monotonic()
        await harness.start("a")
        assert time.monotonic() - started < FAST.heartbeat_ttl
        await harness.settled("a", {"a"})


class TestReplyHandoff:
    async def test_retries_across_a_shard_move_get_the_first_reply(self, harness: Harness) -> None:
        """Replies travel with a moving shard: a request answered by the old owner,
        and one still running there while its shard moves, are answered again
        from the handed-over replies by the new owner, not run a second time."""
        counting = Counting()

        async def start(node_id: str) -> Node:
            node = Node(
                await harness.connect(node_id),
                counting.handler(node_id),
                node_id=node_id,
                num_shards=NUM_SHARDS,
                membership=KvMembership(settings=FAST),
            )
            await node.start()
            harness.nodes[node_id] = node
            return node

        await start("a")
        moving = assign_shards(["a", "b"], NUM_SHARDS)
        keys = [
            k for k in (f"k{i}" for i in range(200)) if moving[shard_for_key(k, NUM_SHARDS)] == "b"
        ]
        done_key, held_key = keys[0], keys[1]
        client = Client(await harness.connect("client"), num_shards=NUM_SHARDS, timeout=10)
        assert await client.request_key(done_key, "inc", request_id="done-1") == b"1"
        held = asyncio.create_task(client.request_key(held_key, "held", request_id="held-1"))
        await counting.entered.wait()

        await start("b")
        held_shard = shard_for_key(held_key, NUM_SHARDS)
        await eventually(lambda: held_shard in harness.kv("a")._shards()._releasing)  # draining it
        counting.gate.set()
        assert await held == b"1"
        await harness.settled("a", {"a", "b"})
        assert held_shard in harness.nodes["b"].shards

        assert await client.request_key(done_key, "inc", request_id="done-1") == b"1"
        assert await client.request_key(held_key, "held", request_id="held-1") == b"1"
        assert counting.counts == {done_key: 1, held_key: 1}
        assert [r for r in counting.runs if r[0] == "b"] == []
        # A new id does run on the new owner.
        assert await client.request_key(done_key, "inc", request_id="done-2") == b"2"
        # The id of a handed-over reply names its request there too: reused for
        # another request, it is refused, not answered with the old reply.
        with pytest.raises(IdempotencyKeyReusedError):
            await client.request_key(done_key, "inc", b"other", request_id="done-1")
        assert counting.counts == {done_key: 2, held_key: 1}


class TestEvents:
    async def test_events_report_joins_leaves_and_handoffs(self, harness: Harness) -> None:
        """Listeners hear node joined/left and shard acquired/released."""
        await harness.start("a")
        await harness.settled("a", {"a"})
        events: list[MembershipEvent] = []
        harness.kv("a").add_listener(events.append)
        await harness.start("b")
        await harness.settled("a", {"a", "b"})
        await harness.nodes.pop("b").stop()
        await harness.settled("a", {"a"})
        kinds = {(e.kind, e.node_id) for e in events}
        assert (MembershipEventKind.NODE_JOINED, "b") in kinds
        assert (MembershipEventKind.NODE_LEFT, "b") in kinds
        assert (MembershipEventKind.SHARD_ACQUIRED, "b") in kinds
        assert (MembershipEventKind.SHARD_RELEASED, "b") in kinds


class TestFencing:
    async def test_partitioned_node_does_not_answer_for_lost_shards(self, harness: Harness) -> None:
        """A node cut off from NATS stops handling at once; after it reconnects it serves
        only the shards it holds again, never overlapping with the new owner."""
        await harness.start("a")
        server_host, server_port = "127.0.0.1", int(harness.url.rsplit(":", 1)[1])
        async with TcpProxy(server_host, server_port) as proxy:
            await harness.start("b", url=proxy.url)
            await harness.settled("a", {"a", "b"})
            b = harness.nodes["b"]
            lost = set(b.shards)
            client = Client(
                await harness.connect("client"),
                num_shards=NUM_SHARDS,
                retry=RetryPolicy(),
                timeout=8,
            )
            await proxy.cut()
            await eventually(lambda: b.fenced)
            kv_a = harness.kv("a")
            async with asyncio.timeout(15):
                while set(harness.nodes["a"].shards) != set(range(NUM_SHARDS)):
                    await kv_a._changed()
            # Every shard is answered by a while b is cut off.
            for shard in sorted(lost):
                assert await client.request_shard(shard, "x") == b"a"
            cut_over = time.monotonic()
            await proxy.heal()
            await harness.settled("a", {"a", "b"})
            assert not b.fenced
            for shard in range(NUM_SHARDS):
                await client.request_shard(shard, "x")
            late_b = [c for c in harness.record.calls if c[1] == "b" and c[2] >= cut_over]
            assert all(shard in b.shards for shard, *_ in late_b)
            assert_single_owner(harness.record.calls)
            await harness.nodes.pop("b").stop()

    async def test_stalled_node_fences_itself_when_its_lease_runs_out(
        self, harness: Harness
    ) -> None:
        """A node whose connection stays open but moves nothing (a black hole: no
        disconnect to notice) stops handling when its lease runs out; the
        requests that reached it through the stall, delivered after the new owner
        took over, are refused, never handled."""
        handled: list[tuple[str, str | None]] = []

        def recording(node_id: str) -> Callable[[Envelope], Awaitable[bytes]]:
            async def handle(env: Envelope) -> bytes:
                handled.append((node_id, env.id))
                return node_id.encode()

            return handle

        async def start(node_id: str, url: str) -> Node:
            node = Node(
                await harness.connect(node_id, url),
                recording(node_id),
                node_id=node_id,
                num_shards=NUM_SHARDS,
                membership=KvMembership(settings=FAST),
            )
            await node.start()
            harness.nodes[node_id] = node
            return node

        await start("a", harness.url)
        server_host, server_port = "127.0.0.1", int(harness.url.rsplit(":", 1)[1])
        async with TcpProxy(server_host, server_port) as proxy:
            b = await start("b", proxy.url)
            await harness.settled("a", {"a", "b"})
            lost = sorted(b.shards)
            client = Client(
                await harness.connect("client"),
                num_shards=NUM_SHARDS,
                retry=RetryPolicy(attempt_timeout=0.3),
                timeout=15,
            )
            proxy.stall()
            await eventually(lambda: b.fenced, timeout=FAST.heartbeat_ttl + 1)
            assert b.transport.nc.is_connected  # type: ignore[attr-defined]
            kv_a = harness.kv("a")
            async with asyncio.timeout(15):
                while set(harness.nodes["a"].shards) != set(range(NUM_SHARDS)):
                    await kv_a._changed()
            # Meanwhile the server still routes part of these to b (its
            # subscriptions look alive): they wait in the stall.
            sent = [f"stalled-{s}" for s in lost]
            answers = await asyncio.gather(
                *(
                    client.request_shard(s, "x", request_id=i)
                    for s, i in zip(lost, sent, strict=True)
                )
            )
            assert answers == [b"a"] * len(lost)
            proxy.resume()
            await harness.settled("a", {"a", "b"}, timeout=20)
            assert [i for node, i in handled if node == "b" and i in sent] == []
            await harness.nodes.pop("b").stop()

    async def test_reconnected_node_handles_only_after_rechecking_its_keys(
        self, harness: Harness, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """After a short cut (its lease still running) a reconnected node stays
        fenced until it has re-read its shard keys: nats-py resubscribes by
        itself, and the node must not answer before it knows the shards are
        still its own."""
        server_host, server_port = "127.0.0.1", int(harness.url.rsplit(":", 1)[1])
        async with TcpProxy(server_host, server_port) as proxy:
            b = await harness.start("b", url=proxy.url)
            kv_b = harness.kv("b")
            client = Client(await harness.connect("client"), num_shards=NUM_SHARDS, timeout=5)
            assert await client.request_shard(0, "x") == b"b"
            checking, gate = asyncio.Event(), asyncio.Event()
            read_key = kv_b._shards().kv.get

            async def held_get(key: str) -> object:
                checking.set()
                await gate.wait()
                return await read_key(key)

            monkeypatch.setattr(kv_b._shards().kv, "get", held_get)
            await proxy.cut()
            await eventually(lambda: b.fenced)
            await proxy.heal()
            await checking.wait()  # reconnected, re-check under way
            assert b.transport.nc.is_connected  # type: ignore[attr-defined]
            assert kv_b._lease_until is not None
            assert kv_b._lease_until > asyncio.get_running_loop().time()  # not the lease
            with pytest.raises(NotOwnerError):
                await client.request_shard(0, "x")
            gate.set()
            await eventually(lambda: not b.fenced)
            assert await client.request_shard(0, "x") == b"b"
            await harness.nodes.pop("b").stop()

    async def test_fenced_node_refuses_with_not_owner(self) -> None:
        """A fenced node answers not_owner (retryable) instead of running the handler."""
        record = Record()
        async with NatsServer() as server:
            transport = await NatsTransport.connect(server.url)
            node = Node(transport, record.handler("a"), num_shards=4)
            await node.start()
            client = Client(transport, num_shards=4)
            try:
                node.fence("test")
                with pytest.raises(NotOwnerError, match="test"):
                    await client.request_shard(0, "x")
                node.unfence()
                assert await client.request_shard(0, "x") == b"a"
                assert len(record.calls) == 1
            finally:
                await node.stop()
                await transport.close()

    async def test_expired_lease_fences_the_node(self) -> None:
        """Past its lease a node refuses work; a renewed lease lets it serve again."""
        record = Record()
        transport = MemoryTransport()
        node = Node(transport, record.handler("a"), num_shards=4)
        await node.start()
        client = Client(transport.connect("client"), num_shards=4)
        try:
            loop = asyncio.get_running_loop()
            node.set_lease(loop.time() - 1)
            assert node.fenced
            with pytest.raises(NotOwnerError, match="lease"):
                await client.request_shard(1, "x")
            node.set_lease(loop.time() + 60)
            assert await client.request_shard(1, "x") == b"a"
        finally:
            await node.stop()


class TestStatic:
    def test_static_membership_refuses_a_stranger(self) -> None:
        """A node whose id is not in the static list is refused at construction."""
        with pytest.raises(ConfigurationError, match="not in the node list"):
            Node(
                MemoryTransport(),
                Record().handler("x"),
                node_id="z",
                nodes=["a", "b"],
                num_shards=4,
            )

    async def test_static_cluster_state(self) -> None:
        """A static membership's cluster view places every shard by HRW over the list."""
        transport = MemoryTransport()
        membership = StaticMembership(["a", "b"])
        node = Node(
            transport, Record().handler("a"), node_id="a", num_shards=8, membership=membership
        )
        async with node:
            state = membership.cluster_state()
            assert set(state.members) == {"a", "b"}
            assert len(state.owners) == 8
            assert state.shards_of("a") == node.shards


class TestNatsCluster:
    async def test_membership_survives_losing_a_server(self) -> None:
        """On a 3-server JetStream cluster (replicated buckets), killing the server a
        node is connected to moves the node to another server; it re-checks its keys
        and the cluster ends balanced again."""
        settings = KvSettings(
            heartbeat_interval=0.5, heartbeat_ttl=3.0, reconcile_interval=0.25, replicas=3
        )
        async with NatsCluster(size=3) as cluster:
            record = Record()
            nodes: list[Node] = []
            transports: list[NatsTransport] = []
            try:
                for i, node_id in enumerate(("a", "b")):
                    # Each node prefers a different server, and knows all of them.
                    urls = cluster.urls[i:] + cluster.urls[:i]
                    transport = await NatsTransport.connect(
                        urls, NatsOptions(name=node_id, reconnect_time_wait=0.1)
                    )
                    transports.append(transport)
                    node = Node(
                        transport,
                        record.handler(node_id),
                        node_id=node_id,
                        num_shards=NUM_SHARDS,
                        membership=KvMembership(settings=settings),
                    )
                    await node.start()
                    nodes.append(node)
                kv_a = nodes[0].membership
                assert isinstance(kv_a, KvMembership)
                await kv_a.wait_balanced(30)
                served_by = transports[1].nc.connected_url
                assert served_by is not None
                victim = next(i for i, s in enumerate(cluster.servers) if s.port == served_by.port)
                await asyncio.to_thread(cluster.kill, victim)
                await eventually(
                    lambda: (
                        transports[1].nc.is_connected
                        and transports[1].nc.connected_url is not None
                        and transports[1].nc.connected_url.port != served_by.port
                    ),
                    timeout=30,
                )
                async with asyncio.timeout(30):
                    while True:
                        state = kv_a.cluster_state()
                        shards = sorted(nodes[0].shards + nodes[1].shards)
                        if state.balanced and shards == list(range(NUM_SHARDS)):
                            break
                        await kv_a._changed()
                await eventually(lambda: not nodes[1].fenced, timeout=30)
                client = Client(transports[0], num_shards=NUM_SHARDS, retry=RetryPolicy())
                for shard in nodes[1].shards:
                    assert await client.request_shard(shard, "x") == b"b"
                assert_single_owner(record.calls)
            finally:
                for node in nodes:
                    await node.stop()
                for transport in transports:
                    await transport.close()
