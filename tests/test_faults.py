"""Fault injection on the memory transport, and virtual time, from the testing kit.

These are the tools users get to put their own handlers through lost,
late, repeated and partitioned messages in one process, deterministically:
``network.faults`` and ``clstr.testing.virtual_time`` / ``clstr.testing.run``.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from clstr import (
    Client,
    ConfigurationError,
    Envelope,
    EnvelopeExpiredError,
    HandlerTimeoutError,
    MemoryNetwork,
    Node,
    NoShardOwnerError,
    RequestTimeoutError,
)
from clstr.hashing import owner_of
from clstr.testing import VirtualClock, current_clock, run, virtual_time
from clstr.transports.memory import subject_matches

NUM_SHARDS = 8
NODES = ["node-0", "node-1"]


@dataclass
class Tally:
    """A per-key counter handler that records every time it applied an effect."""

    counts: Counter[str] = field(default_factory=Counter)
    calls: int = 0
    sleep: float = 0.0
    entered: asyncio.Event = field(default_factory=asyncio.Event)

    async def __call__(self, env: Envelope) -> bytes:
        self.calls += 1
        self.entered.set()
        if self.sleep:
            await asyncio.sleep(self.sleep)
        key = env.key or ""
        self.counts[key] += 1
        return str(self.counts[key]).encode()


@asynccontextmanager
async def cluster(
    network: MemoryNetwork, handler: Tally, *, timeout: float = 1.0
) -> AsyncIterator[Client]:
    """Two nodes (static membership) and a client on ``network``, all stopped after."""
    nodes = [
        Node(network.connect(n), handler, node_id=n, nodes=NODES, num_shards=NUM_SHARDS)
        for n in NODES
    ]
    client = Client(network.connect("client"), num_shards=NUM_SHARDS, timeout=timeout)
    for node in nodes:
        await node.start()
    try:
        yield client
    finally:
        await client.close()
        for node in nodes:
            await node.stop()
            await node.transport.close()
        await client.transport.close()


def key_owned_by(node_id: str, client: Client) -> str:
    """A key whose shard ``node_id`` owns."""
    for i in range(1000):
        key = f"k{i}"
        if owner_of(client.shard_for(key), NODES, "") == node_id:
            return key
    raise AssertionError(f"no key for {node_id}")


class TestSubjectMatching:
    """Fault rules select subjects with NATS wildcards."""

    @pytest.mark.parametrize(
        ("pattern", "subject", "expected"),
        [
            ("clstr.shard.1", "clstr.shard.1", True),
            ("clstr.shard.*", "clstr.shard.1", True),
            ("clstr.*", "clstr.shard.1", False),
            ("clstr.>", "clstr.shard.1", True),
            ("clstr.>", "clstr", False),
            ("_INBOX.>", "_INBOX.client.3", True),
            ("clstr.shard.2", "clstr.shard.1", False),
        ],
    )
    def test_wildcards(self, pattern: str, subject: str, expected: bool) -> None:
        """``*`` matches one token and a final ``>`` the rest, as in NATS."""
        assert subject_matches(pattern, subject) is expected


class TestVirtualTime:
    """Deadlines and TTLs run on the loop's clock, so virtual time makes them instant."""

    async def test_thirty_second_ttl_expires_instantly(self) -> None:
        """A handler that outlives a 30 s deadline is reported as a timeout, in no real time."""
        started = time.monotonic()
        async with virtual_time() as clock:
            begin = clock.time()
            handler = Tally(sleep=3600)
            async with cluster(MemoryNetwork(), handler, timeout=30) as client:
                with pytest.raises(HandlerTimeoutError):
                    await client.request_key("a", "inc")
                assert 29 < clock.time() - begin < 31
        assert time.monotonic() - started < 2
        assert handler.counts["a"] == 0

    async def test_queued_envelope_expires_before_its_handler(self) -> None:
        """A message queued behind a slow one for the same key is answered expired at its
        deadline (before the caller's own timeout) and never runs."""
        async with virtual_time() as clock:
            handler = Tally(sleep=20)
            async with cluster(MemoryNetwork(), handler, timeout=60) as client:
                first = asyncio.create_task(client.request_key("a", "inc"))
                await handler.entered.wait()
                sent = clock.time()
                with pytest.raises(EnvelopeExpiredError):
                    await client.request_key("a", "inc", timeout=10)
                assert clock.time() - sent < 10
                assert await first == b"1"
                assert handler.calls == 1
                assert handler.counts["a"] == 1

    async def test_clock_advances_only_when_all_tasks_wait(self) -> None:
        """Virtual time stands still while work is ready, then jumps to the next timer."""
        async with virtual_time() as clock:
            t0 = clock.time()
            for _ in range(100):
                await asyncio.sleep(0)
            assert clock.time() == t0
            await asyncio.sleep(5)
            assert clock.time() == pytest.approx(t0 + 5)
            assert current_clock() is clock

    async def test_manual_clock_moves_only_on_advance(self) -> None:
        """With autojump off, a timer fires only once the test advances the clock."""
        async with virtual_time(autojump=False) as clock:
            fired = asyncio.Event()
            asyncio.get_running_loop().call_later(10, fired.set)
            for _ in range(20):
                await asyncio.sleep(0)
            assert not fired.is_set()
            clock.advance(10)
            await asyncio.wait_for(fired.wait(), timeout=20)

    def test_runner_runs_a_whole_program_on_virtual_time(self) -> None:
        """``clstr.testing.run`` is ``asyncio.run`` on a virtual clock."""

        async def main() -> float:
            await asyncio.sleep(86_400)
            return asyncio.get_running_loop().time()

        started = time.monotonic()
        assert run(main(), clock=VirtualClock(start=100)) == pytest.approx(86_500)
        assert time.monotonic() - started < 1

    def test_clock_never_goes_back(self) -> None:
        """Advancing by a negative amount is refused."""
        with pytest.raises(ConfigurationError):
            VirtualClock().advance(-1)


