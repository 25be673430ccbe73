"""Scale: many nodes on a 3-server NATS cluster (JetStream R3), measured through changes.

    python benchmarks/scale.py                      # 100 nodes x 4096 shards (by hand)
    python benchmarks/scale.py --nodes 12 --shards 256 --per-process 6 --json out.json

Starts a 3-server NATS cluster (clstr.testing.NatsCluster, buckets with 3
replicas) and ``--nodes`` nodes in worker processes of ``--per-process`` nodes
each (every node with its own NATS connection and KvMembership). It measures:

* cold start: spawn -> every shard held by its HRW owner;
* a join (one more node), a graceful leave (SIGTERM of that node's process)
  and a SIGKILL of a process holding ``--per-process`` nodes: time to converge,
  shards moved against the HRW ideal, KV operations on the shards bucket and
  their bytes, and the errors a client routing keyed requests (with retries)
  saw during the change;
* heartbeat traffic: writes per second per node on the members bucket.

The observer reads only what every node publishes: the members and shards
buckets (KV watchers) and the JetStream stream info (sequence numbers and
bytes). Prints a table and, with ``--json``, writes the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

PREFIX = "scale"
# Default timing: generous, as dozens of nodes share each process's event loop
# and a late heartbeat must not fence a node that is merely busy (--ttl).
TTL = 10.0


# -- worker processes --------------------------------------------------------------


async def worker(urls: list[str], first: int, count: int, num_shards: int, ttl: float) -> None:
    import structlog

    from clstr import Envelope, Node
    from clstr.membership import KvMembership, KvSettings
    from clstr.transports.nats import NatsOptions, NatsTransport

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))
    settings = KvSettings(
        heartbeat_interval=ttl / 5,
        heartbeat_ttl=ttl,
        reconcile_interval=min(1.0, ttl / 5),
        replicas=3,
    )

    async def echo(env: Envelope) -> bytes:
        return env.data

    nodes: list[Node] = []
    for i in range(first, first + count):
        transport = await NatsTransport.connect(urls, NatsOptions(name=f"n{i:03d}"))
        node = Node(
            transport,
            echo,
            num_shards=num_shards,
            node_id=f"n{i:03d}",
            prefix=PREFIX,
            membership=KvMembership(settings=settings),
            stop_timeout=10,
        )
        nodes.append(node)
    await asyncio.gather(*(node.start() for node in nodes))
    print("ready", flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await asyncio.gather(*(node.stop() for node in nodes))
    for node in nodes:
        await node.transport.close()


class Worker:
    def __init__(
        self, urls: list[str], first: int, count: int, num_shards: int, ttl: float
    ) -> None:
        self.args = [",".join(urls), str(first), str(count), str(num_shards), str(ttl)]
        self.count = count
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, __file__, "worker", *self.args,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip

    async def ready(self, timeout: float) -> None:
        assert self.process is not None
        assert self.process.stdout is not None
        async with asyncio.timeout(timeout):
            assert (await self.process.stdout.readline()).strip() == b"ready"

    async def terminate(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        await self.process.wait()

    async def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        await self.process.wait()

    async def cleanup(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
            await self.process.wait()


# -- the observer ----------------------------------------------------------------------


class Observer:
    """The cluster as its buckets show it: live members and shard holders."""

    def __init__(self, js: Any, num_shards: int) -> None:
        self.js = js
        self.num_shards = num_shards
        self.members: set[str] = set()
        self.holders: dict[int, str] = {}
        self.changed = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._watchers: list[Any] = []

    async def start(self) -> None:
        from clstr.transports.jetstream import open_bucket, settling

        members = await settling(lambda: open_bucket(self.js, f"{PREFIX}_members", replicas=3))
        shards = await settling(lambda: open_bucket(self.js, f"{PREFIX}_shards", replicas=3))
        for kv, apply in ((members, self._member), (shards, self._shard)):
            watcher = await kv.watchall()
            self._watchers.append(watcher)
            self._tasks.append(asyncio.create_task(self._follow(watcher, apply)))

    async def _follow(self, watcher: Any, apply: Any) -> None:
        async for entry in watcher:
            if entry is not None:
                apply(entry)
                self.changed.set()

    def _member(self, entry: Any) -> None:
        gone = entry.operation in ("DEL", "PURGE") or not entry.value
        if gone:
            self.members.discard(entry.key)
        else:
            self.members.add(entry.key)

    def _shard(self, entry: Any) -> None:
        if entry.operation in ("DEL", "PURGE") or not entry.value:
            self.holders.pop(int(entry.key), None)
        else:
            self.holders[int(entry.key)] = entry.value.decode()

    def desired(self) -> dict[int, str]:
        from clstr.hashing import assign_shards

        return assign_shards(sorted(self.members), self.num_shards) if self.members else {}

    def balanced(self, expect_members: int) -> bool:
        return len(self.members) == expect_members and self.holders == self.desired()

    async def wait_balanced(self, expect_members: int, timeout: float) -> float:
        started = last = time.monotonic()
        async with asyncio.timeout(timeout):
            while not self.balanced(expect_members):
                self.changed.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(10):
                        await self.changed.wait()
                if time.monotonic() - last >= 10:
                    last = time.monotonic()
                    desired = self.desired()
                    off = sum(1 for s, n in desired.items() if self.holders.get(s) != n)
                    print(
                        f"  ... {last - started:.0f} s: {len(self.members)} members, "
                        f"{len(self.holders)} shards held, {off} not on their HRW owner",
                        file=sys.stderr,
                        flush=True,
                    )
        return time.monotonic() - started

    async def stream(self, name: str) -> tuple[int, int]:
        info = await self.js.stream_info(f"KV_{PREFIX}_{name}")
        return int(info.state.last_seq), int(info.state.bytes)

    async def stop(self) -> None:
        from clstr.transports.jetstream import stop_watcher

        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for watcher in self._watchers:
            await stop_watcher(watcher)


class Traffic:
    """A client routing keyed requests (with retries) during a change."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.sent = self.errors = 0
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        from clstr import RequestError

        n = 0
        while not self._stop.is_set():
            n += 1
            try:
                await self.client.request_key(f"key-{n % 5000}", "echo", b"x")
            except RequestError:
                self.errors += 1
            self.sent += 1

    def start(self) -> None:
        self.sent = self.errors = 0
        self._stop.clear()
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> tuple[int, int]:
        self._stop.set()
        if self._task is not None:
            await self._task
        return self.sent, self.errors


