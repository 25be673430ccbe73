"""The event bus (groups ``eventbus_ingest`` and ``eventbus_jetstream``), each
against the raw primitive it wraps.

* ``eventbus_ingest``: ``bus.ingest(event)`` into the rings (large enough that
  nothing waits or yields) against ``collections.deque.append`` of the same
  events, in the in-process worker, timed in CPU time (on a shared machine
  the time spent descheduled is not the code's), best of a few passes each.
* ``eventbus_jetstream``: events ingested until ``flush()`` returned (every
  frame acknowledged by JetStream) against raw nats-py publishing the same
  batches: the same frames (1024 events of one shard, the same bytes and
  message ids), encoded before its clock starts, sent with
  ``js.publish_async`` and every ack awaited. The bus's figure includes
  ingest, routing, batching, encoding and publishing, the baseline only the
  publishing. Each side runs in a process of its own (``eventbus-clstr``,
  ``eventbus-raw``), in wall time; each run uses new streams and deletes them.

Events are 100 bytes over 1000 keys, on 4 bus shards. ``benchmarks/bench_eventbus.py``
uses these functions for the same rows and measures more (other ingest paths,
memory per slot, polls).
"""

from __future__ import annotations

import asyncio
import collections
import gc
import time
from typing import TYPE_CHECKING, Any, Final

from ._group import Context, Workers, side_order
from ._local import NEAR_NATS, InProcessGroup
from ._protocol import JSON
from ._specs import Spec

if TYPE_CHECKING:
    from clstr.eventbus import BusConfig, Event
    from clstr.transports.nats import NatsTransport

SHARDS: Final = 4
KEYS: Final = 1000
PAYLOAD: Final = b"x" * 100

#: What the bench's streams are called (the raw side's gets a ``raw_`` prefix).
_STREAM_BASE: Final = "benchbus"

_INGEST_SPECS: Final = (
    Spec(
        "eventbus_ingest_rate",
        "eventbus_ingest",
        "EventBus.ingest(event) into the rings (4 shards, 100 B, CPU time)",
        "collections.deque.append of the same events",
        "events/s",
        True,
        0.015,
    ),
)
_JETSTREAM_SPECS: Final = (
    Spec(
        "eventbus_jetstream_rate",
        "eventbus_jetstream",
        "EventBus into JetStream end to end: ingest -> flush() (all frames acked)",
        "raw nats-py js.publish_async of the same pre-built frames, every ack awaited",
        "events/s",
        True,
        0.08,
    ),
)


def events(n: int, *, unique: bool = False) -> list[Event]:
    """``n`` events of 100 bytes: over 1000 keys, or (``unique``) each its own key."""
    from clstr.eventbus import Event

    if unique:
        return [Event(f"event-{i}", PAYLOAD, "click") for i in range(n)]
    pool = [Event(f"user-{i}", PAYLOAD, "click") for i in range(KEYS)]
    return [pool[i % KEYS] for i in range(n)]


def big_ring(n: int, **settings: Any) -> BusConfig:
    """A bus configuration whose rings hold ``n`` events: ingest never waits."""
    from clstr.eventbus import BusConfig

    return BusConfig(name="bench", shards=SHARDS, ring_capacity=n, **settings)


async def ingest_seconds(batch: list[Event]) -> float:
    """CPU seconds of ``bus.ingest`` over ``batch``, into rings that hold it all."""
    from clstr.eventbus import EventBus

    bus = EventBus(big_ring(len(batch)))
    await bus.start()
    ingest = bus.ingest
    gc.collect()
    started = time.process_time()
    for event in batch:
        ingest(event)
    elapsed = time.process_time() - started
    await bus.shutdown()
    return elapsed


def deque_seconds(batch: list[Event]) -> float:
    """CPU seconds of ``deque.append`` over ``batch``."""
    ring: collections.deque[Event] = collections.deque()
    append = ring.append
    gc.collect()
    started = time.process_time()
    for event in batch:
        append(event)
    return time.process_time() - started


async def bus_to_jetstream(transport: NatsTransport, name: str, batch: list[Event]) -> float:
    """Wall seconds from the first ``ingest`` of ``batch`` into a bus named ``name``
    (JetStream adapter) to ``flush()`` returning. Leaves the bus's stream in place."""
    from clstr.eventbus import BackpressureError, BusConfig, EventBus, JetStreamAdapter

    bus = EventBus(BusConfig(name=name, shards=SHARDS, adapter=JetStreamAdapter(transport)))
    await bus.start()
    ingest, ingest_wait = bus.ingest, bus.ingest_wait
    started = time.perf_counter()
    for i, event in enumerate(batch):
        try:
            ingest(event)
        except BackpressureError:
            await ingest_wait(event)
        if i & 1023 == 1023:
            await asyncio.sleep(0)  # let the shard workers dispatch, as a producer would
    await bus.flush()
    elapsed = time.perf_counter() - started
    stats = await bus.shutdown()
    if stats.events_dispatched != len(batch):
        raise RuntimeError(f"the bus dispatched {stats.events_dispatched} of {len(batch)} events")
    return elapsed


