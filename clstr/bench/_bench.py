"""Benchmarks: clstr against raw nats-py and bare asyncio, in the same run (``clstr bench``).

Every figure is a *ratio* to a baseline measured in the same run, on the same
nats-server, with the same process layout: on a small, shared machine the
absolute numbers drift from run to run, the ratios much less. Each run
measures both sides back to back (alternating which goes first), and a
row's ratio is the median of the per-run ratios.

Process layout. The orchestrator (this process) runs no measured code: it
starts a nats-server and spawns worker processes, and talks to each over a
line protocol (JSON commands on its stdin, ``@clstr-bench``-marked JSON lines
on its stdout). A worker says ``ready`` only once it is set up (for a node:
once the server routes its subscriptions), so nothing waits on a sleep.
Closing a worker's stdin asks it to shut down; one that does not exit in
time is killed, and every child is reaped. Workers run this file as a
script (``python -P .../bench.py``) rather than ``-m clstr.bench``, so that
a raw nats-py worker never imports clstr: its memory and start-up are those
of nats-py alone. This module therefore imports only the standard library at
the top; clstr, nats-py and the optional packages (uvloop, matplotlib,
pyinstrument, from the ``bench`` extra) are imported where they are used.

A benchmark is never a timed unit test: ``--quick`` runs everything with tiny
counts only to prove that it works (see tests/test_bench.py).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as _dt
import gc
import importlib
import importlib.util
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
import tracemalloc
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, Final

__all__ = [
    "add_arguments",
    "run",
    "main",
    "GROUPS",
    "SPECS",
    "best_time",
    "measure_shard_for_key",
    "measure_hrw",
    "summarise_profile",
    "update_markdown",
]

# -- what is measured ------------------------------------------------------------

#: The subject prefix of the clstr side, and the raw side's subjects.
_CLSTR_PREFIX: Final = "bench"
_RAW_SHARD: Final = "rawbench.shard.{}"
_RAW_CONTROL: Final = "rawbench.control"
_DONE_SUBJECT: Final = "benchdone.{}"
# Wire marker of the worker protocol: other output on a worker's stdout is ignored.
_MARK: Final = "@clstr-bench "
_PAYLOAD_BYTES: Final = 100
_KEYS: Final = 1024
_HRW_SHARDS: Final = 1024
_HRW_NODES: Final = 64


@dataclass(frozen=True, slots=True)
class Spec:
    """One row of the results table: a clstr figure, its baseline, and the target ratio.

    ``ratio`` is always clstr / baseline. With ``higher_is_better`` (rates)
    the target is a floor (``ratio >= target``), otherwise (times, memory) a
    ceiling. Rows without a target are reported only.
    """

    name: str
    group: str
    what: str
    baseline: str
    unit: str
    higher_is_better: bool
    target: float | None = None

    def passed(self, ratio: float) -> bool | None:
        """Whether ``ratio`` meets the target (``None`` for a report-only row)."""
        if self.target is None:
            return None
        return ratio >= self.target if self.higher_is_better else ratio <= self.target

    def target_text(self) -> str:
        """The target as text: ``>= 0.85x``, ``<= 1.15x`` or ``report``."""
        if self.target is None:
            return "report"
        return f"{'>=' if self.higher_is_better else '<='} {self.target:g}x"


SPECS: Final[tuple[Spec, ...]] = (
    Spec(
        "nats_rr_throughput",
        "nats_rr",
        "request/reply throughput over NATS (256 in flight, 100 B)",
        "raw nats-py request -> raw nats-py responder",
        "req/s",
        True,
        0.85,
    ),
    Spec(
        "nats_latency_p50",
        "nats_latency",
        "sequential request latency p50 over NATS",
        "raw nats-py request -> raw responder, sequential",
        "us",
        False,
        1.15,
    ),
    Spec(
        "nats_latency_p99",
        "nats_latency",
        "sequential request latency p99 over NATS",
        "raw nats-py request -> raw responder, sequential",
        "us",
        False,
        1.15,
    ),
    Spec(
        "nats_notify_throughput",
        "nats_notify",
        "notify throughput over NATS, end to end (all handled)",
        "raw nats-py publish -> raw subscriber (all received)",
        "msg/s",
        True,
        0.85,
    ),
    Spec(
        "memory_rr_throughput",
        "memory_rr",
        "request/reply throughput, memory transport, one process (256 in flight)",
        "bare asyncio echo (queue + future) with the same encode/decode",
        "req/s",
        True,
        0.5,
    ),
    Spec(
        "shard_for_key_rate",
        "shard_for_key",
        "shard_for_key(key, 1024) rate",
        "bare loop of blake3(key).digest()",
        "keys/s",
        True,
        0.7,
    ),
    Spec(
        "shard_mapper_rate",
        "shard_for_key",
        "ShardMapper(1024).shard(key) rate",
        "bare loop of blake3(key).digest()",
        "keys/s",
        True,
        0.7,
    ),
    Spec(
        "hrw_assign_time",
        "hrw_assign",
        "assign_shards: 1024 shards over 64 nodes",
        "65,536 raw BLAKE3 digests (one per shard x node)",
        "ms",
        False,
        1.0,
    ),
    Spec(
        "keyhandler_bytes_per_key",
        "keyhandler_memory",
        "KeyHandler memory per live key (100k keys, tracemalloc)",
        "a plain dict of the same per-key handlers",
        "B/key",
        False,
    ),
    Spec(
        "node_startup_time",
        "node_startup",
        "node owning 1024 shards: process spawn -> all subscriptions ready",
        "raw nats-py process: 1024 queue subscriptions + flush",
        "ms",
        False,
    ),
    Spec(
        "node_rss",
        "node_startup",
        "node owning 1024 shards: RSS once ready",
        "raw nats-py process with 1024 subscriptions",
        "MiB",
        False,
    ),
)

#: The names ``--only`` accepts, in the order they run.
GROUPS: Final[tuple[str, ...]] = tuple(dict.fromkeys(s.group for s in SPECS))
_NATS_GROUPS: Final = ("nats_rr", "nats_latency", "nats_notify")
_LOCAL_GROUPS: Final = ("memory_rr", "shard_for_key", "hrw_assign", "keyhandler_memory")


@dataclass(frozen=True, slots=True)
class Sizes:
    """How much work each measurement does (``--quick`` shrinks everything)."""

    inflight: int = 256
    nats_shards: int = 64
    rr_requests: int = 20_000
    rr_warmup: int = 2_000
    latency_requests: int = 2_000
    latency_warmup: int = 200
    notify_messages: int = 50_000
    memory_requests: int = 20_000
    hash_keys: int = 20_000
    hash_repeat: int = 5
    hrw_repeat: int = 3
    live_keys: int = 100_000
    startup_shards: int = 1024


FULL_SIZES: Final = Sizes()
QUICK_SIZES: Final = Sizes(
    rr_requests=600,
    rr_warmup=100,
    latency_requests=100,
    latency_warmup=20,
    notify_messages=1_000,
    memory_requests=600,
    hash_keys=2_000,
    hash_repeat=1,
    hrw_repeat=1,
    live_keys=2_000,
    startup_shards=128,
)


class BenchError(RuntimeError):
    """A benchmark could not run (a worker failed, timed out, or a tool is missing)."""


# -- small measuring helpers (shared with benchmarks/) ---------------------------


def best_time(fn: Callable[[], object], number: int = 1, repeat: int = 5) -> float:
    """The fastest of ``repeat`` timings of ``number`` calls of ``fn``, in seconds.

    The minimum, not the mean: noise only ever adds time.
    """
    return min(timeit.repeat(fn, number=number, repeat=repeat))


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ascending ``sorted_values``, nearest rank."""
    index = min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))
    return sorted_values[index]


