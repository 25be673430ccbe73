"""Request/reply and notify over NATS: clstr's client and node against a raw
nats-py requester and responder (groups ``nats_rr``, ``nats_latency``,
``nats_notify``).

The three groups share one stage: for each side a node process and a client
process, so that a figure is always *1 client process + 1 node process* for
clstr and for raw nats-py alike. Both sides use 64 shard subjects with a
queue group, 1024 keys and 100-byte payloads; the node echoes requests and
counts notifications, and signals the end of a notify burst once it has
counted every message. Each worker also reports its CPU time per message.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Final

from ._group import Context, Group, Workers
from ._pairs import add_throughput, both_sides, pair_stage
from ._protocol import JSON, Op, cpu, quiet_logs, serve
from ._specs import CLSTR_PREFIX, KEYS, PAYLOAD_BYTES, Spec
from ._timing import latency, throughput

#: The raw side's subjects; the node's end-of-burst signal, per side.
_RAW_SHARD: Final = "rawbench.shard.{}"
_RAW_CONTROL: Final = "rawbench.control"
_DONE_SUBJECT: Final = "benchdone.{}"

_SEQUENTIAL_BASELINE: Final = "raw nats-py request -> raw responder, sequential"

_RR_SPECS: Final = (
    Spec(
        "nats_rr_throughput",
        "nats_rr",
        "request/reply throughput over NATS (256 in flight, 100 B)",
        "raw nats-py request -> raw nats-py responder",
        "req/s",
        True,
        0.85,
    ),
)
_LATENCY_SPECS: Final = (
    Spec(
        "nats_latency_p50",
        "nats_latency",
        "sequential request latency p50 over NATS",
        _SEQUENTIAL_BASELINE,
        "us",
        False,
        1.15,
    ),
    Spec(
        "nats_latency_p99",
        "nats_latency",
        "sequential request latency p99 over NATS",
        _SEQUENTIAL_BASELINE,
        "us",
        False,
        1.15,
    ),
)
_NOTIFY_SPECS: Final = (
    Spec(
        "nats_notify_throughput",
        "nats_notify",
        "notify throughput over NATS, end to end (all handled)",
        "raw nats-py publish -> raw subscriber (all received)",
        "msg/s",
        True,
        0.85,
    ),
)


# -- the workers -------------------------------------------------------------------


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


async def clstr_node(cfg: JSON) -> None:
    """A clstr node: echoes ``echo``, counts ``count``, ``arm`` sets the burst size."""
    from clstr import Envelope, Node
    from clstr.transports.nats import NatsOptions, NatsTransport

    quiet_logs()
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
        prefix=CLSTR_PREFIX,
        node_id="bench-node",
        # Notify has no back-pressure: let the whole burst queue rather than
        # shed it as "overloaded", as the raw subscriber's queue would.
        max_pending=cfg["max_pending"],
    )
    try:
        await node.start()
        await serve({"cpu": cpu})
    finally:
        await node.stop()
        await transport.close()


async def raw_node(cfg: JSON) -> None:
    """A raw nats-py responder on the shard subjects (never imports clstr)."""
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
        await serve({"cpu": cpu})
    finally:
        await nc.drain()


@dataclass(slots=True)
class _ClientSide:
    """What a NATS client worker does, on either side: the three benchmarked calls."""

    request: Callable[[int], Awaitable[object]]
    notify: Callable[[int], Awaitable[object]]
    arm: Callable[[int], Awaitable[object]]
    done: asyncio.Event = field(default_factory=asyncio.Event)


def _client_ops(side: _ClientSide, cfg: JSON) -> dict[str, Op]:
    inflight = cfg["inflight"]
    timeout = cfg["timeout"]

    async def rr(cmd: JSON) -> JSON:
        return await throughput(side.request, cmd["n"], cmd["warmup"], inflight)

    async def sequential(cmd: JSON) -> JSON:
        return await latency(side.request, cmd["n"], cmd["warmup"])

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

    return {"nats_rr": rr, "nats_latency": sequential, "nats_notify": notify}


async def clstr_client(cfg: JSON) -> None:
    """A clstr client sending keyed requests and notifications to the clstr node."""
    from clstr import Client
    from clstr.transports.nats import NatsOptions, NatsTransport

    quiet_logs()
    transport = await NatsTransport.connect(cfg["url"], NatsOptions(name="bench-clstr-client"))
    client = Client(transport, num_shards=cfg["shards"], prefix=CLSTR_PREFIX, timeout=10.0)
    keys = [f"key-{i}" for i in range(KEYS)]
    payload = os.urandom(PAYLOAD_BYTES)

    async def request(i: int) -> object:
        return await client.request_key(keys[i % KEYS], "echo", payload)

    async def notify(i: int) -> None:
        await client.notify_key(keys[i % KEYS], "count", payload)

    async def arm(n: int) -> object:
        return await client.request_key("control", "arm", str(n).encode())

    side = _ClientSide(request, notify, arm)
    try:
        await transport.subscribe(_DONE_SUBJECT.format("clstr"), lambda _d, _r: side.done.set())
        await serve(_client_ops(side, cfg))
    finally:
        await client.close()
        await transport.close()


async def raw_client(cfg: JSON) -> None:
    """A raw nats-py requester and publisher on the shard subjects (never imports clstr)."""
    import nats

    nc = await nats.connect(cfg["url"], name="bench-raw-client")
    subjects = [_RAW_SHARD.format(s) for s in range(cfg["shards"])]
    count = len(subjects)
    payload = os.urandom(PAYLOAD_BYTES)

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
        await serve(_client_ops(side, cfg))
    finally:
        await nc.drain()


# -- the orchestrator's side -------------------------------------------------------------

_ROLES: Final = {
    "clstr-node": clstr_node,
    "raw-node": raw_node,
    "clstr-client": clstr_client,
    "raw-client": raw_client,
}


def _config(context: Context) -> JSON:
    sizes = context.sizes
    return {
        "url": context.url,
        "shards": sizes.nats_shards,
        "inflight": sizes.inflight,
        "timeout": context.options.timeout,
        "max_pending": sizes.notify_messages + 1_000,
    }


_PAIR: Final = pair_stage(_ROLES, _config, what="NATS workers (2 nodes, 2 clients)")


async def _measure_rr(context: Context, workers: Workers, run_index: int) -> None:
    sizes = context.sizes
    command = {"n": sizes.rr_requests, "warmup": sizes.rr_warmup}
    answers = await both_sides(context, workers, run_index, "nats_rr", command)
    add_throughput(context, "nats_rr_throughput", answers)


async def _measure_latency(context: Context, workers: Workers, run_index: int) -> None:
    sizes = context.sizes
    command = {"n": sizes.latency_requests, "warmup": sizes.latency_warmup}
    answers = await both_sides(context, workers, run_index, "nats_latency", command)
    clstr, raw = answers["clstr"], answers["raw"]
    out = context.out
    out.add("nats_latency_p50", clstr["p50"], raw["p50"])
    out.add("nats_latency_p99", clstr["p99"], raw["p99"])
    out.note("nats_latency_p50", clstr_mean_us=clstr["mean"])
    out.note("nats_latency_p50", raw_mean_us=raw["mean"])


async def _measure_notify(context: Context, workers: Workers, run_index: int) -> None:
    command = {"n": context.sizes.notify_messages}
    answers = await both_sides(context, workers, run_index, "nats_notify", command)
    add_throughput(context, "nats_notify_throughput", answers)


RR: Final = Group(name="nats_rr", specs=_RR_SPECS, steps=2, stage=_PAIR, measure=_measure_rr)
LATENCY: Final = Group(
    name="nats_latency", specs=_LATENCY_SPECS, steps=2, stage=_PAIR, measure=_measure_latency
)
NOTIFY: Final = Group(
    name="nats_notify", specs=_NOTIFY_SPECS, steps=2, stage=_PAIR, measure=_measure_notify
)
