"""Distributed counters against the primitives they are built from, in one run.

    python benchmarks/bench_counters.py [--nodes 3] [--seconds 3] [--in-flight 64] [--runs 5]

Starts a nats-server (JetStream) and ``--nodes`` node processes; each serves,
on its own prefixes, counters with their state in JetStream KV (KV
membership), counters with their state in memory (static membership), a
write-through entity with the same KV write as a counter's, and a plain
``Router`` echo. The measuring client runs in this process.

* **Strict inc/s** (``--in-flight`` operations at once over 1,000 keys)
  against clstr's own request/reply (the echo), against the write-through
  entity call (the same KV write: what counters add to an entity), and with
  the state in memory (the counter's path without the KV write) against the
  echo.
* **Lax inc cost per call**: ``inc_nowait`` against a plain dict increment
  (this process, no network).
* **Flush traffic**: a LaxCounter driven at ``--rate`` increments/s (100,000)
  over ``--keys`` keys (10,000, then 100) for ``--seconds``: batch messages/s sent,
  key deltas/s carried, and the time for the last flush to be acknowledged
  after the increments stop; the baseline is one message per increment
  (what a StrictCounter sends).

Rows for ``clstr bench``: printed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SHARDS = 64
KV_PREFIX, MEM_PREFIX, ECHO_PREFIX = "clstr", "mem", "echo"


# -- the node process ------------------------------------------------------------------


@dataclass
class CellState:
    value: int = 0


@dataclass
class Bump:
    n: int


async def serve(url: str, node_id: str, nodes: list[str]) -> None:
    """One node process: counters (KV and memory), a KV cell entity, an echo."""
    import signal

    import structlog

    from clstr import Node, Router
    from clstr.counters import serve_counters
    from clstr.entities import Entity, KvStateStore, MemoryStateStore, Sharding, handles
    from clstr.membership import KvMembership, KvSettings
    from clstr.transports.nats import NatsTransport

    # Throughput, not failover, is measured: leases that survive a host
    # saturated by the measurement itself.
    settings = KvSettings(heartbeat_interval=2.0, heartbeat_ttl=15.0)

    class Cell(Entity[CellState]):
        state_type = CellState

        @handles
        async def bump(self, msg: Bump) -> int:
            self.state.value += msg.n
            return self.state.value

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))
    transport = await NatsTransport.connect(url)
    kv = Sharding(
        transport,
        num_shards=SHARDS,
        node_id=node_id,
        prefix=KV_PREFIX,
        membership=lambda group: KvMembership(settings=settings),
        store=KvStateStore(transport),
    )
    serve_counters(kv)
    kv.register_entity(Cell)
    mem = Sharding(
        transport,
        num_shards=SHARDS,
        node_id=node_id,
        prefix=MEM_PREFIX,
        nodes=nodes,
        store=MemoryStateStore(),
    )
    serve_counters(mem)
    router = Router()

    @router.on(Bump)
    async def echo(msg: Bump) -> int:
        return msg.n

    echo_node = Node(
        transport, router, num_shards=SHARDS, node_id=node_id, prefix=ECHO_PREFIX, nodes=nodes
    )
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    async with kv, mem, echo_node:
        print("ready", flush=True)
        await stop.wait()
    await transport.close()


# -- measurements ----------------------------------------------------------------------


async def rate(op: Any, seconds: float, in_flight: int) -> float:
    """Completed calls of ``op(i)`` per second with ``in_flight`` at once."""
    done = 0
    stop_at = time.perf_counter() + seconds

    async def worker(w: int) -> None:
        nonlocal done
        i = w
        while time.perf_counter() < stop_at:
            await op(i)
            done += 1
            i += in_flight

    started = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(in_flight)))
    return done / (time.perf_counter() - started)


@dataclass
class Row:
    name: str
    baseline: str
    value: float
    base: float
    unit: str
    floor: str
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return self.value / self.base


async def strict_rows(url: str, seconds: float, in_flight: int, runs: int) -> list[Row]:
    from clstr import Client
    from clstr.counters import DEFAULT_COUNTER_RETRY, StrictCounter
    from clstr.transports.nats import NatsTransport

    transport = await NatsTransport.connect(url)
    kv = Client(transport, num_shards=SHARDS, prefix=KV_PREFIX, timeout=30)
    # The entity baseline as a user gets exactly-once from entities: request ids
    # (retries), replies kept in the record.
    exactly_once = Client(
        transport, num_shards=SHARDS, prefix=KV_PREFIX, timeout=30, retry=DEFAULT_COUNTER_RETRY
    )
    mem = Client(transport, num_shards=SHARDS, prefix=MEM_PREFIX, timeout=30)
    echo = Client(transport, num_shards=SHARDS, prefix=ECHO_PREFIX, timeout=30)
    keys = [f"key-{i}" for i in range(1000)]
    strict = StrictCounter(kv, "bench", timeout=30)
    strict_mem = StrictCounter(mem, "bench", timeout=30)

    async def echo_call(i: int) -> None:
        await echo.key(keys[i % 1000]).call(Bump(1), int)

    async def cell_call(i: int) -> None:
        await exactly_once.entity("Cell", keys[i % 1000]).call(Bump(1), int)

    async def inc(i: int) -> None:
        await strict.inc(keys[i % 1000])

    async def inc_mem(i: int) -> None:
        await strict_mem.inc(keys[i % 1000])

    sides = (("echo", echo_call), ("cell", cell_call), ("kv", inc), ("mem", inc_mem))
    for _, op in sides:  # every key's entity loaded (and created) first
        await asyncio.gather(*(op(i) for i in range(1000)))
    measured: dict[str, list[float]] = {}
    for run in range(runs):  # interleaved, so that drift hits every side alike
        for name, op in sides:
            value = await rate(op, seconds, in_flight)
            measured.setdefault(name, []).append(value)
            print(f"  run {run + 1} {name}: {value:,.0f}/s", file=sys.stderr)
    await strict.close()
    await strict_mem.close()
    await transport.close()
    m = {name: statistics.median(values) for name, values in measured.items()}
    return [
        Row(
            f"strict inc over NATS, state in KV ({in_flight} in flight)",
            "entity write-through call, exactly once by request ids (same KV write)",
            m["kv"],
            m["cell"],
            "inc/s",
            ">= 0.8x",
        ),
        Row(
            f"strict inc over NATS, state in KV ({in_flight} in flight)",
            "clstr request/reply (Router echo)",
            m["kv"],
            m["echo"],
            "inc/s",
            "report",
        ),
        Row(
            f"strict inc over NATS, state in memory ({in_flight} in flight)",
            "clstr request/reply (Router echo)",
            m["mem"],
            m["echo"],
            "inc/s",
            ">= 0.6x",
        ),
    ]


async def lax_call_row(calls: int) -> Row:
    from clstr import Client, MemoryNetwork, MemoryTransport
    from clstr.counters import LaxCounter

    client = Client(MemoryTransport(MemoryNetwork()), num_shards=SHARDS)
    lax = LaxCounter(client, "bench", allowed_lag=3600)
    keys = [f"key-{i}" for i in range(10_000)]
    inc = lax.inc_nowait
    counts: dict[str, int] = {}
    lax_ns, dict_ns = [], []
    for _ in range(7):  # alternating; the best of each (what noise cannot improve)
        started = time.perf_counter()
        for i in range(calls):
            inc(keys[i % 10_000])
        lax_ns.append((time.perf_counter() - started) / calls * 1e9)
        started = time.perf_counter()
        for i in range(calls):
            key = keys[i % 10_000]
            counts[key] = counts.get(key, 0) + 1
        dict_ns.append((time.perf_counter() - started) / calls * 1e9)
    lax._pending.clear()  # nothing to flush: no cluster here
    await lax.close()
    return Row(
        "lax inc_nowait cost per call (10k keys)",
        "plain dict increment (counts[k] = counts.get(k, 0) + 1)",
        min(lax_ns),
        min(dict_ns),
        "ns/call",
        "<= 3x",
    )


async def flush_row(url: str, incs_per_s: int, nkeys: int, seconds: float) -> Row:
    from clstr import Client
    from clstr.counters import LaxCounter
    from clstr.transports.nats import NatsTransport

    transport = await NatsTransport.connect(url)
    client = Client(transport, num_shards=SHARDS, prefix=KV_PREFIX, timeout=30)
    keys = [f"flush-{i}" for i in range(nkeys)]
    lax = LaxCounter(client, f"traffic{nkeys}", timeout=600)
    for key in keys[:: max(nkeys // 200, 1)]:  # learn the owners
        lax.inc_nowait(key)
    await lax.flush()
    before = (lax.stats.messages, lax.stats.items, lax.stats.flushes)
    tick = 0.005
    per_tick = int(incs_per_s * tick)
    sent = 0
    started = time.perf_counter()
    loop = asyncio.get_running_loop()
    next_at = loop.time()
    while time.perf_counter() - started < seconds:
        for _ in range(per_tick):
            lax.inc_nowait(keys[sent % nkeys])
            sent += 1
        next_at += tick
        await asyncio.sleep(max(next_at - loop.time(), 0))
    driven = time.perf_counter() - started
    driven_messages = lax.stats.messages - before[0]
    await lax.flush()
    settled = time.perf_counter() - started - driven
    messages = lax.stats.messages - before[0]
    items = lax.stats.items - before[1]
    flushes = lax.stats.flushes - before[2]
    await lax.close()
    await transport.close()
    elapsed = driven + settled
    return Row(
        f"lax flush traffic at {sent / driven:,.0f} incs/s over {nkeys:,} keys",
        "one message per increment (a StrictCounter)",
        driven_messages / driven,
        sent / driven,
        "msg/s",
        "<= 0.01x",
        {
            "batch messages in all, until acknowledged": float(messages),
            "key deltas/s (one KV write each)": items / elapsed,
            "increments per key delta": sent / max(items, 1),
            "flush rounds/s": flushes / elapsed,
            "last flush acknowledged after the increments stop": f"{settled * 1000:.0f} ms",
        },
    )


# -- the run ---------------------------------------------------------------------------


async def main(args: argparse.Namespace) -> None:
    from clstr.testing import NatsServer

    async with NatsServer(jetstream=True) as server:
        names = [f"n{i + 1}" for i in range(args.nodes)]
        procs = []
        try:
            for name in names:
                proc = await asyncio.create_subprocess_exec(
                    sys.executable,
                    str(Path(__file__)),
                    "--serve",
                    server.url,
                    name,
                    ",".join(names),
                    stdout=asyncio.subprocess.PIPE,
                )
                procs.append(proc)
            for proc in procs:
                assert proc.stdout is not None
                async with asyncio.timeout(30):
                    assert (await proc.stdout.readline()).strip() == b"ready"
            await asyncio.sleep(2.0)  # KV membership settles (every shard owned once)
            rows = await strict_rows(server.url, args.seconds, args.in_flight, args.runs)
            rows.append(await lax_call_row(args.calls))
            for nkeys in args.keys:
                rows.append(await flush_row(server.url, args.rate, nkeys, args.seconds))
        finally:
            for proc in procs:
                if proc.returncode is None:
                    proc.terminate()
            for proc in procs:
                await proc.wait()
    print("\n| measurement | compared with | clstr | baseline | ratio | floor |")
    print("|---|---|--:|--:|--:|--:|")
    for row in rows:
        ratio = f"{row.ratio:.2f}" if row.ratio >= 0.01 else f"{row.ratio:.1e}"
        print(
            f"| {row.name} | {row.baseline} | {row.value:,.0f} {row.unit} | "
            f"{row.base:,.0f} {row.unit} | **{ratio}x** | {row.floor} |"
        )
        for name, value in row.extra.items():
            shown = f"{value:,.1f}" if isinstance(value, float) else value
            print(f"|   {name} | | {shown} | | | |")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--serve":
        asyncio.run(serve(sys.argv[2], sys.argv[3], sys.argv[4].split(",")))
        sys.exit(0)
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--in-flight", type=int, default=64)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--calls", type=int, default=1_000_000)
    parser.add_argument("--rate", type=int, default=100_000)
    parser.add_argument(
        "--keys",
        type=lambda text: [int(n) for n in text.split(",")],
        default=[10_000, 100],
        help="key counts of the flush-traffic rows (default 10000,100)",
    )
    asyncio.run(main(parser.parse_args()))