def _median_of(records: Sequence[JSON], key: str) -> float:
    return float(statistics.median(r[key] for r in records))


def _rss_mib() -> float:
    """This process's resident set size in MiB (Linux /proc; else the peak)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def measure_shard_for_key(n_keys: int, repeat: int) -> dict[str, float]:
    """Seconds per key of a bare BLAKE3 digest, ``shard_for_key`` and ``ShardMapper.shard``.

    The three loops hash the same ``bytes`` keys (``user-<i>``) into 1024
    shards; each figure is the best of ``repeat`` passes, after one pass of
    warm-up. Also reports the ``str``-key variants.
    """
    from blake3 import blake3

    from clstr.hashing import ShardMapper, shard_for_key

    keys_b = [f"user-{i}".encode() for i in range(n_keys)]
    keys_s = [k.decode() for k in keys_b]
    mapper = ShardMapper(1024).shard

    def bare() -> None:
        for k in keys_b:
            blake3(k).digest()

    def sfk_bytes() -> None:
        f = shard_for_key
        for k in keys_b:
            f(k, 1024)

    def sfk_str() -> None:
        f = shard_for_key
        for k in keys_s:
            f(k, 1024)

    def mapper_bytes() -> None:
        for k in keys_b:
            mapper(k)

    def mapper_str() -> None:
        for k in keys_s:
            mapper(k)

    loops = {
        "bare": bare,
        "shard_for_key": sfk_bytes,
        "shard_for_key_str": sfk_str,
        "mapper": mapper_bytes,
        "mapper_str": mapper_str,
    }
    for fn in loops.values():
        fn()
    return {name: best_time(fn, 1, repeat) / n_keys for name, fn in loops.items()}


def measure_hrw(repeat: int) -> dict[str, float]:
    """Seconds of ``assign_shards`` (1024 shards x 64 nodes) and of 65,536 raw digests.

    Each is the best of ``repeat`` timings after one warm-up call.
    """
    from blake3 import blake3

    from clstr.hashing import assign_shards

    nodes = [f"node-{i}" for i in range(_HRW_NODES)]
    raw = [b"shard:%d:%s" % (s, n.encode()) for s in range(_HRW_SHARDS) for n in nodes]

    def raw_digests() -> None:
        for x in raw:
            blake3(x).digest()

    def assign() -> None:
        assign_shards(nodes, _HRW_SHARDS)

    raw_digests()
    assign()
    return {"assign": best_time(assign, 1, repeat), "raw": best_time(raw_digests, 1, repeat)}


async def _drive(send: Callable[[int], Awaitable[object]], n: int, inflight: int) -> None:
    """Call ``send(i)`` for ``i`` in ``0..n-1`` with up to ``inflight`` calls at once."""
    indices = iter(range(n))

    async def lane() -> None:
        for i in indices:  # one shared iterator: each index goes to one lane
            await send(i)

    async with asyncio.TaskGroup() as tg:
        for _ in range(min(inflight, n)):
            tg.create_task(lane())


async def _throughput(
    send: Callable[[int], Awaitable[object]], n: int, warmup: int, inflight: int
) -> JSON:
    """Calls per second of ``send`` with ``inflight`` concurrent callers, after
    warm-up, and this process's CPU time per call in microseconds.

    The CPU figure does not move when other processes load the machine, so it
    is the one to compare patches with on a noisy host.
    """
    await _drive(send, warmup, inflight)
    started, cpu = time.perf_counter(), time.process_time()
    await _drive(send, n, inflight)
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    return {"rate": n / elapsed, "cpu_us": cpu / n * 1e6}


async def _latency(
    send: Callable[[int], Awaitable[object]], n: int, warmup: int
) -> dict[str, float]:
    """p50, p99 and mean of ``n`` sequential ``send`` calls, in microseconds."""
    for i in range(warmup):
        await send(i)
    clock = time.perf_counter_ns
    samples: list[float] = []
    for i in range(n):
        started = clock()
        await send(i)
        samples.append((clock() - started) / 1000)
    samples.sort()
    return {
        "p50": _percentile(samples, 0.50),
        "p99": _percentile(samples, 0.99),
        "mean": statistics.fmean(samples),
    }


# -- worker side -----------------------------------------------------------------

JSON = dict[str, Any]
_Op = Callable[[JSON], Awaitable[JSON]]


def _emit(message: JSON) -> None:
    sys.stdout.write(_MARK + json.dumps(message) + "\n")
    sys.stdout.flush()


async def _read_command() -> str:
    """The next line from the orchestrator ("" once it closed our stdin)."""
    return await asyncio.to_thread(sys.stdin.readline)


async def _cpu(_cmd: JSON) -> JSON:
    """This process's CPU time so far, in seconds."""
    return {"cpu": time.process_time()}


async def _serve(ops: dict[str, _Op], ready: JSON | None = None) -> None:
    """Say ready, then answer commands until stdin closes. A failing op is reported."""
    _emit({"ready": True, **(ready or {})})
    while line := await _read_command():
        command: JSON = json.loads(line)
        try:
            result = await ops[command["op"]](command)
        except Exception as exc:
            _emit({"ok": False, "error": f"{type(exc).__name__}: {exc}"})
        else:
            _emit({"ok": True, **result})


def _quiet_logs() -> None:
    """Send clstr's logs to stderr, warnings and up: a worker's stdout is the protocol."""
    import logging

    import structlog

    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
    )


class _Counter:
    """Counts notifications and calls ``done`` once the armed number has arrived."""

    def __init__(self, done: Callable[[], Awaitable[None]]) -> None:
        self.count = 0
        self.target = -1
        self._done = done

    def arm(self, target: int) -> None:
        self.count = 0
        self.target = target

    async def hit(self) -> None:
        self.count += 1
        if self.count == self.target:
            await self._done()


async def _clstr_node(cfg: JSON) -> None:
    from clstr import Envelope, Node
    from clstr.transports.nats import NatsOptions, NatsTransport

    _quiet_logs()
    transport = await NatsTransport.connect(cfg["url"], NatsOptions(name="bench-clstr-node"))
    done_subject = _DONE_SUBJECT.format("clstr")

    async def done() -> None:
        await transport.publish(done_subject, b"")

    counter = _Counter(done)

    async def handler(env: Envelope) -> bytes | None:
        kind = env.type
        if kind == "echo":
            return env.data
        if kind == "count":
            await counter.hit()
            return None
        if kind == "arm":
            counter.arm(int(env.data))
            return b"armed"
        raise ValueError(f"unknown benchmark message type {kind!r}")

    node = Node(
        transport,
        handler,
        num_shards=cfg["shards"],
        prefix=_CLSTR_PREFIX,
        node_id="bench-node",
        # Notify has no back-pressure: let the whole burst queue rather than
        # shed it as "overloaded", as the raw subscriber's queue would.
        max_pending=cfg["max_pending"],
    )
    try:
        await node.start()
        await _serve({"cpu": _cpu})
    finally:
        await node.stop()
        await transport.close()


