"""Slow consumers: a node that falls behind is reported, recovers, and no caller
is left waiting in silence.

Two ways to fall behind. The node's own queue is full (``max_pending``): it
answers ``overloaded`` at once (retryable) and counts it. Or nats-py's buffer
for a subscription overflows before the node even sees the messages: nats-py
drops them and reports a slow consumer, which the transport logs and counts
(``slow_consumer``); the callers of dropped requests get a timeout at their
deadline.
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
    RequestTimeoutError,
    Transport,
)
from clstr.client import RetryPolicy
from clstr.testing import NatsServer
from clstr.transports.nats import NatsOptions, NatsTransport

Connect = Callable[[str], Awaitable[Transport]]

BURST = 500
DEADLINE = 1.0


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
    """nats-py drops what a subscription cannot buffer: reported, counted, recovered."""

    async def test_dropped_messages_are_reported_and_callers_time_out(
        self, clstr_nats_server: NatsServer
    ) -> None:
        """A burst beyond the subscription's buffer: drops are logged and counted, their
        callers get a timeout by their deadline, and the node serves normally after."""
        registry = CollectorRegistry()
        metrics = PrometheusMetrics(registry)
        with structlog.testing.capture_logs() as logs:
            node_transport = await NatsTransport.connect(
                clstr_nats_server.url,
                NatsOptions(name="node", sub_pending_msgs=10),
                metrics=metrics,
            )
            client_transport = await NatsTransport.connect(
                clstr_nats_server.url, NatsOptions(name="client")
            )
            try:
                async with Node(node_transport, instant, node_id="n", num_shards=1):
                    client = Client(client_transport, num_shards=1)
                    outcomes, took = await burst(client, BURST, timeout=DEADLINE)
                    # Never silence: each call ended, by its deadline at the latest.
                    assert sum(outcomes.values()) == BURST
                    assert set(outcomes) <= {"ok", RequestTimeoutError.__name__}
                    assert took < DEADLINE + 0.5
                    dropped = outcomes[RequestTimeoutError.__name__]
                    assert dropped > 0
                    assert node_transport.slow_consumer_drops == dropped
                    assert (
                        counter(
                            registry,
                            "clstr_cluster_transport_errors_total",
                            {"error_type": "slow_consumer"},
                        )
                        == dropped
                    )
                    # Recovery: at a pace the node keeps up with, nothing is dropped.
                    for i in range(50):
                        assert await client.request_shard(0, "t", key=f"after{i}") == b"ok"
                    assert node_transport.slow_consumer_drops == dropped
            finally:
                await client_transport.close()
                await node_transport.close()
        warnings = [e for e in logs if e["event"].startswith("slow consumer")]
        assert warnings, "the slow consumer was not logged"
        assert warnings[0]["log_level"] == "warning"
        assert warnings[0]["subject"] == "clstr.shard.0"
        # Logging is rate-limited: one line per second, not one per dropped message.
        assert len(warnings) <= 3
