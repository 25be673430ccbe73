"""Singleton failover: SIGKILL the node running a singleton, time until it runs elsewhere.

    python benchmarks/singleton_failover.py [--kills 20] [--nodes 3] [--ttl 2.0]

Starts an embedded nats-server (JetStream) and ``--nodes`` runner processes
(this file in ``node`` mode: a :class:`clstr.entities.Sharding` with KV
membership and one singleton). Each singleton run appends ``start``/``stop``
lines with its node and a wall-clock time to a shared record file (one
unbuffered write each, so a SIGKILL loses nothing). Then, ``--kills`` times:
SIGKILL the process running the singleton, wait for a ``start`` line from
another node, restart the killed node. Prints every failover time, the median
and the maximum, and checks from the record that no two runs ever overlapped
(the killed run has no ``stop`` line: it ended at its kill).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

NUM_SHARDS = 64


async def node_main(url: str, node_id: str, record: str, ttl: float) -> None:
    import structlog

    from clstr.entities import Sharding
    from clstr.membership import KvMembership, KvSettings
    from clstr.node import ShardContext
    from clstr.transports.nats import NatsOptions, NatsTransport

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))
    fd = os.open(record, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    settings = KvSettings(heartbeat_interval=ttl / 8, heartbeat_ttl=ttl, reconcile_interval=0.1)
    transport = await NatsTransport.connect(url, NatsOptions(name=node_id, reconnect_time_wait=0.1))
    runner = Sharding(
        transport,
        num_shards=NUM_SHARDS,
        node_id=node_id,
        membership=lambda group: KvMembership(settings=settings),
    )

    async def beat(ctx: ShardContext) -> None:
        os.write(fd, f"start {node_id} {time.time():.6f}\n".encode())
        try:
            await ctx.stopping.wait()
        finally:
            os.write(fd, f"stop {node_id} {time.time():.6f}\n".encode())

    runner.register_singleton("beat", beat, grace=0.2)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await runner.start()
    print("ready", flush=True)
    await stop.wait()
    await runner.shutdown()
    await transport.close()


def _events(record: Path) -> list[tuple[str, str, float]]:
    lines = record.read_text().split("\n") if record.exists() else []
    return [(k, n, float(t)) for k, n, t in (line.split() for line in lines if line.strip())]


class _Node:
    def __init__(self, node_id: str, url: str, record: Path, ttl: float) -> None:
        self.node_id, self.url, self.record, self.ttl = node_id, url, record, ttl
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, __file__, "node", self.url, self.node_id, str(self.record),
            str(self.ttl), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        assert self.process.stdout is not None
        async with asyncio.timeout(30):
            assert (await self.process.stdout.readline()).strip() == b"ready"

    async def kill(self) -> float:
        assert self.process is not None
        self.process.kill()
        killed = time.time()
        await self.process.wait()
        return killed

    async def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(15):
                    await self.process.wait()
            except TimeoutError:
                self.process.kill()
                await self.process.wait()


async def _wait_start(
    record: Path, after: int, not_on: str | None, timeout: float
) -> tuple[str, float]:
    async with asyncio.timeout(timeout):
        while True:
            for kind, node, at in _events(record)[after:]:
                if kind == "start" and node != not_on:
                    return node, at
            await asyncio.sleep(0.02)  # a file has no event to wait on


def _overlaps(events: list[tuple[str, str, float]], kills: dict[str, list[float]]) -> int:
    """Runs that overlap: a start while another run has neither stopped nor been killed."""
    running: dict[str, float] = {}
    overlaps = 0
    for kind, node, at in sorted(events, key=lambda e: e[2]):
        for other, since in list(running.items()):
            ended = [k for k in kills.get(other, []) if k >= since]
            if ended and ended[0] <= at:
                del running[other]
        if kind == "start":
            overlaps += bool(running)
            running[node] = at
        else:
            running.pop(node, None)
    return overlaps


async def orchestrate(kills: int, nodes: int, ttl: float) -> int:
    from clstr.testing import NatsServer

    with tempfile.TemporaryDirectory() as tmp:
        record = Path(tmp) / "record"
        async with NatsServer(jetstream=True) as server:
            procs = {f"n{i}": _Node(f"n{i}", server.url, record, ttl) for i in range(nodes)}
            try:
                for proc in procs.values():
                    await proc.start()
                node, _ = await _wait_start(record, 0, None, 30)
                times: list[float] = []
                killed_at: dict[str, list[float]] = {}
                for _ in range(kills):
                    await asyncio.sleep(ttl)  # let the cluster settle after the last restart
                    running = [e for e in _events(record) if e[0] == "start"][-1][1]
                    before = len(_events(record))
                    at = await procs[running].kill()
                    killed_at.setdefault(running, []).append(at)
                    node, started = await _wait_start(record, before, running, 10 * ttl + 10)
                    times.append(started - at)
                    print(f"killed {running}, singleton on {node} after {started - at:.2f} s")
                    await procs[running].start()
                overlaps = _overlaps(_events(record), killed_at)
            finally:
                for proc in procs.values():
                    await proc.stop()
    print(
        f"\n{kills} kills, heartbeat TTL {ttl:g} s: failover median "
        f"{statistics.median(times):.2f} s, max {max(times):.2f} s, "
        f"min {min(times):.2f} s; overlapping runs: {overlaps}"
    )
    return 1 if overlaps else 0


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "node":
        asyncio.run(node_main(sys.argv[2], sys.argv[3], sys.argv[4], float(sys.argv[5])))
        return 0
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--ttl", type=float, default=2.0, help="heartbeat TTL, seconds")
    args = parser.parse_args()
    return asyncio.run(orchestrate(args.kills, args.nodes, args.ttl))


if __name__ == "__main__":
    raise SystemExit(main())