async def _raw_node(cfg: JSON) -> None:
    import nats

    nc = await nats.connect(cfg["url"], name="bench-raw-node")
    done_subject = _DONE_SUBJECT.format("raw")

    async def done() -> None:
        await nc.publish(done_subject, b"")

    counter = _Counter(done)

    async def on_message(msg: Any) -> None:
        if msg.reply:
            await msg.respond(msg.data)
        else:
            await counter.hit()

    async def on_control(msg: Any) -> None:
        counter.arm(int(msg.data))
        await msg.respond(b"armed")

    try:
        for shard in range(cfg["shards"]):
            await nc.subscribe(_RAW_SHARD.format(shard), queue="rawbench", cb=on_message)
        await nc.subscribe(_RAW_CONTROL, cb=on_control)
        await nc.flush()
        await _serve({"cpu": _cpu})
    finally:
        await nc.drain()


@dataclass(slots=True)
class _ClientSide:
    """What a NATS client worker does, on either side: the three benchmarked calls."""

    request: Callable[[int], Awaitable[object]]
    notify: Callable[[int], Awaitable[object]]
    arm: Callable[[int], Awaitable[object]]
    done: asyncio.Event = field(default_factory=asyncio.Event)


async def _client_ops(side: _ClientSide, cfg: JSON) -> dict[str, _Op]:
    inflight = cfg["inflight"]
    timeout = cfg["timeout"]

    async def rr(cmd: JSON) -> JSON:
        return await _throughput(side.request, cmd["n"], cmd["warmup"], inflight)

    async def latency(cmd: JSON) -> JSON:
        return await _latency(side.request, cmd["n"], cmd["warmup"])

    async def notify(cmd: JSON) -> JSON:
        n = cmd["n"]
        send = side.notify
        side.done.clear()
        await side.arm(n)
        started, cpu = time.perf_counter(), time.process_time()
        for i in range(n):
            await send(i)
        async with asyncio.timeout(timeout):
            await side.done.wait()
        cpu = time.process_time() - cpu
        return {"rate": n / (time.perf_counter() - started), "cpu_us": cpu / n * 1e6}

    return {"nats_rr": rr, "nats_latency": latency, "nats_notify": notify}


async def _clstr_client(cfg: JSON) -> None:
    from clstr import Client
    from clstr.transports.nats import NatsOptions, NatsTransport

    _quiet_logs()
    transport = await NatsTransport.connect(cfg["url"], NatsOptions(name="bench-clstr-client"))
    client = Client(transport, num_shards=cfg["shards"], prefix=_CLSTR_PREFIX, timeout=10.0)
    keys = [f"key-{i}" for i in range(_KEYS)]
    payload = os.urandom(_PAYLOAD_BYTES)

    async def request(i: int) -> object:
        return await client.request_key(keys[i % _KEYS], "echo", payload)

    async def notify(i: int) -> None:
        await client.notify_key(keys[i % _KEYS], "count", payload)

    async def arm(n: int) -> object:
        return await client.request_key("control", "arm", str(n).encode())

    side = _ClientSide(request, notify, arm)
    try:
        await transport.subscribe(_DONE_SUBJECT.format("clstr"), lambda _d, _r: side.done.set())
        await _serve(await _client_ops(side, cfg))
    finally:
        await client.close()
        await transport.close()


async def _raw_client(cfg: JSON) -> None:
    import nats

    nc = await nats.connect(cfg["url"], name="bench-raw-client")
    subjects = [_RAW_SHARD.format(s) for s in range(cfg["shards"])]
    count = len(subjects)
    payload = os.urandom(_PAYLOAD_BYTES)

    async def request(i: int) -> object:
        return await nc.request(subjects[i % count], payload, timeout=10.0)

    async def notify(i: int) -> None:
        await nc.publish(subjects[i % count], payload)

    async def arm(n: int) -> object:
        return await nc.request(_RAW_CONTROL, str(n).encode(), timeout=10.0)

    side = _ClientSide(request, notify, arm)

    async def on_done(_msg: Any) -> None:
        side.done.set()

    try:
        await nc.subscribe(_DONE_SUBJECT.format("raw"), cb=on_done)
        await nc.flush()
        await _serve(await _client_ops(side, cfg))
    finally:
        await nc.drain()


async def _startup_clstr(cfg: JSON) -> None:
    begun = time.perf_counter()
    from clstr import Envelope, Node
    from clstr.transports.nats import NatsOptions, NatsTransport

    _quiet_logs()
    imported = time.perf_counter()
    transport = await NatsTransport.connect(cfg["url"], NatsOptions(name="bench-startup-clstr"))
    connected = time.perf_counter()
    rss_connected = _rss_mib()

    async def handler(env: Envelope) -> bytes:
        return env.data

    node = Node(transport, handler, num_shards=cfg["shards"], prefix="startup", node_id="n1")
    try:
        await node.start()
        ready = time.perf_counter()
        _emit(
            {
                "ready": True,
                "rss_mib": _rss_mib(),
                "rss_connected_mib": rss_connected,
                "import_ms": (imported - begun) * 1e3,
                "connect_ms": (connected - imported) * 1e3,
                "subscribe_ms": (ready - connected) * 1e3,
                "subscriptions": len(node.shards),
            }
        )
        await _serve({})
    finally:
        await node.stop()
        await transport.close()


async def _startup_raw(cfg: JSON) -> None:
    begun = time.perf_counter()
    import nats

    imported = time.perf_counter()
    nc = await nats.connect(cfg["url"], name="bench-startup-raw")
    connected = time.perf_counter()
    rss_connected = _rss_mib()

    async def on_message(msg: Any) -> None:
        await msg.respond(msg.data)

    try:
        subs = [
            await nc.subscribe(f"startupraw.shard.{s}", queue="startupraw", cb=on_message)
            for s in range(cfg["shards"])
        ]
        await nc.flush()
        ready = time.perf_counter()
        _emit(
            {
                "ready": True,
                "rss_mib": _rss_mib(),
                "rss_connected_mib": rss_connected,
                "import_ms": (imported - begun) * 1e3,
                "connect_ms": (connected - imported) * 1e3,
                "subscribe_ms": (ready - connected) * 1e3,
                "subscriptions": len(subs),
            }
        )
        await _serve({})
    finally:
        await nc.drain()


async def _memory_clstr(n: int, inflight: int, warmup: int) -> JSON:
    from clstr import Client, Envelope, MemoryTransport, Node

    async def echo(env: Envelope) -> bytes:
        return env.data

    node_side = MemoryTransport(name="node")
    client_side = node_side.connect("client")
    node = Node(node_side, echo, num_shards=64, prefix=_CLSTR_PREFIX, node_id="mem")
    client = Client(client_side, num_shards=64, prefix=_CLSTR_PREFIX, timeout=10.0)
    keys = [f"key-{i}" for i in range(_KEYS)]
    payload = os.urandom(_PAYLOAD_BYTES)

    async def request(i: int) -> object:
        return await client.request_key(keys[i % _KEYS], "echo", payload)

    async with node:
        try:
            return await _throughput(request, n, warmup, inflight)
        finally:
            await client.close()
            await client_side.close()
            await node_side.close()