class TestDrop:
    """Dropped requests and replies turn into timeouts, and request ids make retries safe."""

    async def test_dropped_request_times_out_and_applies_nothing(self) -> None:
        """A request lost on its way leaves the handler untouched; the next one goes through."""
        network = MemoryNetwork()
        handler = Tally()
        async with virtual_time(), cluster(network, handler) as client:
            key = key_owned_by("node-0", client)
            rule = network.faults.drop(src="client", dst="node-0", count=1)
            with pytest.raises(RequestTimeoutError):
                await client.request_key(key, "inc")
            assert rule.matched == 1
            assert rule.exhausted
            assert await client.request_key(key, "inc") == b"1"
            assert handler.calls == 1

    async def test_lost_reply_retried_with_its_id_applies_once(self) -> None:
        """A reply lost after the effect applied: a retry with the same id gets the first reply."""
        network = MemoryNetwork()
        handler = Tally()
        async with virtual_time(), cluster(network, handler) as client:
            key = key_owned_by("node-1", client)
            network.faults.drop(src="node-1", dst="client", count=1)
            with pytest.raises(RequestTimeoutError):
                await client.request_key(key, "inc", request_id="req-1")
            assert handler.counts[key] == 1
            assert await client.request_key(key, "inc", request_id="req-1") == b"1"
            assert handler.counts[key] == 1
            assert network.faults.dropped == 1

    async def test_probabilistic_drops_are_deterministic_for_a_seed(self) -> None:
        """The same seed drops the same messages, run after run."""

        async def outcomes(seed: int) -> list[bool]:
            network = MemoryNetwork(seed=seed)
            network.faults.drop(subject="clstr.shard.*", probability=0.5)
            results = []
            async with cluster(network, Tally(), timeout=0.5) as client:
                for i in range(20):
                    try:
                        await client.request_key(f"k{i}", "inc")
                        results.append(True)
                    except RequestTimeoutError:
                        results.append(False)
            return results

        async with virtual_time():
            first, second = await outcomes(7), await outcomes(7)
        assert first == second
        assert 0 < sum(first) < 20


class TestDelay:
    """Delayed messages arrive late on the loop's clock."""

    async def test_late_reply_beyond_the_deadline_is_a_timeout(self) -> None:
        """A reply delayed past the caller's deadline is reported as a timeout, never silence."""
        network = MemoryNetwork()
        handler = Tally()
        async with virtual_time() as clock, cluster(network, handler) as client:
            network.faults.delay(2.0, dst="client")
            with pytest.raises(RequestTimeoutError):
                await client.request_key("a", "inc", timeout=1.0)
            t0 = clock.time()
            assert await client.request_key("a", "inc", timeout=5.0) == b"2"
            assert clock.time() - t0 == pytest.approx(2.0, abs=1e-3)

    async def test_jitter_reorders_messages(self) -> None:
        """With jitter, notifications for different keys may arrive in another order."""
        network = MemoryNetwork(seed=3)
        seen: list[str] = []

        async def record(env: Envelope) -> bytes:
            seen.append(env.key or "")
            return b""

        async with virtual_time():
            node = Node(network.connect("node"), record, node_id="node", num_shards=1)
            client = Client(network.connect("client"), num_shards=1)
            await node.start()
            network.faults.delay(0.1, jitter=1.0, subject="clstr.shard.0")
            sent = [f"k{i}" for i in range(20)]
            for key in sent:
                await client.notify_key(key, "note")
            await asyncio.sleep(2)
            await node.stop()
            await client.close()
        assert sorted(seen) == sorted(sent)
        assert seen != sent

    def test_negative_delay_is_refused(self) -> None:
        """A delay rule needs a non-negative delay."""
        with pytest.raises(ConfigurationError):
            MemoryNetwork().faults.delay(-1)


