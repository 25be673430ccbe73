"""A consumer node process is SIGKILLed while a bus is produced into JetStream: nothing
is lost, and what is handled twice is bounded by the checkpoint interval (measured).

Three node processes (tests/_bus_node.py: KvMembership, a BusConsumer recording every
handled event and every checkpoint) consume bus ``orders``; the test produces, kills
the node that handled most, produces more, and reads the record.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

from _bus_support import assert_invariant

from clstr.eventbus import BatchConfig, BusConfig, Event, EventBus, JetStreamAdapter
from clstr.testing import NatsServer, NodeProcess
from clstr.transports.nats import NatsTransport

NODE_SCRIPT = Path(__file__).with_name("_bus_node.py")
NUM_SHARDS = 16
BUS_SHARDS = 8
CHECKPOINT_INTERVAL = 0.5
# A checkpoint is due INTERVAL after the last; it is written after the batch (or idle
# pause) that finds it due, so the last one before a kill may be this much older.
SLACK = 0.5
TOTAL = 6000


@dataclass(frozen=True)
class Handled:
    node: str
    shard: int
    position: tuple[int, int]
    payload: int
    at: float


def read_record(path: Path) -> tuple[list[Handled], dict[tuple[str, int], list[float]]]:
    """The handled events, and per (node, bus shard) the times of its checkpoints."""
    handled: list[Handled] = []
    checkpoints: dict[tuple[str, int], list[float]] = defaultdict(list)
    if not path.exists():
        return handled, checkpoints
    for line in path.read_text().splitlines():
        parts = line.split()
        if parts[0] == "H" and len(parts) == 7:
            node, shard, frame, offset, payload, at = parts[1:]
            handled.append(
                Handled(node, int(shard), (int(frame), int(offset)), int(payload), float(at))
            )
        elif parts[0] == "C" and len(parts) == 6:
            checkpoints[(parts[1], int(parts[2]))].append(float(parts[5]))
    return handled, checkpoints


async def produce(bus: EventBus, start: int, n: int, *, per_tick: int, pause: float) -> int:
    """Ingest events start..start+n-1, ``per_tick`` every ``pause`` seconds."""
    for i in range(start, start + n):
        await bus.ingest_wait(Event(f"user-{i % 101}", str(i).encode()))
        if i % per_tick == per_tick - 1:
            await asyncio.sleep(pause)
    return start + n


async def wait_handled(record: Path, produced: int, timeout: float) -> list[Handled]:
    async with asyncio.timeout(timeout):
        while True:
            handled, _ = read_record(record)
            if {h.payload for h in handled} >= set(range(produced)):
                return handled
            await asyncio.sleep(0.1)


async def test_a_killed_consumer_node_loses_nothing(tmp_path: Path) -> None:
    """After a SIGKILL of the busiest consumer node every event is handled; events
    handled twice are exactly ones the killed node handled after its last checkpoint of
    their shard, within one checkpoint interval (plus slack) of the kill; no bus shard
    is ever handled by two nodes in turn and then back; the producer's stats invariant
    holds after shutdown."""
    record = tmp_path / "record.log"
    async with NatsServer() as server:
        transport = await NatsTransport.connect(server.url)
        bus = EventBus(
            BusConfig(
                name="orders",
                shards=BUS_SHARDS,
                adapter=JetStreamAdapter(transport),
                batch=BatchConfig(max_events=64, max_delay_ms=2),
            )
        )
        await bus.start()
        nodes = [
            NodeProcess.from_argv(
                node_id,
                [
                    sys.executable,
                    str(NODE_SCRIPT),
                    server.url,
                    node_id,
                    str(NUM_SHARDS),
                    str(record),
                    str(CHECKPOINT_INTERVAL),
                ],
            )
            for node_id in ("n1", "n2", "n3")
        ]
        try:
            for node in nodes:
                await node.start()
            for node in nodes:
                await node.wait_ready()
            # A steady stream (about 2,500 events/s) for ~2.4 s; the kill falls mid-way,
            # while every node consumes and checkpoints.
            producing = asyncio.create_task(produce(bus, 0, TOTAL, per_tick=100, pause=0.04))
            await wait_handled(record, TOTAL // 2, timeout=20)
            busiest = Counter(h.node for h in read_record(record)[0]).most_common(1)[0][0]
            victim = next(n for n in nodes if n.node_id == busiest)
            await victim.kill()
            killed_at = time.time()
            produced = await producing
            await bus.flush()
            handled = await wait_handled(record, produced, timeout=30)
        finally:
            codes = {node.node_id: await node.stop() for node in nodes}
            stats = await bus.shutdown()
            await transport.close()
    assert_invariant(stats)
    assert all(code == 0 for node_id, code in codes.items() if node_id != victim.node_id), codes
    assert stats.events_dispatched == produced

    _, checkpoints = read_record(record)
    first: dict[int, Handled] = {}
    redelivered: list[tuple[Handled, Handled]] = []
    for h in sorted(handled, key=lambda h: h.at):
        if h.payload in first:
            redelivered.append((first[h.payload], h))
        else:
            first[h.payload] = h
    assert set(first) == set(range(produced))  # nothing lost
    for before, again in redelivered:
        assert before.node == victim.node_id, (before, again)
        assert again.node != victim.node_id
        assert again.position == before.position
        last = max(
            (t for t in checkpoints[(victim.node_id, before.shard)] if t <= killed_at), default=0
        )
        assert before.at >= last - 0.05, "a checkpointed event was handled again"
        assert killed_at - before.at <= CHECKPOINT_INTERVAL + SLACK
    per_shard: dict[int, list[str]] = defaultdict(list)
    for h in sorted(handled, key=lambda h: h.at):
        runs = per_shard[h.shard]
        if not runs or runs[-1] != h.node:
            runs.append(h.node)
    for shard, runs in per_shard.items():
        assert len(runs) == len(set(runs)), f"bus shard {shard} went back and forth: {runs}"
    victim_shards = {h.shard for h in handled if h.node == victim.node_id}
    window = [
        h
        for h in handled
        if h.node == victim.node_id and killed_at - h.at <= CHECKPOINT_INTERVAL + SLACK
    ]
    oldest = max((killed_at - b.at for b, _ in redelivered), default=0.0)
    by_victim = sum(h.node == victim.node_id for h in handled)
    print(
        f"\nconsumer kill: {produced} events; {victim.node_id} (bus shards "
        f"{sorted(victim_shards)}) SIGKILLed after handling {by_victim}; "
        f"{len(redelivered)} events handled twice, the oldest handled {oldest:.2f}s before the "
        f"kill; it handled {len(window)} in its last {CHECKPOINT_INTERVAL + SLACK:.1f}s "
        f"(checkpoint interval {CHECKPOINT_INTERVAL}s)"
    )