async def _memory_baseline(n: int, inflight: int, warmup: int) -> JSON:
    """A bare asyncio echo: the client's encode, a queue, the node's decode, the
    same handler, the reply's encode, a future, the client's decode."""
    from clstr import Envelope
    from clstr.codec import decode_reply, decode_request, encode_reply, encode_request

    async def echo(env: Envelope) -> bytes:
        return env.data

    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[bytes, asyncio.Future[bytes]]] = asyncio.Queue()
    keys = [f"key-{i}" for i in range(_KEYS)]
    payload = os.urandom(_PAYLOAD_BYTES)

    async def server() -> None:
        while True:
            body, future = await queue.get()
            env = decode_request(body)
            future.set_result(encode_reply(await echo(env)))

    async def request(i: int) -> object:
        env = Envelope(type="echo", data=payload, key=keys[i % _KEYS], ttl=10.0)
        future = loop.create_future()
        queue.put_nowait((encode_request(env), future))
        return decode_reply(await future)

    serving = asyncio.create_task(server(), name="bench-echo-server")
    try:
        return await _throughput(request, n, warmup, inflight)
    finally:
        serving.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await serving


def _per_key_factory() -> Callable[[str], Callable[[Any], Awaitable[bytes | None]]]:
    """A factory of small stateful per-key handlers (a closure over a counter)."""

    def factory(key: str) -> Callable[[Any], Awaitable[bytes | None]]:
        state = [0]

        async def handle(env: Any) -> bytes | None:
            state[0] += 1
            return None

        return handle

    return factory


async def _keyhandler_bytes(n: int, side: str) -> float:
    """Traced bytes per live key: a KeyHandler with ``n`` keys, or a dict of the
    same handlers. Key strings are made before measuring (they are the caller's)."""
    from clstr import Envelope, KeyHandler

    keys = [f"key-{i:07d}" for i in range(n)]
    factory = _per_key_factory()
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        if side == "clstr":
            handler = KeyHandler(factory, max_keys=n, idle_timeout=None)
            for key in keys:
                await handler(Envelope(type="touch", key=key))
            assert len(handler) == n
            kept: object = handler
        else:
            plain = {}
            for key in keys:
                plain[key] = factory(key)
            kept = plain
        gc.collect()
        after = tracemalloc.get_traced_memory()[0]
        del kept
    finally:
        tracemalloc.stop()
    return (after - before) / n


async def _local(cfg: JSON) -> None:
    _quiet_logs()

    async def memory_rr(cmd: JSON) -> JSON:
        fn = _memory_clstr if cmd["side"] == "clstr" else _memory_baseline
        return await fn(cmd["n"], cfg["inflight"], cmd["warmup"])

    async def hashing(cmd: JSON) -> JSON:
        return measure_shard_for_key(cmd["n"], cmd["repeat"])

    async def hrw(cmd: JSON) -> JSON:
        return measure_hrw(cmd["repeat"])

    async def keyhandler(cmd: JSON) -> JSON:
        return {"bytes_per_key": await _keyhandler_bytes(cmd["n"], cmd["side"])}

    await _serve(
        {
            "memory_rr": memory_rr,
            "shard_for_key": hashing,
            "hrw_assign": hrw,
            "keyhandler_memory": keyhandler,
        }
    )


_ROLES: Final[dict[str, Callable[[JSON], Coroutine[Any, Any, None]]]] = {
    "clstr-node": _clstr_node,
    "raw-node": _raw_node,
    "clstr-client": _clstr_client,
    "raw-client": _raw_client,
    "startup-clstr": _startup_clstr,
    "startup-raw": _startup_raw,
    "local": _local,
}


def _loop_factory(use_uvloop: bool) -> Callable[[], asyncio.AbstractEventLoop] | None:
    if not use_uvloop:
        return None
    try:
        uvloop = importlib.import_module("uvloop")
    except ImportError as exc:
        raise BenchError("--uvloop needs uvloop: pip install 'clstr[bench]'") from exc
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def _run_worker(role: str, cfg: JSON, use_uvloop: bool, profile: str | None) -> int:
    """Run one worker role until the orchestrator closes its stdin.

    With ``profile`` (a file stem), the worker profiles itself with pyinstrument
    and writes ``<stem>.txt`` (call tree), ``<stem>.collapsed`` (stacks, in
    microseconds) and ``<stem>.top.txt`` (:func:`summarise_profile`).
    """
    profiler: Any = None
    if profile:
        pyinstrument = importlib.import_module("pyinstrument")
        # async_mode="disabled": sample whatever the main thread runs, loop included.
        profiler = pyinstrument.Profiler(interval=0.001, async_mode="disabled")
        profiler.start()
    try:
        with asyncio.Runner(loop_factory=_loop_factory(use_uvloop)) as runner:
            runner.run(_ROLES[role](cfg))
    finally:
        if profiler is not None:
            profiler.stop()
            stem = Path(profile or role)
            stem.with_suffix(".txt").write_text(
                profiler.output_text(unicode=True, show_all=False), encoding="utf-8"
            )
            collapsed = _collapse(profiler.last_session.root_frame(trim_stem=False))
            stem.with_suffix(".collapsed").write_text(collapsed, encoding="utf-8")
            stem.with_suffix(".top.txt").write_text(summarise_profile(collapsed), "utf-8")
    return 0


# -- profiles ----------------------------------------------------------------------


def _collapse(root: Any) -> str:
    """A pyinstrument frame tree as collapsed stacks (py-spy's raw format), in µs."""
    lines: list[str] = []

    def name(frame: Any) -> str:
        qualified = f"{frame.class_name}.{frame.function}" if frame.class_name else frame.function
        path = str(frame.file_path_short)
        cut = path.rfind("/clstr/")  # an editable install shows absolute paths
        return f"{qualified} ({path[cut + 1 :] if cut >= 0 else path})"

    def walk(frame: Any, path: str) -> None:
        here = f"{path};{name(frame)}" if path else name(frame)
        own = frame.time - sum(c.time for c in frame.children if not c.is_synthetic)
        if own > 0:
            lines.append(f"{here} {round(own * 1e6)}")
        for child in frame.children:
            if not child.is_synthetic:
                walk(child, here)

    if root is not None:
        walk(root, "")
    return "\n".join(lines) + "\n"


# What an event loop calls while it waits for I/O: idle, not work.
_IDLE_LEAVES: Final = ("epoll.poll", "select", "kqueue.control", "EpollSelector.select (")


def _area(frame: str) -> str:
    """Which layer a py-spy frame (``function (path)``) belongs to."""
    path = frame[frame.rfind("(") + 1 : -1]
    for prefix, area in (
        ("clstr/bench", "benchmark driver"),
        ("clstr/", "clstr"),
        ("nats/", "nats-py"),
        ("asyncio/", "asyncio"),
        ("msgpack", "msgpack"),
        ("<built-in>", "C built-ins (socket, clock, loop lookups)"),
    ):
        if path.startswith(prefix):
            return area
    return "other"


def summarise_profile(collapsed: str, top: int = 25) -> str:
    """Where the time goes, from py-spy's raw (collapsed) stacks.

    Reports the share of busy samples by layer (self time), and the top
    functions by self and by total (inclusive) time, in percent. Samples
    taken while importing (start-up, not the request path) are left out.
    """
    self_time: dict[str, int] = {}
    total_time: dict[str, int] = {}
    areas: dict[str, int] = {}
    samples = imports = 0
    for line in collapsed.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        if "(<frozen importlib._bootstrap>)" in stack:
            imports += count
            continue
        frames = stack.split(";")
        if frames[-1].startswith(_IDLE_LEAVES):
            continue
        samples += count
        leaf = frames[-1]
        self_time[leaf] = self_time.get(leaf, 0) + count
        areas[_area(leaf)] = areas.get(_area(leaf), 0) + count
        for frame in set(frames):
            total_time[frame] = total_time.get(frame, 0) + count
    if not samples:
        return "no samples\n"

    def table(counts: dict[str, int], limit: int) -> list[str]:
        ranked = sorted(counts.items(), key=lambda item: -item[1])[:limit]
        return [f"  {100 * n / samples:5.1f}%  {name}" for name, n in ranked]

    return "\n".join(
        [
            f"busy: {samples} (py-spy: samples; pyinstrument: microseconds); "
            f"waiting for I/O and {imports} of imports left out",
            "",
            "self time by layer:",
            *table(areas, 10),
            "",
            "top functions by self time:",
            *table(self_time, top),
            "",
            "top functions by total time (inclusive):",
            *table(total_time, top),
            "",
        ]
    )


