"""Membership under churn with real node processes: join, graceful stop, SIGKILL.

While a client drives keyed increments (retry policy, deadlines of a few
seconds), nodes join, stop and get killed. Every handler call is recorded by
the node processes; the test then proves that no two nodes ever handled one
shard at overlapping times, that no request was lost, and that every counter
holds exactly the number of successful increments (exactly-once effects
through retries and handoffs).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import pytest_asyncio

from clstr import Client, NoShardOwnerError, RequestError, RetryPolicy
from clstr.hashing import assign_shards
from clstr.testing import NatsServer
from clstr.transports.nats import NatsTransport

from _support import ScriptNode

NODE_SCRIPT = Path(__file__).with_name("_churn_node.py")
NUM_SHARDS = 24
HEARTBEAT_TTL = 1.0  # as in _churn_node.SETTINGS


@dataclass
class Churn:
    url: str
    record: Path
    nodes: dict[str, ScriptNode] = field(default_factory=dict)
    client: Client | None = None

    async def add(self, node_id: str) -> ScriptNode:
        proc = ScriptNode(NODE_SCRIPT, node_id)
        self.nodes[node_id] = proc
        await proc.start(self.url, node_id, str(NUM_SHARDS), str(self.record))
        return proc

    async def owners(self) -> dict[int, str | None]:
        """Who answers node-info for each shard right now."""
        assert self.client is not None

        async def ask(shard: int) -> str | None:
            try:
                return (await self.client.shard(shard).node_info(timeout=1)).node_id  # type: ignore[union-attr]
            except (NoShardOwnerError, RequestError):
                return None

        answers = await asyncio.gather(*(ask(s) for s in range(NUM_SHARDS)))
        return dict(enumerate(answers))

    async def settle(self, members: list[str], timeout: float = 20) -> float:
        """Wait until every shard is answered by its HRW owner among ``members``."""
        want = assign_shards(members, NUM_SHARDS)
        started = time.monotonic()
        async with asyncio.timeout(timeout):
            while await self.owners() != want:  # noqa: ASYNC110 - probing from outside
                await asyncio.sleep(0.02)
        return time.monotonic() - started


@pytest_asyncio.fixture
async def churn(tmp_path: Path) -> AsyncIterator[Churn]:
    async with NatsServer() as server:
        harness = Churn(server.url, tmp_path / "calls.log")
        transport = await NatsTransport.connect(server.url)
        harness.client = Client(
            transport,
            num_shards=NUM_SHARDS,
            retry=RetryPolicy(initial_backoff=0.01, max_backoff=0.2, attempt_timeout=1.0),
            timeout=8,
        )
        try:
            yield harness
        finally:
            for proc in harness.nodes.values():
                await proc.cleanup()
            await transport.close()


def parse_calls(record: Path, killed: dict[str, float]) -> list[tuple[int, str, float, float]]:
    """(shard, node, start, end) per handler call; a call cut by SIGKILL ends at the kill."""
    open_calls: dict[tuple[str, str], tuple[int, float]] = {}
    calls = []
    for line in record.read_text().splitlines():
        kind, shard, node, at, request_id = line.split()
        key = (node, request_id)
        if kind == "S":
            open_calls[key] = (int(shard), float(at))
        elif kind == "E":
            start_shard, start = open_calls.pop(key)
            calls.append((start_shard, node, start, float(at)))
    for (node, _), (shard, start) in open_calls.items():
        assert node in killed, f"call on {node} never ended and {node} was not killed"
        calls.append((shard, node, start, killed[node]))
    return calls


def duplicates_not_from_a_crash(record: Path, killed: dict[str, float]) -> list[str]:
    """Request ids the handler saw again (its own guard caught them: ``D``)
    although their first run was not on a node that was killed.

    Only a crash may bring a request back to a handler: the node died between
    the effect and the reply. Every other retry (lost attempt, shard moved
    gracefully) must be answered by the reply cache or its handoff.
    """
    first_run: dict[str, str] = {}
    found = []
    for line in record.read_text().splitlines():
        kind, _shard, node, _at, request_id = line.split()
        if kind == "S":
            first_run.setdefault(request_id, node)
        elif kind == "D" and first_run[request_id] not in killed:
            found.append(f"{request_id}: first ran on {first_run[request_id]}, again on {node}")
    return found


def overlaps(calls: list[tuple[int, str, float, float]]) -> list[str]:
    by_shard: dict[int, list[tuple[float, float, str]]] = {}
    for shard, node, start, end in calls:
        by_shard.setdefault(shard, []).append((start, end, node))
    found = []
    for shard, runs in by_shard.items():
        runs.sort()
        latest_end: dict[str, float] = {}
        for start, end, node in runs:
            for other, other_end in latest_end.items():
                if other != node and other_end > start:
                    found.append(
                        f"shard {shard}: {other} until {other_end:.4f}, {node} from {start:.4f}"
                    )
            latest_end[node] = max(end, latest_end.get(node, 0.0))
    return found


async def drive(
    client: Client, keys: list[str], stop: asyncio.Event
) -> tuple[dict[str, int], list[str]]:
    """Increment each key in its own loop until ``stop``; return successes and failures."""
    done = dict.fromkeys(keys, 0)
    failures: list[str] = []

    async def one(key: str) -> None:
        while not stop.is_set():
            try:
                await client.request_key(key, "inc")
                done[key] += 1
            except Exception as exc:  # every failure is reported, none is silent
                failures.append(f"{key}: {type(exc).__name__}: {exc}")

    await asyncio.gather(*(one(k) for k in keys))
    return done, failures


async def counters(url: str) -> dict[str, int]:
    transport = await NatsTransport.connect(url)
    try:
        kv = await transport.nc.jetstream().key_value("counters")
        return {k: json.loads((await kv.get(k)).value)["n"] for k in await kv.keys()}
    finally:
        await transport.close()


class TestChurn:
    async def test_single_owner_and_exactly_once_under_churn(self, churn: Churn) -> None:
        """Joins, a graceful stop and a SIGKILL under load: no overlap, no lost request,
        every counter exact."""
        assert churn.client is not None
        await churn.add("a")
        await churn.add("b")
        await churn.settle(["a", "b"])
        stop = asyncio.Event()
        keys = [f"user-{i}" for i in range(48)]
        load = asyncio.create_task(drive(churn.client, keys, stop))

        await churn.add("c")  # join under load
        await churn.settle(["a", "b", "c"])
        await churn.nodes["a"].terminate()  # graceful leave
        await churn.settle(["b", "c"])
        await churn.add("d")
        await churn.settle(["b", "c", "d"])
        await churn.nodes["b"].kill()  # crash
        recovery = await churn.settle(["c", "d"])
        print(f"\nSIGKILL to all shards served again: {recovery:.2f}s (TTL {HEARTBEAT_TTL}s)")

        stop.set()
        done, failures = await load
        killed = {n: p.killed_at for n, p in churn.nodes.items() if p.killed_at is not None}
        calls = parse_calls(churn.record, killed)
        duplicates = churn.record.read_text().count("\nD ")
        print(
            f"requests: {sum(done.values())} succeeded, {len(failures)} failed; "
            f"{len(calls)} handler calls, {duplicates} caught by the handler's own guard"
        )
        assert failures == []
        assert duplicates_not_from_a_crash(churn.record, killed) == []
        assert sum(done.values()) > 100
        assert overlaps(calls) == []
        assert await counters(churn.url) == done
        assert recovery < HEARTBEAT_TTL + 1.0

    @pytest.mark.parametrize("rounds", [3])
    async def test_crash_recovery_time(self, churn: Churn, rounds: int) -> None:
        """After a SIGKILL the survivors serve every shard within the heartbeat TTL
        plus a small bound, round after round."""
        await churn.add("survivor")
        times = []
        for i in range(rounds):
            victim = f"victim-{i}"
            await churn.add(victim)
            await churn.settle(["survivor", victim])
            await churn.nodes[victim].kill()
            times.append(await churn.settle(["survivor"]))
        print(f"\ncrash to served: {', '.join(f'{t:.2f}s' for t in times)}")
        assert max(times) < HEARTBEAT_TTL + 1.0