async def raw_to_jetstream(js: Any, name: str, batch: list[Event]) -> float:
    """The primitive under the adapter: the same batches (1024 events of a shard, the
    same frame bytes and message ids), built before the clock starts, published with
    ``js.publish_async`` to the stream ``raw_<name>`` and every ack awaited; wall
    seconds. Leaves the stream in place."""
    from nats.js.api import StreamConfig

    from clstr.eventbus import encode_frames
    from clstr.hashing import ShardMapper

    subject = f"raw.{name}"
    await js.add_stream(StreamConfig(name=f"raw_{name}", subjects=[f"{subject}.*"]))
    mapper = ShardMapper(SHARDS).shard
    per_shard: list[list[Any]] = [[] for _ in range(SHARDS)]
    for e in batch:
        per_shard[mapper(e.key)].append((time.time_ns(), e.key, e.payload, e.type, e.headers))
    frames = []
    for shard, records in enumerate(per_shard):
        for first in range(0, len(records), 1024):
            chunk = records[first : first + 1024]
            for frame in encode_frames(f"raw.{name}", shard, first, chunk, 1 << 20):
                frames.append((f"{subject}.{shard}", frame.msg_id, frame.data))
    publish = js.publish_async
    started = time.perf_counter()
    futures = [
        await publish(subj, data, headers={"Nats-Msg-Id": msg_id}) for subj, msg_id, data in frames
    ]
    await asyncio.gather(*futures)
    return time.perf_counter() - started


async def ingest_op(cmd: JSON) -> JSON:
    """Events/s of ``deque.append`` and of ``bus.ingest``: best of ``repeat``
    interleaved passes each, in CPU time."""
    batch = events(cmd["n"])
    best = {"deque": float("inf"), "ingest": float("inf")}
    for _ in range(cmd["repeat"]):
        best["deque"] = min(best["deque"], deque_seconds(batch))
        best["ingest"] = min(best["ingest"], await ingest_seconds(batch))
    return {name: len(batch) / seconds for name, seconds in best.items()}


async def jetstream_rate(url: str, side: str, batch: list[Event], name: str) -> float:
    """Events/s of one side (``side``: clstr or raw) into a new stream named after
    ``name``, on a connection of its own (clstr's transport, or plain nats-py for
    raw), the stream deleted after."""
    if side == "clstr":
        from clstr.eventbus import stream_name
        from clstr.protocol import DEFAULT_PREFIX
        from clstr.transports.nats import NatsOptions, NatsTransport

        transport = await NatsTransport.connect(url, NatsOptions(name="bench-eventbus"))
        try:
            elapsed = await bus_to_jetstream(transport, name, batch)
            await transport.nc.jetstream().delete_stream(stream_name(DEFAULT_PREFIX, name))
        finally:
            await transport.close()
    else:
        import nats

        nc = await nats.connect(url, name="bench-eventbus-raw")
        try:
            js = nc.jetstream()
            elapsed = await raw_to_jetstream(js, name, batch)
            await js.delete_stream(f"raw_{name}")
        finally:
            await nc.close()
    return len(batch) / elapsed


async def jetstream_op(cmd: JSON) -> JSON:
    """:func:`jetstream_rate` of ``side`` in the worker."""
    name = f"{_STREAM_BASE}{cmd['run']}"
    return {"rate": await jetstream_rate(cmd["url"], cmd["side"], events(cmd["n"]), name)}


async def _measure_ingest(context: Context, workers: Workers, run_index: int) -> None:
    sizes = context.sizes
    context.progress.begin(f"eventbus_ingest {context.run_text(run_index)}")
    rates = await workers["local"].call(
        {"op": "eventbus_ingest", "n": sizes.bus_events, "repeat": sizes.bus_repeat}
    )
    context.progress.advance()
    context.out.add("eventbus_ingest_rate", rates["ingest"], rates["deque"])


async def _measure_jetstream(context: Context, workers: Workers, run_index: int) -> None:
    rates: dict[str, float] = {}
    for side in side_order(run_index):
        context.progress.begin(f"eventbus_jetstream: {side} {context.run_text(run_index)}")
        command = {
            "op": "eventbus_jetstream",
            "side": side,
            "url": context.url,
            "n": context.sizes.bus_jetstream_events,
            "run": run_index,
        }
        rates[side] = (await workers[f"eventbus-{side}"].call(command))["rate"]
        context.progress.advance()
    context.out.add("eventbus_jetstream_rate", rates["clstr"], rates["raw"])


INGEST: Final = InProcessGroup(
    name="eventbus_ingest",
    specs=_INGEST_SPECS,
    steps=1,
    measure=_measure_ingest,
    op=ingest_op,
)
JETSTREAM: Final = InProcessGroup(
    name="eventbus_jetstream",
    specs=_JETSTREAM_SPECS,
    steps=2,
    stage=NEAR_NATS,
    measure=_measure_jetstream,
    op=jetstream_op,
    own_processes="eventbus",
)