# -- orchestrator side -----------------------------------------------------------

_SCRIPT: Final = os.path.abspath(__file__)


@dataclass(frozen=True, slots=True)
class _ChildOptions:
    uvloop: bool
    timeout: float
    profile_dir: Path | None = None
    #: "pyinstrument" (in the worker) or "py-spy" (from outside).
    profiler: str = "pyinstrument"


def _find_py_spy() -> str | None:
    import shutil
    import sysconfig

    bundled = Path(sysconfig.get_path("scripts")) / "py-spy"
    return str(bundled) if bundled.is_file() else shutil.which("py-spy")


class _Child:
    """A worker process, spoken to over its stdin and stdout.

    ``label`` names its profile files (default: the role).
    """

    def __init__(
        self, role: str, cfg: JSON, options: _ChildOptions, *, label: str | None = None
    ) -> None:
        self.role = role
        self.label = label or role
        self._cfg = cfg
        self._options = options
        self._proc: asyncio.subprocess.Process | None = None
        self._stderr: IO[bytes] | None = None
        self._collapsed: Path | None = None

    async def start(self) -> JSON:
        """Spawn the worker and return its ``ready`` message."""
        command = [
            sys.executable,
            "-P",  # no script directory on sys.path: clstr/ must not shadow the stdlib
            _SCRIPT,
            "--worker",
            self.role,
            "--worker-config",
            json.dumps(self._cfg),
        ]
        options = self._options
        if options.uvloop:
            command.append("--uvloop")
        if options.profile_dir is not None:
            stem = options.profile_dir / (self.label + ("-uvloop" if options.uvloop else ""))
            if options.profiler == "pyinstrument":
                command += ["--profile", str(stem)]
            else:
                py_spy = _find_py_spy()
                if py_spy is None:
                    raise BenchError("py-spy not found: pip install 'clstr[bench]'")
                self._collapsed = stem.with_suffix(".collapsed")
                # Idle samples (the loop waiting in epoll) are left out, so the
                # percentages are of the time the worker spent on the CPU.
                command = [
                    py_spy,
                    "record",
                    "--format",
                    "raw",
                    "--nolineno",
                    "--nonblocking",
                    "--rate",
                    "1000",
                    "--output",
                    str(self._collapsed),
                    "--",
                    *command,
                ]
        # Closed by close(): the file outlives this call, as the process does.
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115
        self._proc = await asyncio.create_subprocess_exec(
            *command,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=self._stderr,
        )
        message = await self._read()
        if not message.get("ready"):
            raise BenchError(f"worker {self.role} sent {message!r} instead of ready")
        return message

    async def call(self, command: JSON) -> JSON:
        """Send one command and return the worker's answer; raise on a failure."""
        proc = self._running()
        assert proc.stdin is not None
        proc.stdin.write((json.dumps(command) + "\n").encode())
        await proc.stdin.drain()
        answer = await self._read()
        if not answer.get("ok"):
            raise BenchError(f"worker {self.role}: {command['op']} failed: {answer.get('error')}")
        return answer

    def _running(self) -> asyncio.subprocess.Process:
        if self._proc is None:
            raise BenchError(f"worker {self.role} is not started")
        return self._proc

    async def _read(self) -> JSON:
        proc = self._running()
        assert proc.stdout is not None
        try:
            async with asyncio.timeout(self._options.timeout):
                while True:
                    line = await proc.stdout.readline()
                    if not line:
                        await proc.wait()
                        raise BenchError(
                            f"worker {self.role} exited with code {proc.returncode}"
                            + self._stderr_tail()
                        )
                    text = line.decode("utf-8", "replace")
                    if text.startswith(_MARK):
                        message: JSON = json.loads(text[len(_MARK) :])
                        return message
        except TimeoutError:
            raise BenchError(
                f"worker {self.role} did not answer within {self._options.timeout:g}s"
                + self._stderr_tail()
            ) from None

    def _stderr_tail(self) -> str:
        if self._stderr is None:
            return ""
        self._stderr.seek(0)
        tail = self._stderr.read().decode("utf-8", "replace").strip().splitlines()[-15:]
        return ("; its stderr ends with:\n  " + "\n  ".join(tail)) if tail else ""

    async def close(self, grace: float = 15.0) -> None:
        """Ask the worker to stop (close its stdin), kill it past ``grace``, reap it."""
        proc = self._proc
        if proc is not None:
            if proc.stdin is not None and not proc.stdin.is_closing():
                proc.stdin.close()
            try:
                async with asyncio.timeout(grace):
                    await proc.wait()
            except TimeoutError:
                proc.kill()
                await proc.wait()
            finally:
                if proc.returncode is None:  # cancelled while waiting
                    proc.kill()
                    await proc.wait()
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None
        if self._collapsed is not None and self._collapsed.exists():
            summary = summarise_profile(self._collapsed.read_text(encoding="utf-8"))
            self._collapsed.with_suffix(".top.txt").write_text(summary, encoding="utf-8")
            self._collapsed = None


class _Progress:
    """A one-line progress bar on stderr (plain lines when stderr is not a terminal)."""

    def __init__(self, total: int, *, enabled: bool, stream: IO[str] | None = None) -> None:
        self.total = max(total, 1)
        self.done = 0
        self._stream = stream if stream is not None else sys.stderr
        self._enabled = enabled
        self._tty = self._stream.isatty()
        self._started = time.perf_counter()

    def begin(self, label: str) -> None:
        """Show what runs now."""
        if not self._enabled:
            return
        elapsed = time.perf_counter() - self._started
        if self._tty:
            width = 28
            filled = width * self.done // self.total
            bar = "#" * filled + "-" * (width - filled)
            line = f"\r[{bar}] {self.done:>3}/{self.total} {elapsed:5.0f}s  {label}"
            self._stream.write(line[:120].ljust(120))
        else:
            self._stream.write(f"[{self.done:>3}/{self.total}] {elapsed:5.1f}s {label}\n")
        self._stream.flush()

    def advance(self) -> None:
        """Count one step as done."""
        self.done += 1

    def close(self) -> None:
        """End the bar's line."""
        if self._enabled and self._tty:
            self._stream.write("\r" + " " * 120 + "\r")
            self._stream.flush()


# Per row name: the per-run (clstr, baseline) figures, and extra details.
_Samples = dict[str, list[tuple[float, float]]]