class TestDuplicate:
    """Duplicated deliveries reach the handler twice unless the request carries an id."""

    async def test_duplicate_without_id_applies_twice(self) -> None:
        """A redelivered notification runs its handler again: handlers must expect it."""
        network = MemoryNetwork()
        handler = Tally()
        async with cluster(network, handler) as client:
            network.faults.duplicate(subject="clstr.shard.>", count=1)
            await client.notify_key("a", "inc")
            await client.request_key("a", "inc")  # FIFO per key: the notes ran before
            assert handler.counts["a"] == 3
            assert network.faults.duplicated == 1

    async def test_duplicate_with_id_applies_once(self) -> None:
        """A redelivered request with an id runs once; the copy gets the same reply."""
        network = MemoryNetwork()
        handler = Tally()
        async with cluster(network, handler) as client:
            network.faults.duplicate(copies=3, subject="clstr.shard.>")
            assert await client.request_key("a", "inc", request_id="r1") == b"1"
            assert await client.request_key("a", "inc", request_id="r2") == b"2"
            assert handler.calls == 2


class TestPartition:
    """A partition hides the subscribers on the other side."""

    async def test_partitioned_owner_is_reported_at_once_and_heals(self) -> None:
        """Keys of a node cut off from the client fail fast as no-owner; others still work."""
        network = MemoryNetwork()
        async with virtual_time() as clock, cluster(network, Tally(), timeout=30) as client:
            cut = key_owned_by("node-0", client)
            fine = key_owned_by("node-1", client)
            partition = network.faults.partition(["node-0"], ["client"])
            t0 = clock.time()
            with pytest.raises(NoShardOwnerError):
                await client.request_key(cut, "inc")
            assert clock.time() == t0  # at once, not after the 30 s deadline
            assert await client.request_key(fine, "inc") == b"1"
            partition.heal()
            assert await client.request_key(cut, "inc") == b"1"

    async def test_queue_group_routes_around_a_partitioned_member(self) -> None:
        """When two nodes serve a shard, a partition sends every message to the reachable one."""
        network = MemoryNetwork()
        by_node: Counter[str] = Counter()

        def handler_for(name: str) -> Tally:
            class Named(Tally):
                async def __call__(self, env: Envelope) -> bytes:
                    by_node[name] += 1
                    return b""

            return Named()

        nodes = [
            Node(network.connect(n), handler_for(n), node_id=n, shards=[0], num_shards=1)
            for n in NODES
        ]
        client = Client(network.connect("client"), num_shards=1)
        for node in nodes:
            await node.start()
        try:
            network.faults.isolate("node-0", others=["client", "node-1"])
            for i in range(10):
                await client.request_shard(0, "inc", key=f"k{i}")
            assert by_node == {"node-1": 10}
            network.faults.heal()
            for i in range(10):
                await client.request_shard(0, "inc", key=f"k{i}")
            assert by_node["node-0"] > 0
        finally:
            for node in nodes:
                await node.stop()
            await client.close()

    def test_overlapping_groups_are_refused(self) -> None:
        """A name cannot sit on both sides of a partition."""
        with pytest.raises(ConfigurationError):
            MemoryNetwork().faults.partition(["a", "b"], ["b"])

    async def test_clear_removes_every_fault(self) -> None:
        """``clear`` lifts rules and partitions at once."""
        network = MemoryNetwork()
        async with cluster(network, Tally()) as client:
            network.faults.drop()
            network.faults.partition(["node-0", "node-1"], ["client"])
            assert network.faults.active
            network.faults.clear()
            assert not network.faults.active
            assert await client.request_key("a", "inc") == b"1"


RELIABILITY_DOC = Path(__file__).resolve().parent.parent / "docs" / "reliability.md"
EXAMPLE_SECTION = "## Testing your handlers against faults"


def documented_example(doc: Path = RELIABILITY_DOC) -> tuple[str, int]:
    """The first Python block of the fault-injection section of docs/reliability.md,
    and the line it starts on."""
    text = doc.read_text(encoding="utf-8")
    start = text.index(EXAMPLE_SECTION)
    match = re.compile(r"^```python\n(.*?)^```", re.M | re.S).search(text, start)
    assert match is not None, f"no Python block under {EXAMPLE_SECTION!r} in {doc.name}"
    return match[1], text.count("\n", 0, match.start(1)) + 1


class TestDocumentedExample:
    """The fault-injection example of docs/reliability.md runs and holds."""

    async def test_reliability_doc_example_runs(self) -> None:
        """The page's test, run as written with a per-key counter as its handler:
        it passes, and the handler ran once for the two attempts."""
        source, line = documented_example()
        namespace: dict[str, object] = {"__name__": "reliability_md_example"}
        # Padded so that a traceback points at the page's own line numbers.
        exec(compile("\n" * (line - 1) + source, str(RELIABILITY_DOC), "exec"), namespace)
        tests = [f for name, f in namespace.items() if name.startswith("test_") and callable(f)]
        assert len(tests) == 1, f"expected one test function in the example, got {len(tests)}"
        handler = Tally()
        await tests[0](handler)
        assert handler.calls == 1
        assert handler.counts == {"k": 1}
