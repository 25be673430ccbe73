"""Slow consumers: a node that falls behind is reported, recovers, and no caller
is left waiting in silence.

When the node's own queue is full (``max_pending``) it answers
``overloaded`` at once (retryable) and counts it. Over NATS, messages go
from the connection's read loop straight to that queue: nothing is dropped
before the node sees it. What nats-py still buffers per subscription (one
made with nats-py on the transport's connection) and drops is reported as a
slow consumer: logged and counted (``slow_consumer``).

When a node stops reading its socket altogether (here: its process is
stopped with SIGSTOP), the nats-server itself cuts it off as a slow consumer
once its buffer for the node passes ``max_pending`` or a write to it blocks
past ``write_deadline``; the node reconnects when it runs again, logs both,
and serves again. Its callers meanwhile hear back by their deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest
import pytest_asyncio
import structlog
from prometheus_client import CollectorRegistry

from clstr import (
    Client,
    Envelope,
    Node,
    NoShardOwnerError,
    PrometheusMetrics,
    RequestTimeoutError,
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


# -- the server cuts a node off -------------------------------------------------

# The server's buffer per connection, and how long a write to one may block,
# before it calls the connection a slow consumer and closes it (defaults: 64 MiB
# and 10 s). max_payload may not exceed max_pending.
SLOW_SERVER_CONFIG = 'max_pending: 262144\nwrite_deadline: "250ms"\n'
SLOW_MAX_PAYLOAD = 65536
FLOOD_PAYLOAD = b"x" * 8192
FLOOD_BATCH = 500  # notifications (4 MiB) between looks at the server's counter
FLOOD_MAX_BATCHES = 40
STALL_CALLERS = 20
CALL_TIMEOUT = 1.0
# How far past its deadline a caller may hear back (scheduling on a busy host).
LATE = 0.25


def server_vars(server: NatsServer) -> dict[str, object]:
    """The server's /varz (monitoring)."""
    with urllib.request.urlopen(server.monitor_url + "/varz", timeout=2) as response:
        varz: dict[str, object] = json.load(response)
    return varz


def log_events(path: Path) -> list[dict[str, object]]:
    """The JSON log lines a ``clstr node --log-json`` process wrote so far."""
    events = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            events.append(json.loads(line))
    return events


def logged(path: Path, event: str) -> list[dict[str, object]]:
    return [e for e in log_events(path) if e.get("event") == event]


@pytest.fixture
def slow_server() -> Iterator[NatsServer]:
    """A nats-server that cuts off slow consumers fast (see SLOW_SERVER_CONFIG)."""
    with NatsServer(
        config=SLOW_SERVER_CONFIG, max_payload=SLOW_MAX_PAYLOAD, jetstream=False, monitor=True
    ) as server:
        yield server


@pytest_asyncio.fixture
async def node_process(
    slow_server: NatsServer, tmp_path: Path
) -> AsyncIterator[tuple[asyncio.subprocess.Process, Path]]:
    """``clstr node`` (the demo app, every shard) in its own process, JSON logs to a file."""
    log = tmp_path / "node.log"
    with log.open("wb") as sink:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "clstr",
            "node",
            f"--nats-url={slow_server.url}",
            "--shards=4",
            "--id=slow-node",
            "--app=clstr.demo_app:app",
            "--log-json",
            "--no-discovery",
            "--watch-stdin",
            stdin=asyncio.subprocess.PIPE,
            stdout=sink,
            stderr=asyncio.subprocess.STDOUT,
        )
    try:
        await eventually(lambda: bool(logged(log, "node ready")), timeout=20)
        yield process, log
    finally:
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGCONT)  # a stopped process cannot exit
                process.kill()
            await process.wait()


async def timed_call(client: Client, key: str) -> tuple[str, float]:
    """One request: how it ended, and how long it took."""
    started = time.monotonic()
    try:
        result = await client.request_key(key, "echo", b"x", timeout=CALL_TIMEOUT)
    except Exception as exc:  # the outcome is what is under test
        return type(exc).__name__, time.monotonic() - started
    took = time.monotonic() - started
    return ("ok" if result == b"x" else f"wrong reply {result!r}"), took