@dataclass(slots=True)
class _Collected:
    samples: _Samples = field(default_factory=dict)
    extra: dict[str, JSON] = field(default_factory=dict)
    # Per row, per process: the per-run CPU microseconds per message of each side.
    cpu_samples: dict[str, dict[str, list[tuple[float, float]]]] = field(default_factory=dict)

    def add(self, name: str, clstr: float, baseline: float) -> None:
        self.samples.setdefault(name, []).append((clstr, baseline))

    def note(self, name: str, **details: Any) -> None:
        self.extra.setdefault(name, {}).update(details)

    def cpu(self, name: str, process: str, clstr: float, baseline: float) -> None:
        self.cpu_samples.setdefault(name, {}).setdefault(process, []).append((clstr, baseline))

    def cpu_notes(self, name: str) -> JSON:
        """Median CPU µs per message by process and side, and the CPU-cost ratio.

        ``cpu_ratio`` is the baseline's total CPU per message over clstr's: a
        throughput-like ratio (higher is better) that machine load moves little.
        """
        per_process = self.cpu_samples.get(name)
        if not per_process:
            return {}
        notes: JSON = {}
        totals = [0.0, 0.0]
        for process, pairs in per_process.items():
            for i, side in enumerate(("clstr", "baseline")):
                value = float(statistics.median(p[i] for p in pairs))
                notes[f"{side}_{process}_cpu_us"] = value
                totals[i] += value
        notes["cpu_ratio"] = totals[1] / totals[0] if totals[0] else math.inf
        return notes


def _side_order(run_index: int) -> tuple[str, str]:
    """Alternate which side goes first, so that neither always runs on a warmer machine."""
    return ("clstr", "raw") if run_index % 2 == 0 else ("raw", "clstr")


async def _bench_nats(
    url: str,
    groups: Sequence[str],
    sizes: Sizes,
    runs: int,
    options: _ChildOptions,
    progress: _Progress,
    out: _Collected,
) -> None:
    cfg = {
        "url": url,
        "shards": sizes.nats_shards,
        "inflight": sizes.inflight,
        "timeout": options.timeout,
        "max_pending": sizes.notify_messages + 1_000,
    }
    nodes = {side: _Child(f"{side}-node", cfg, options) for side in ("clstr", "raw")}
    clients = {side: _Child(f"{side}-client", cfg, options) for side in ("clstr", "raw")}
    async with contextlib.AsyncExitStack() as stack:
        for child in (*nodes.values(), *clients.values()):
            stack.push_async_callback(child.close)
        progress.begin("starting NATS workers (2 nodes, 2 clients)")
        await asyncio.gather(*(c.start() for c in (*nodes.values(), *clients.values())))
        progress.advance()
        commands: dict[str, JSON] = {
            "nats_rr": {"n": sizes.rr_requests, "warmup": sizes.rr_warmup},
            "nats_latency": {"n": sizes.latency_requests, "warmup": sizes.latency_warmup},
            "nats_notify": {"n": sizes.notify_messages},
        }
        for run_index in range(runs):
            for group in groups:
                answers: dict[str, JSON] = {}
                for side in _side_order(run_index):
                    progress.begin(f"{group}: {side} (run {run_index + 1}/{runs})")
                    command = {"op": group, **commands[group]}
                    before = (await nodes[side].call({"op": "cpu"}))["cpu"]
                    answers[side] = await clients[side].call(command)
                    node_cpu = (await nodes[side].call({"op": "cpu"}))["cpu"] - before
                    # The node's figure covers the warm-up too.
                    handled = command["n"] + command.get("warmup", 0)
                    answers[side]["node_cpu_us"] = node_cpu / handled * 1e6
                    progress.advance()
                clstr, raw = answers["clstr"], answers["raw"]
                if group == "nats_latency":
                    out.add("nats_latency_p50", clstr["p50"], raw["p50"])
                    out.add("nats_latency_p99", clstr["p99"], raw["p99"])
                    out.note("nats_latency_p50", clstr_mean_us=clstr["mean"])
                    out.note("nats_latency_p50", raw_mean_us=raw["mean"])
                else:
                    row = f"{group}_throughput"
                    out.add(row, clstr["rate"], raw["rate"])
                    out.cpu(row, "client", clstr["cpu_us"], raw["cpu_us"])
                    out.cpu(row, "node", clstr["node_cpu_us"], raw["node_cpu_us"])


async def _bench_startup(
    url: str, sizes: Sizes, runs: int, options: _ChildOptions, progress: _Progress, out: _Collected
) -> None:
    cfg = {"url": url, "shards": sizes.startup_shards}
    details: dict[str, list[JSON]] = {"clstr": [], "raw": []}
    for run_index in range(runs):
        figures: dict[str, tuple[float, float]] = {}
        for side in _side_order(run_index):
            progress.begin(f"node_startup: {side} (run {run_index + 1}/{runs})")
            child = _Child(f"startup-{side}", cfg, options)
            try:
                spawned = time.perf_counter()
                ready = await child.start()
                wall_ms = (time.perf_counter() - spawned) * 1e3
            finally:
                await child.close()
            if ready["subscriptions"] != sizes.startup_shards:
                raise BenchError(f"startup-{side} reported {ready['subscriptions']} subscriptions")
            figures[side] = (wall_ms, ready["rss_mib"])
            details[side].append(ready)
            progress.advance()
        out.add("node_startup_time", figures["clstr"][0], figures["raw"][0])
        out.add("node_rss", figures["clstr"][1], figures["raw"][1])
    for side, readies in details.items():
        out.note(
            "node_startup_time",
            **{
                f"{side}_{k}": _median_of(readies, k)
                for k in ("import_ms", "connect_ms", "subscribe_ms")
            },
        )
        out.note(
            "node_rss",
            **{f"{side}_rss_connected_mib": _median_of(readies, "rss_connected_mib")},
        )


async def _bench_local(
    groups: Sequence[str],
    sizes: Sizes,
    runs: int,
    options: _ChildOptions,
    progress: _Progress,
    out: _Collected,
) -> None:
    cfg = {"inflight": sizes.inflight}
    # The memory benchmark's sides get a process each, so that their profiles
    # stay apart; the other in-process measurements share one.
    workers = {"local": _Child("local", cfg, options)}
    if "memory_rr" in groups:
        for side in ("clstr", "raw"):
            workers[side] = _Child("local", cfg, options, label=f"memory-{side}")
    async with contextlib.AsyncExitStack() as stack:
        for worker in workers.values():
            stack.push_async_callback(worker.close)
        progress.begin("starting the in-process workers")
        await asyncio.gather(*(w.start() for w in workers.values()))
        progress.advance()
        local = workers["local"]
        for run_index in range(runs):
            label = f"(run {run_index + 1}/{runs})"
            if "memory_rr" in groups:
                answers: dict[str, JSON] = {}
                for side in _side_order(run_index):
                    progress.begin(f"memory_rr: {side} {label}")
                    command = {
                        "op": "memory_rr",
                        "side": side,
                        "n": sizes.memory_requests,
                        "warmup": sizes.rr_warmup,
                    }
                    answers[side] = await workers[side].call(command)
                    progress.advance()
                clstr, raw = answers["clstr"], answers["raw"]
                out.add("memory_rr_throughput", clstr["rate"], raw["rate"])
                out.cpu("memory_rr_throughput", "process", clstr["cpu_us"], raw["cpu_us"])
            if "shard_for_key" in groups:
                progress.begin(f"shard_for_key {label}")
                t = await local.call(
                    {"op": "shard_for_key", "n": sizes.hash_keys, "repeat": sizes.hash_repeat}
                )
                progress.advance()
                out.add("shard_for_key_rate", 1 / t["shard_for_key"], 1 / t["bare"])
                out.add("shard_mapper_rate", 1 / t["mapper"], 1 / t["bare"])
                out.note("shard_for_key_rate", str_keys_per_s=1 / t["shard_for_key_str"])
                out.note("shard_mapper_rate", str_keys_per_s=1 / t["mapper_str"])
            if "hrw_assign" in groups:
                progress.begin(f"hrw_assign {label}")
                t = await local.call({"op": "hrw_assign", "repeat": sizes.hrw_repeat})
                progress.advance()
                out.add("hrw_assign_time", t["assign"] * 1e3, t["raw"] * 1e3)
            if "keyhandler_memory" in groups:
                per_key: dict[str, float] = {}
                for side in _side_order(run_index):
                    progress.begin(f"keyhandler_memory: {side} {label}")
                    command = {"op": "keyhandler_memory", "side": side, "n": sizes.live_keys}
                    per_key[side] = (await local.call(command))["bytes_per_key"]
                    progress.advance()
                out.add("keyhandler_bytes_per_key", per_key["clstr"], per_key["raw"])
                out.note("keyhandler_bytes_per_key", live_keys=sizes.live_keys)