@dataclass
class Change:
    name: str
    seconds: float
    moved: int
    ideal: int
    kv_ops: int
    kv_bytes: int
    requests: int
    errors: int


@dataclass
class Report:
    nodes: int
    shards: int
    per_process: int
    cold_start_seconds: float = 0.0
    heartbeat_writes_per_node_per_s: float = 0.0
    changes: list[Change] = field(default_factory=list)


async def orchestrate(
    nodes: int, shards: int, per_process: int, timeout: float, ttl: float
) -> Report:
    import nats

    from clstr import Client, RetryPolicy
    from clstr.testing import NatsCluster
    from clstr.transports.nats import NatsTransport

    report = Report(nodes, shards, per_process)
    async with NatsCluster(size=3, jetstream=True) as cluster:
        urls = cluster.urls
        nc = await nats.connect(urls)
        observer = Observer(nc.jetstream(), shards)
        workers = [
            Worker(urls, first, min(per_process, nodes - first), shards, ttl)
            for first in range(0, nodes, per_process)
        ]
        client_transport = await NatsTransport.connect(urls)
        client = Client(
            client_transport,
            num_shards=shards,
            prefix=PREFIX,
            timeout=30,
            retry=RetryPolicy(attempt_timeout=2.0, max_backoff=0.5),
        )
        traffic = Traffic(client)
        joiner = Worker(urls, nodes, 1, shards, ttl)
        try:
            started = time.monotonic()
            for w in workers:
                await w.start()
            await asyncio.gather(*(w.ready(timeout) for w in workers))
            await observer.start()
            await observer.wait_balanced(nodes, timeout)
            report.cold_start_seconds = time.monotonic() - started
            beat0, _ = await observer.stream("members")
            t0 = time.monotonic()
            await asyncio.sleep(ttl / 2)  # a quiet period: heartbeats only
            beat1, _ = await observer.stream("members")
            report.heartbeat_writes_per_node_per_s = (
                (beat1 - beat0) / (time.monotonic() - t0) / nodes
            )

            async def change(name: str, act: Any, expect: int) -> None:
                before = dict(observer.holders)
                seq0, bytes0 = await observer.stream("shards")
                traffic.start()
                t = time.monotonic()
                await act()
                await observer.wait_balanced(expect, timeout)
                seconds = time.monotonic() - t
                sent, errors = await traffic.stop()
                seq1, bytes1 = await observer.stream("shards")
                after = observer.desired()
                moved = sum(1 for s in range(shards) if before.get(s) != observer.holders.get(s))
                ideal = sum(1 for s in range(shards) if before.get(s) != after.get(s))
                report.changes.append(
                    Change(name, seconds, moved, ideal, seq1 - seq0, bytes1 - bytes0, sent, errors)
                )

            async def join() -> None:
                await joiner.start()
                await joiner.ready(timeout)

            await change("join (1 node)", join, nodes + 1)
            await change("graceful leave (1 node)", joiner.terminate, nodes)
            victim = workers[-1]
            await change(
                f"SIGKILL (process of {victim.count} nodes)", victim.kill, nodes - victim.count
            )
        finally:
            await traffic.stop()
            await client.close()
            await client_transport.close()
            await observer.stop()
            for w in [*workers, joiner]:
                await w.cleanup()
            await nc.close()
    return report


def render(report: Report) -> str:
    lines = [
        f"{report.nodes} nodes x {report.shards} shards, {report.per_process} nodes per process,"
        " 3-server NATS cluster, JetStream R3",
        f"cold start -> all shards held by their HRW owner: {report.cold_start_seconds:.1f} s",
        f"heartbeat writes: {report.heartbeat_writes_per_node_per_s:.2f} per node per second",
        "",
        "| change | converge s | shards moved | HRW ideal | KV ops | KV bytes | requests "
        "| errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in report.changes:
        lines.append(
            f"| {c.name} | {c.seconds:.1f} | {c.moved} | {c.ideal} | {c.kv_ops} | {c.kv_bytes} "
            f"| {c.requests} | {c.errors} |"
        )
    return "\n".join(lines)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        urls, (first, count, shards) = sys.argv[2].split(","), map(int, sys.argv[3:6])
        asyncio.run(worker(urls, first, count, shards, float(sys.argv[6])))
        return 0
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--nodes", type=int, default=100)
    parser.add_argument("--shards", type=int, default=4096)
    parser.add_argument("--per-process", type=int, default=25)
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--ttl", type=float, default=TTL, help="heartbeat TTL, seconds")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    report = asyncio.run(
        orchestrate(args.nodes, args.shards, args.per_process, args.timeout, args.ttl)
    )
    print(render(report))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(asdict(report), out, indent=1)
    return 0 if all(c.moved <= c.ideal * 1.05 + 2 for c in report.changes) else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