class TestServerCutsSlowConsumer:
    """nats-server disconnects a node that stopped reading; the node reconnects and
    serves again, and its callers meanwhile get timeouts or errors by their deadline."""

    async def test_node_stopped_by_sigstop_is_cut_off_and_recovers(
        self,
        slow_server: NatsServer,
        node_process: tuple[asyncio.subprocess.Process, Path],
    ) -> None:
        """SIGSTOP the node and flood its shards: the server reports a slow consumer
        and closes the node's connection; callers hear back by their deadline (a
        timeout, or no responders once the node is gone). After SIGCONT the node
        logs the disconnect and the reconnect and answers requests again."""
        process, log = node_process
        transport = await NatsTransport.connect(slow_server.url)
        try:
            client = Client(transport, num_shards=4, timeout=CALL_TIMEOUT)
            assert (await timed_call(client, "warm"))[0] == "ok"

            process.send_signal(signal.SIGSTOP)
            stopped_at = time.monotonic()
            callers = [
                asyncio.create_task(timed_call(client, f"caller-{i}")) for i in range(STALL_CALLERS)
            ]
            for batch in range(FLOOD_MAX_BATCHES):
                for i in range(FLOOD_BATCH):
                    await client.notify_key(f"flood-{batch}-{i}", "echo", FLOOD_PAYLOAD)
                await transport.nc.flush()
                if (await asyncio.to_thread(server_vars, slow_server))["slow_consumers"]:
                    break
            else:
                pytest.fail("the server never reported a slow consumer")
            cut_after = time.monotonic() - stopped_at
            flooded = (batch + 1) * FLOOD_BATCH * len(FLOOD_PAYLOAD)
            # Its connection is closed: no one serves the shards, callers know at once.
            after_cut = await timed_call(client, "after-cut")
            stalled = await asyncio.gather(*callers)

            process.send_signal(signal.SIGCONT)
            resumed_at = time.monotonic()
            while (served := await timed_call(client, "back"))[0] != "ok":
                assert served[0] in {"NoShardOwnerError", "RequestTimeoutError"}, served
                assert time.monotonic() - resumed_at < 10, "the node did not serve again"
                await asyncio.sleep(0.01)
            back_after = time.monotonic() - resumed_at
            for i in range(20):
                assert (await timed_call(client, f"k{i}"))[0] == "ok"
        finally:
            await transport.close()

        outcomes = Counter(name for name, _ in stalled)
        print(
            f"\nslow consumer: server cut the stopped node after {cut_after * 1000:.0f} ms "
            f"({flooded / 2**20:.0f} MiB of notifications sent); callers during the stall: "
            f"{dict(outcomes)}, slowest {max(t for _, t in stalled) * 1000:.0f} ms "
            f"(deadline {CALL_TIMEOUT * 1000:.0f} ms); right after the cut: "
            f"{after_cut[0]} in {after_cut[1] * 1000:.1f} ms; serving again "
            f"{back_after * 1000:.0f} ms after SIGCONT"
        )
        assert set(outcomes) <= {RequestTimeoutError.__name__, NoShardOwnerError.__name__}
        assert all(took < CALL_TIMEOUT + LATE for _, took in stalled)
        assert after_cut[0] == NoShardOwnerError.__name__
        assert after_cut[1] < LATE
        assert "Slow Consumer Detected" in slow_server.log
        assert "clstr-node-slow-node" in slow_server.log  # the node's connection, by name

        # The node says what happened, then stops cleanly.
        assert process.stdin is not None
        process.stdin.close()
        assert await asyncio.wait_for(process.wait(), 15) == 0
        events = [e["event"] for e in log_events(log)]
        disconnected = events.index("nats disconnected")
        assert "nats reconnected" in events[disconnected:]
        assert events[-3:] == ["node stopping", "node stopped", "node exit"]