def _steps(groups: Sequence[str], runs: int) -> int:
    per_run = {
        "nats_rr": 2,
        "nats_latency": 2,
        "nats_notify": 2,
        "memory_rr": 2,
        "shard_for_key": 1,
        "hrw_assign": 1,
        "keyhandler_memory": 2,
        "node_startup": 2,
    }
    total = runs * sum(per_run[g] for g in groups)
    if any(g in _NATS_GROUPS for g in groups):
        total += 1
    if any(g in _LOCAL_GROUPS for g in groups):
        total += 1
    return total


@dataclass(slots=True)
class Row:
    """One measured row: medians of both sides and of the per-run ratios."""

    name: str
    what: str
    baseline_what: str
    unit: str
    clstr: float
    baseline: float
    ratio: float
    target: float | None
    target_text: str
    higher_is_better: bool
    passed: bool | None
    runs: list[JSON]
    extra: JSON


def _rows(collected: _Collected) -> list[Row]:
    rows = []
    for spec in SPECS:
        pairs = collected.samples.get(spec.name)
        if not pairs:
            continue
        ratios = [c / b if b else math.inf for c, b in pairs]
        ratio = statistics.median(ratios)
        rows.append(
            Row(
                name=spec.name,
                what=spec.what,
                baseline_what=spec.baseline,
                unit=spec.unit,
                clstr=statistics.median(c for c, _ in pairs),
                baseline=statistics.median(b for _, b in pairs),
                ratio=ratio,
                target=spec.target,
                target_text=spec.target_text(),
                higher_is_better=spec.higher_is_better,
                passed=spec.passed(ratio),
                runs=[
                    {"clstr": c, "baseline": b, "ratio": r}
                    for (c, b), r in zip(pairs, ratios, strict=True)
                ],
                extra={**collected.extra.get(spec.name, {}), **collected.cpu_notes(spec.name)},
            )
        )
    return rows


# -- reporting ---------------------------------------------------------------------


def _fmt(value: float, unit: str) -> str:
    if value >= 1e6:
        return f"{value / 1e6:.2f}M {unit}"
    if value >= 1e4:
        return f"{value:,.0f} {unit}"
    if value >= 100:
        return f"{value:.0f} {unit}"
    return f"{value:.3g} {unit}"


def _verdict(passed: bool | None) -> str:
    return {True: "pass", False: "FAIL", None: "-"}[passed]


def format_table(rows: Sequence[Row]) -> str:
    """The results as a fixed-width text table."""
    header = ("measurement", "clstr", "baseline", "ratio", "CPU", "target", "")
    lines = [
        (
            r.name,
            _fmt(r.clstr, r.unit),
            _fmt(r.baseline, r.unit),
            f"{r.ratio:.2f}x",
            _cpu_text(r),
            r.target_text,
            _verdict(r.passed),
        )
        for r in rows
    ]
    widths = [max(len(str(x[i])) for x in [header, *lines]) for i in range(len(header))]
    out = []
    for cells in [header, *lines]:
        out.append(
            "  ".join(
                str(c).rjust(w) if 0 < i < 5 else str(c).ljust(w)
                for i, (c, w) in enumerate(zip(cells, widths, strict=True))
            ).rstrip()
        )
        if cells is header:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def _cpu_text(row: Row) -> str:
    cpu = row.extra.get("cpu_ratio")
    return f"{cpu:.2f}x" if isinstance(cpu, float) else "-"


def markdown_table(rows: Sequence[Row]) -> str:
    """The results as a Markdown table."""
    out = [
        "| measurement | compared with | clstr | baseline | ratio | CPU ratio | target | |",
        "|---|---|--:|--:|--:|--:|--:|---|",
    ]
    for r in rows:
        out.append(
            f"| {r.what} | {r.baseline_what} | {_fmt(r.clstr, r.unit)} | "
            f"{_fmt(r.baseline, r.unit)} | **{r.ratio:.2f}x** | {_cpu_text(r)} | "
            f"{r.target_text} | {_verdict(r.passed)} |"
        )
    return "\n".join(out)


_MARKDOWN_TEMPLATE: Final = """# Benchmarks

Measured with `clstr bench`; see the sections below.
"""


def update_markdown(text: str, section: str, body: str) -> str:
    """Replace the text between the ``clstr-bench:<section>`` markers of ``text``.

    Markers that are missing are appended at the end, with ``body`` between them.
    """
    start = f"<!-- clstr-bench:{section}:start -->"
    end = f"<!-- clstr-bench:{section}:end -->"
    block = f"{start}\n{body.strip()}\n{end}"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.DOTALL)
    if pattern.search(text):
        return pattern.sub(lambda _m: block, text, count=1)
    return text.rstrip("\n") + "\n\n" + block + "\n"


def _markdown_section(rows: Sequence[Row], meta: JSON) -> str:
    failing = [r.name for r in rows if r.passed is False]
    summary = "every target met" if not failing else f"targets missed: {', '.join(failing)}"
    return (
        f"Measured {meta['date']} on {meta['machine']['cpu']} "
        f"({meta['machine']['cpus']} CPUs), Python {meta['python']}, "
        f"event loop **{meta['loop']}**, nats-py {meta['nats_py']}, "
        f"nats-server {meta['nats_server']}; median of {meta['runs']} runs; {summary}.\n\n"
        f"```\n{meta['command']}\n```\n\n" + markdown_table(rows)
    )


def write_plot(rows: Sequence[Row], path: Path, title: str) -> None:
    """A PNG bar chart of the ratios, with each row's target marked (matplotlib, Agg).

    Raises :class:`BenchError` when matplotlib is not installed.
    """
    try:
        matplotlib = importlib.import_module("matplotlib")
    except ImportError as exc:
        raise BenchError("--plot needs matplotlib: pip install 'clstr[bench]'") from exc
    matplotlib.use("Agg")
    plt = importlib.import_module("matplotlib.pyplot")
    shown = list(reversed(rows))
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(shown) + 1.6))
    colours = {True: "#2e8b57", False: "#c0392b", None: "#8c8c8c"}
    ys = range(len(shown))
    ax.barh(ys, [r.ratio for r in shown], color=[colours[r.passed] for r in shown], height=0.6)
    for y, r in zip(ys, shown, strict=True):
        if r.target is not None:
            ax.plot([r.target, r.target], [y - 0.4, y + 0.4], color="black", linewidth=2)
        sign = ">=" if r.higher_is_better else "<="
        goal = f"  (target {sign} {r.target:g})" if r.target is not None else "  (report)"
        # Right of the bar and of its target tick, so that neither hides the text.
        ax.text(
            max(r.ratio, r.target or 0.0) + 0.02,
            y,
            f"{r.ratio:.2f}x{goal}",
            va="center",
            fontsize=8,
        )
    ax.axvline(1.0, color="#555555", linestyle="--", linewidth=0.8)
    ax.set_yticks(list(ys), [r.name for r in shown], fontsize=8)
    ax.set_xlabel("clstr / baseline (rates: higher is better; times, memory: lower is better)")
    ax.set_xlim(0, max(2.0, max(r.ratio for r in shown) * 1.35))
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _nats_server_version() -> str:
    try:
        from clstr.testing import find_nats_server

        out = subprocess.run(
            [find_nats_server(), "--version"], capture_output=True, text=True, timeout=10
        )
        return out.stdout.strip().split()[-1]
    except Exception:
        return "unknown"


