"""Slow consumers: a node that falls behind is reported, recovers, and no caller
is left waiting in silence.

When the node's own queue is full (``max_pending``) it answers
``overloaded`` at once (retryable) and counts it. Over NATS, messages go
from the connection's read loop straight to that queue: nothing is dropped
before the node sees it. What nats-py still buffers per subscription (one
made with nats-py on the transport's connection) and drops is reported as a
slow consumer: logged and counted (``slow_consumer``).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable

import structlog
from prometheus_client import CollectorRegistry

from clstr import (
    Client,
    Envelope,
    Node,
    PrometheusMetrics,
    Transport,
)
from clstr.client import RetryPolicy
from clstr.testing import NatsServer
from clstr.transports.nats import NatsTransport

from _support import eventually

Connect = Callable[[str], Awaitable[Transport]]

BURST = 500


async def instant(env: Envelope) -> bytes:
    """Answers at once."""
    return b"ok"


async def slow(env: Envelope) -> bytes:
    """Takes a while: with one worker, a burst piles up in the node's queue."""
    await asyncio.sleep(0.005)
    return b"ok"


def outcome(result: object) -> str:
    return "ok" if result == b"ok" else type(result).__name__


async def burst(client: Client, count: int, timeout: float) -> tuple[Counter[str], float]:
    """``count`` concurrent requests; what they ended with and the longest one took."""
    started = time.monotonic()
    results = await asyncio.gather(
        *(client.request_shard(0, "t", key=f"k{i}", timeout=timeout) for i in range(count)),
        return_exceptions=True,
    )
    return Counter(outcome(r) for r in results), time.monotonic() - started


def counter(registry: CollectorRegistry, name: str, labels: dict[str, str]) -> float:
    return registry.get_sample_value(name, labels) or 0.0


class TestNodeQueueFull:
    """Past max_pending the node answers overloaded at once, on both transports."""

    async def test_burst_gets_overloaded_not_silence(self, connect: Connect) -> None:
        """Every request of a burst ends in a reply or OverloadedError, never a timeout."""
        registry = CollectorRegistry()
        node = Node(
            await connect("node"),
            slow,
            node_id="node",
            num_shards=1,
            max_concurrency=1,
            max_pending=20,
            metrics=PrometheusMetrics(registry),
        )
        client = Client(await connect("client"), num_shards=1)
        async with node:
            outcomes, took = await burst(client, 200, timeout=5.0)
            assert set(outcomes) == {"ok", "OverloadedError"}
            assert outcomes["OverloadedError"] > 0
            assert took < 5.0
            assert (
                counter(
                    registry,
                    "clstr_cluster_envelopes_rejected_total",
                    {"reason": "overloaded"},
                )
                == outcomes["OverloadedError"]
            )
            # It recovers: once the queue drained, everything is served again.
            outcomes, _ = await burst(client, 20, timeout=5.0)
            assert outcomes == {"ok": 20}

    async def test_retry_policy_rides_out_the_overload(self, connect: Connect) -> None:
        """With a retry policy, overloaded requests are resent and all succeed."""
        node = Node(
            await connect("node"),
            slow,
            node_id="node",
            num_shards=1,
            max_concurrency=1,
            max_pending=20,
        )
        client = Client(
            await connect("client"),
            num_shards=1,
            retry=RetryPolicy(initial_backoff=0.01, max_backoff=0.2),
        )
        async with node:
            outcomes, _ = await burst(client, 100, timeout=10.0)
            assert outcomes == {"ok": 100}
            assert node.stats.rejected.get("overloaded", 0) > 0


class TestNatsSlowConsumer:
    """Shard subscriptions have no buffer of their own in front of the node (messages
    go straight from the read loop to its queue), so a burst meets the node's limit
    and its callers hear overloaded; what nats-py still buffers and drops (a
    subscription made with nats-py on the transport's connection) is reported."""

    async def test_no_message_is_dropped_before_the_node_sees_it(
        self, clstr_nats_server: NatsServer
    ) -> None:
        """A burst far beyond the node's queue over NATS: every caller gets a reply or
        overloaded at once, none a timeout, and nats-py reports no slow consumer."""
        node_transport = await NatsTransport.connect(clstr_nats_server.url)
        client_transport = await NatsTransport.connect(clstr_nats_server.url)
        node = Node(
            node_transport, slow, node_id="n", num_shards=1, max_concurrency=1, max_pending=10
        )
        try:
            async with node:
                client = Client(client_transport, num_shards=1)
                outcomes, _ = await burst(client, BURST, timeout=10.0)
                assert set(outcomes) == {"ok", "OverloadedError"}
                assert node.stats.rejected["overloaded"] == outcomes["OverloadedError"]
                assert node_transport.slow_consumer_drops == 0
        finally:
            await client_transport.close()
            await node_transport.close()

    async def test_nats_py_drops_are_logged_and_counted(
        self, clstr_nats_server: NatsServer
    ) -> None:
        """Drops nats-py reports for a subscription that fell behind are logged (rate
        limited) and counted in the transport_errors metric."""
        registry = CollectorRegistry()
        metrics = PrometheusMetrics(registry)
        transport = await NatsTransport.connect(clstr_nats_server.url, metrics=metrics)
        release = asyncio.Event()

        async def stuck(msg: object) -> None:
            await release.wait()

        with structlog.testing.capture_logs() as logs:
            try:
                sub = await transport.nc.subscribe("user.events", cb=stuck, pending_msgs_limit=10)
                for i in range(BURST):
                    transport.publish_nowait("user.events", b"%d" % i)
                await transport.nc.flush()
                await eventually(lambda: transport.slow_consumer_drops > 0)
                dropped = transport.slow_consumer_drops
                assert (
                    counter(
                        registry,
                        "clstr_cluster_transport_errors_total",
                        {"error_type": "slow_consumer"},
                    )
                    == dropped
                )
                release.set()
                await sub.unsubscribe()
            finally:
                await transport.close()
        warnings = [e for e in logs if e["event"].startswith("slow consumer")]
        assert warnings, "the slow consumer was not logged"
        assert warnings[0]["log_level"] == "warning"
        assert warnings[0]["subject"] == "user.events"
        # Logging is rate-limited: one line per second, not one per dropped message.
        assert len(warnings) <= 3
