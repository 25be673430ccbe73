"""The node's queue bound, what it reports when it falls behind, and its
own request metrics."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest
import structlog
from prometheus_client import CollectorRegistry

from clstr import Client, Envelope, Node, OverloadedError, PrometheusMetrics, Transport

from _support import eventually

Connect = Callable[[str], Awaitable[Transport]]

NUM_SHARDS = 8


class Gate:
    """Holds every handler call until opened; counts the calls that entered."""

    def __init__(self) -> None:
        self.open = asyncio.Event()
        self.entered = 0

    async def __call__(self, env: Envelope) -> bytes:
        self.entered += 1
        await self.open.wait()
        return env.data


class TestQueueBound:
    async def test_one_busy_key_queues_at_most_max_pending(self, connect: Connect) -> None:
        """Idle workers cannot take a busy key's messages, so they leave no extra room:
        with max_pending=10 and 100 idle workers, the 12th message of one busy key
        (1 running + 10 waiting) is refused."""
        gate = Gate()
        node = Node(await connect("node"), gate, node_id="n", num_shards=NUM_SHARDS, max_pending=10)
        client = Client(await connect("client"), num_shards=NUM_SHARDS)
        await node.start()
        try:
            calls = [asyncio.create_task(client.request_key("k", "x", b"0"))]
            await eventually(lambda: gate.entered == 1)
            calls += [
                asyncio.create_task(client.request_key("k", "x", b"%d" % i)) for i in range(1, 11)
            ]
            await eventually(lambda: node.queued == 10)
            with pytest.raises(OverloadedError, match="max_pending=10"):
                await client.request_key("k", "x", b"11")
            assert node.queued == 10
            gate.open.set()
            assert await asyncio.gather(*calls) == [b"%d" % i for i in range(11)]
        finally:
            gate.open.set()
            await node.stop()

    async def test_new_keys_start_at_once_even_with_no_queue(self, connect: Connect) -> None:
        """max_pending=0 refuses waiting, not running: new keys take idle workers."""
        gate = Gate()
        node = Node(
            await connect("node"),
            gate,
            node_id="n",
            num_shards=NUM_SHARDS,
            max_pending=0,
            max_concurrency=4,
        )
        client = Client(await connect("client"), num_shards=NUM_SHARDS)
        await node.start()
        try:
            calls = [
                asyncio.create_task(client.request_key(f"k{i}", "x", b"%d" % i)) for i in range(4)
            ]
            await eventually(lambda: gate.entered == 4)
            with pytest.raises(OverloadedError):
                await client.request_key("k9", "x", b"9")  # no idle worker left
            gate.open.set()
            assert sorted(await asyncio.gather(*calls)) == [b"0", b"1", b"2", b"3"]
        finally:
            gate.open.set()
            await node.stop()


class TestFallingBehind:
    async def test_overload_is_logged_once_and_so_is_the_recovery(self, connect: Connect) -> None:
        """The first refusal logs a warning, later ones do not; draining logs the recovery."""
        gate = Gate()
        node = Node(
            await connect("node"),
            gate,
            node_id="n",
            num_shards=NUM_SHARDS,
            max_pending=2,
            max_concurrency=1,
        )
        client = Client(await connect("client"), num_shards=NUM_SHARDS)
        await node.start()
        try:
            with structlog.testing.capture_logs() as logs:
                calls = [
                    asyncio.create_task(client.request_key("k", "x", b"%d" % i)) for i in range(3)
                ]
                await eventually(lambda: node.queued == 2)
                for _ in range(3):
                    with pytest.raises(OverloadedError):
                        await client.request_key("k", "x", b"late")
                gate.open.set()
                await asyncio.gather(*calls)
            events = [e["event"] for e in logs if e.get("node_id", "n") == "n"]
            behind = [e for e in events if e.startswith("node overloaded")]
            assert len(behind) == 1
            caught_up = [e for e in logs if e["event"] == "node caught up"]
            assert len(caught_up) == 1
            assert caught_up[0]["refused_total"] == 3
            assert events.index(behind[0]) < events.index("node caught up")
        finally:
            gate.open.set()
            await node.stop()


class TestNodeRequestMetrics:
    async def test_node_counts_requests_with_their_queue_wait(self, connect: Connect) -> None:
        """clstr_cluster_node_requests_total moves with each handled message, and the
        node's request duration includes the time it waited behind another."""
        registry = CollectorRegistry()
        gate = Gate()
        node = Node(
            await connect("node"),
            gate,
            node_id="n",
            num_shards=NUM_SHARDS,
            metrics=PrometheusMetrics(registry),
        )
        client = Client(await connect("client"), num_shards=NUM_SHARDS)
        await node.start()
        try:
            first = asyncio.create_task(client.request_key("k", "x", b"1"))
            await eventually(lambda: gate.entered == 1)
            second = asyncio.create_task(client.request_key("k", "x", b"2"))
            await eventually(lambda: node.queued == 1)
            await asyncio.sleep(0.05)  # the wait under measurement, not a synchronisation
            gate.open.set()
            await asyncio.gather(first, second)

            def value(name: str, **labels: str) -> float:
                found = registry.get_sample_value(name, labels)
                return 0.0 if found is None else found

            labels = {"message_type": "x"}
            assert value("clstr_cluster_node_requests_total", **labels, success="true") == 2
            served = value("clstr_cluster_node_request_duration_seconds_sum", **labels)
            handled = value("clstr_cluster_handler_duration_seconds_sum", **labels)
            assert served >= handled + 0.05  # the second one's wait counts, not in the handler
        finally:
            gate.open.set()
            await node.stop()