def _meta(args: argparse.Namespace, sizes: Sizes, runs: int) -> JSON:
    from importlib.metadata import PackageNotFoundError, version

    def pkg(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    loop = f"uvloop {pkg('uvloop')}" if args.uvloop else "asyncio"
    return {
        "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": {"cpu": _cpu_model(), "cpus": os.cpu_count(), "platform": platform.platform()},
        "python": platform.python_version(),
        "loop": loop,
        "nats_py": pkg("nats-py"),
        "nats_server": _nats_server_version(),
        "clstr": pkg("clstr"),
        "runs": runs,
        "quick": args.quick,
        "sizes": asdict(sizes),
        "command": "clstr bench " + " ".join(args.argv_echo),
    }


# -- command line ----------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``clstr bench`` options to ``parser``."""
    parser.add_argument(
        "--quick", action="store_true", help="tiny counts, one run: proves it works (CI)"
    )
    parser.add_argument(
        "--runs", type=int, default=None, help="runs per measurement; report medians (3)"
    )
    parser.add_argument(
        "--only",
        default="",
        metavar="NAME,...",
        help=f"run only these measurements: {', '.join(GROUPS)}",
    )
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON")
    parser.add_argument(
        "--markdown",
        metavar="PATH",
        help="update the results table in this Markdown file (docs/benchmarks.md)",
    )
    parser.add_argument(
        "--plot", metavar="PATH", help="write a PNG bar chart of the ratios (needs matplotlib)"
    )
    parser.add_argument(
        "--uvloop", action="store_true", help="run both sides on uvloop (needs uvloop)"
    )
    parser.add_argument(
        "--profile",
        metavar="DIR",
        help="profile every worker; write DIR/<worker>.top.txt (py-spy) or DIR/<worker>.txt",
    )
    parser.add_argument(
        "--profiler",
        choices=("pyinstrument", "py-spy"),
        default="pyinstrument",
        help="pyinstrument (in-process, default) or py-spy (outside; biased to syscalls)",
    )
    parser.add_argument(
        "--nats-url", metavar="URL", help="use this nats-server instead of starting one"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="seconds any one step may take before the run is aborted (300; quick: 60)",
    )
    parser.add_argument(
        "--strict", action="store_true", help="exit with status 1 when a target is missed"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    # Internal: how the orchestrator starts its worker processes.
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker-config", default="{}", help=argparse.SUPPRESS)


def _selected(only: str) -> list[str]:
    if not only:
        return list(GROUPS)
    wanted = [name.strip() for name in only.split(",") if name.strip()]
    unknown = [name for name in wanted if name not in GROUPS]
    if unknown:
        raise BenchError(f"unknown measurement(s) {unknown}; choose from {', '.join(GROUPS)}")
    return [g for g in GROUPS if g in wanted]


async def _measure(
    args: argparse.Namespace, groups: Sequence[str], sizes: Sizes, runs: int
) -> list[Row]:
    timeout = args.timeout if args.timeout is not None else (60.0 if args.quick else 300.0)
    options = _ChildOptions(
        uvloop=args.uvloop,
        timeout=timeout,
        profile_dir=Path(args.profile) if args.profile else None,
        profiler=args.profiler,
    )
    _loop_factory(args.uvloop)  # fail early when uvloop is missing
    progress = _Progress(_steps(groups, runs), enabled=not args.no_progress)
    out = _Collected()
    nats_groups = [g for g in groups if g in _NATS_GROUPS]
    try:
        if nats_groups or "node_startup" in groups:
            async with contextlib.AsyncExitStack() as stack:
                url = args.nats_url
                if url is None:
                    from clstr.testing import NatsServer

                    server = await stack.enter_async_context(NatsServer(jetstream=False))
                    url = server.url
                if nats_groups:
                    await _bench_nats(url, nats_groups, sizes, runs, options, progress, out)
                if "node_startup" in groups:
                    await _bench_startup(url, sizes, runs, options, progress, out)
        local = [g for g in groups if g in _LOCAL_GROUPS]
        if local:
            await _bench_local(local, sizes, runs, options, progress, out)
    finally:
        progress.close()
    return _rows(out)


def run(args: argparse.Namespace) -> int:
    """Run ``clstr bench`` with parsed ``args``; return the exit status."""
    if args.worker:
        return _run_worker(args.worker, json.loads(args.worker_config), args.uvloop, args.profile)
    try:
        groups = _selected(args.only)
        sizes = QUICK_SIZES if args.quick else FULL_SIZES
        runs = args.runs if args.runs is not None else (1 if args.quick else 3)
        if runs < 1:
            raise BenchError(f"--runs must be >= 1, got {runs}")
        if args.profile:
            if args.profiler == "pyinstrument" and importlib.util.find_spec("pyinstrument") is None:
                raise BenchError("--profile needs pyinstrument: pip install 'clstr[bench]'")
            if args.profiler == "py-spy" and _find_py_spy() is None:
                raise BenchError("--profile needs py-spy: pip install 'clstr[bench]'")
            args.profile = os.path.abspath(args.profile)
            Path(args.profile).mkdir(parents=True, exist_ok=True)
        if not hasattr(args, "argv_echo"):
            args.argv_echo = _echo_argv(args)
        rows = asyncio.run(_measure(args, groups, sizes, runs))
        meta = _meta(args, sizes, runs)
        print(f"clstr bench: {meta['loop']}, median of {runs} run(s)")
        print(format_table(rows))
        if args.json:
            payload = {"meta": meta, "results": [asdict(r) for r in rows]}
            Path(args.json).write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
        if args.markdown:
            path = Path(args.markdown)
            text = path.read_text(encoding="utf-8") if path.exists() else _MARKDOWN_TEMPLATE
            section = "uvloop" if args.uvloop else "asyncio"
            path.write_text(update_markdown(text, section, _markdown_section(rows, meta)))
        if args.plot:
            write_plot(rows, Path(args.plot), f"clstr / baseline, {meta['loop']}, {meta['date']}")
    except BenchError as exc:
        print(f"clstr bench: {exc}", file=sys.stderr)
        return 1
    if args.strict and any(r.passed is False for r in rows):
        return 1
    return 0


def _echo_argv(args: argparse.Namespace) -> list[str]:
    """The options of this run that shape the results, as a command line (for the reports)."""
    echo = []
    for flag in ("quick", "uvloop"):
        if getattr(args, flag):
            echo.append(f"--{flag}")
    for option in ("runs", "only", "markdown", "plot"):
        value = getattr(args, option)
        if value:
            echo.append(f"--{option} {value}")
    return echo


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m clstr.bench``: the same as ``clstr bench``."""
    parser = argparse.ArgumentParser(
        prog="clstr bench", description=(__doc__ or "").splitlines()[0]
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
