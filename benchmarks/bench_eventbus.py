"""The event bus's figures, each against the raw primitive it wraps, in one run.

    python benchmarks/bench_eventbus.py [--events N] [--runs R] [--quick]

* **ingest**: ``bus.ingest(event)`` into the rings (the non-blocking path: rings
  large enough that nothing waits, nothing yields) against ``deque.append(event)``;
  also ``ingest_raw`` with a precomputed hash, keys that never repeat (the key
  hash cache misses), and the sustained rate with the workers draining to the
  no-op adapter.
* **memory per ring slot**: bytes the bus holds per queued event (the user's
  event object excluded: it is shared), against a deque of the same events.
* **JetStream end to end**: events ingested until ``flush()`` returned (every
  frame acknowledged by JetStream), against raw nats-py publishing the same
  batches: the same frames (1024 events of one shard, the same bytes and
  message ids), encoded before its clock starts, sent with ``js.publish_async``
  and every ack awaited. The bus's figure includes everything (ingest, routing,
  batching, encoding, publishing), the baseline only the publishing.
* **poll**: events/s read back from the stream by merged polls (limit 10,000),
  by shard sequence and by timestamp; and from the memory log (CPU only).

Times are the best of ``--runs``; each pair is measured back to back in the same
process. What runs in this process alone (ingest, the memory-log poll) is timed
in CPU time (``time.process_time``: on a shared machine the time spent
descheduled is not the code's); what involves the nats-server in wall time. The
figures are recorded in docs/eventbus.md. The ingest-vs-deque and the JetStream
pairs are ``clstr bench``'s groups ``eventbus_ingest`` and ``eventbus_jetstream``
(clstr/bench/_eventbus.py), whose functions this script runs in its own process.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import time
import tracemalloc
from collections.abc import Callable

from clstr.bench._eventbus import (
    KEYS,
    PAYLOAD,
    SHARDS,
    big_ring,
    bus_to_jetstream,
    deque_seconds,
    events,
    ingest_seconds,
    raw_to_jetstream,
)
from clstr.eventbus import (
    BackpressureError,
    BusConfig,
    BusReader,
    Event,
    EventBus,
    MemoryAdapter,
    Ordering,
    PollRequest,
    encode_frames,
)
from clstr.eventbus._event import Record
from clstr.hashing import ShardMapper
from clstr.testing import NatsServer
from clstr.transports.nats import NatsTransport

# In-process measurements count this process's CPU time: on a shared machine the
# time it spends descheduled is not the code's. Wall time for those with a server.
_cpu = time.process_time


async def _sync(fn: Callable[[list[Event]], float], batch: list[Event]) -> float:
    return fn(batch)


# -- ingest ---------------------------------------------------------------------


async def ingest_rates(n: int, runs: int) -> dict[str, float]:
    batch = events(n)
    fresh = events(n, unique=True)

    async def bus_raw() -> float:
        bus = EventBus(big_ring(n))
        await bus.start()
        hashes = [bus.hash_key(e.key) for e in batch[:KEYS]]
        ingest_raw = bus.ingest_raw
        gc.collect()
        started = _cpu()
        for i in range(n):
            ingest_raw(PAYLOAD, hash=hashes[i % KEYS])
        elapsed = _cpu() - started
        await bus.shutdown()
        return elapsed

    async def sustained() -> float:
        bus = EventBus(BusConfig(name="bench", shards=SHARDS))
        await bus.start()
        ingest, ingest_wait = bus.ingest, bus.ingest_wait
        started = _cpu()
        for i, e in enumerate(batch):
            try:
                ingest(e)
            except BackpressureError:
                await ingest_wait(e)
            if i & 1023 == 1023:
                await asyncio.sleep(0)
        await bus.flush()
        elapsed = _cpu() - started
        await bus.shutdown()
        return elapsed

    out = {}
    for _ in range(runs):  # interleaved, best of each
        for name, once in (
            ("deque", lambda: _sync(deque_seconds, batch)),
            ("ingest", lambda: ingest_seconds(batch)),
            ("ingest_unique", lambda: ingest_seconds(fresh)),
            ("ingest_raw", bus_raw),
            ("sustained", sustained),
        ):
            elapsed = await once()
            out[name] = min(out.get(name, elapsed), elapsed)
    return {name: n / seconds for name, seconds in out.items()}


async def memory_per_slot(n: int) -> tuple[float, float]:
    batch = events(n)
    bus = EventBus(big_ring(n))
    await bus.start()
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for e in batch:
        bus.ingest(e)
    ours = (tracemalloc.get_traced_memory()[0] - before) / n
    tracemalloc.stop()
    await bus.shutdown()
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    ring = collections.deque(batch)
    plain = (tracemalloc.get_traced_memory()[0] - before) / n
    tracemalloc.stop()
    del ring
    return ours, plain


# -- JetStream ------------------------------------------------------------------


async def jetstream_rates(url: str, n: int, runs: int) -> dict[str, float]:
    batch = events(n)
    transport = await NatsTransport.connect(url)
    js = transport.nc.jetstream()
    out: dict[str, float] = {}
    try:
        sides = {
            "bus": lambda name: bus_to_jetstream(transport, name, batch),
            "raw": lambda name: raw_to_jetstream(js, name, batch),
            "hand": lambda name: _by_hand_to_jetstream(js, name, batch),
        }
        for run in range(runs):
            order = list(sides) if run % 2 == 0 else list(reversed(sides))
            for side in order:
                elapsed = await sides[side](f"{side}{run}")
                out[side] = min(out.get(side, elapsed), elapsed)
        poll_seq, poll_ts = await _poll_rates(transport, f"bus{runs - 1}", n)
    finally:
        await transport.close()
    return {
        "bus": n / out["bus"],
        "raw": n / out["raw"],
        "hand": n / out["hand"],
        "poll_sequence": poll_seq,
        "poll_timestamp": poll_ts,
    }


async def _by_hand_to_jetstream(js: object, name: str, batch: list[Event]) -> float:
    """What a user writes without the bus: route each event (``ShardMapper``), group
    batches of 1024 per shard, encode them as frames, ``publish_async``, await acks."""
    from nats.js.api import StreamConfig

    subject = f"hand.{name}"
    await js.add_stream(StreamConfig(name=f"hand_{name}", subjects=[f"{subject}.*"]))  # type: ignore[attr-defined]
    mapper = ShardMapper(SHARDS).shard
    pending: list[list[Record]] = [[] for _ in range(SHARDS)]
    sent = [0] * SHARDS
    futures = []
    publish = js.publish_async  # type: ignore[attr-defined]
    started = time.perf_counter()

    async def send(shard: int) -> None:
        for frame in encode_frames(f"hand.{name}", shard, sent[shard], pending[shard], 1 << 20):
            futures.append(
                await publish(
                    f"{subject}.{shard}", frame.data, headers={"Nats-Msg-Id": frame.msg_id}
                )
            )
        sent[shard] += len(pending[shard])
        pending[shard] = []

    for e in batch:
        shard = mapper(e.key)
        pending[shard].append((time.time_ns(), e.key, e.payload, e.type, e.headers))
        if len(pending[shard]) == 1024:
            await send(shard)
    for shard in range(SHARDS):
        if pending[shard]:
            await send(shard)
    await asyncio.gather(*futures)
    return time.perf_counter() - started


async def _poll_rates(
    transport: NatsTransport, bus: str, n: int, runs: int = 3
) -> tuple[float, float]:
    """Events/s of draining the stream with polls of 10,000, best of ``runs`` passes."""
    reader = BusReader.jetstream(transport, bus)
    rates = []
    for ordering in (Ordering.SEQUENCE, Ordering.TIMESTAMP):
        best_rate = 0.0
        for _ in range(runs):
            got = 0
            request = PollRequest(limit=10_000, ordering=ordering)
            started = time.perf_counter()
            while True:
                response = await reader.poll(request)
                got += len(response.events)
                request = request.from_cursor(response.cursor)
                if not response.has_more:
                    break
            assert got == n, (got, n)
            best_rate = max(best_rate, n / (time.perf_counter() - started))
        rates.append(best_rate)
    return rates[0], rates[1]


async def memory_poll_rate(n: int) -> float:
    adapter = MemoryAdapter()
    bus = EventBus(BusConfig(name="bench", shards=SHARDS, adapter=adapter, ring_capacity=n))
    await bus.start()
    for e in events(n):
        bus.ingest(e)
    await bus.shutdown()
    reader = BusReader(adapter.memory, "bench")
    request = PollRequest(limit=10_000)
    started = _cpu()
    while True:
        response = await reader.poll(request)
        request = request.from_cursor(response.cursor)
        if not response.has_more:
            break
    return n / (_cpu() - started)


# -- report ---------------------------------------------------------------------


def _row(name: str, ours: float, base: float | None, unit: str, baseline: str) -> str:
    ratio = f"{ours / base:.3g}x" if base else ""
    base_text = f"{base:,.0f}" if base else ""
    return f"| {name} | {ours:,.0f} | {baseline} | {base_text} | {ratio} | {unit} |"


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="tiny counts, one run")
    args = parser.parse_args()
    n, runs = (5_000, 1) if args.quick else (args.events, args.runs)

    rates = await ingest_rates(n, runs)
    ours_slot, deque_slot = await memory_per_slot(n)
    mem_poll = max([await memory_poll_rate(n) for _ in range(runs)])
    async with NatsServer() as server:
        js_rates = await jetstream_rates(server.url, n, max(1, runs // 2 + 1))

    deque = rates["deque"]
    print(f"\n{n:,} events of {len(PAYLOAD)} bytes, {KEYS} keys, {SHARDS} shards; best of {runs}\n")
    print("| measurement | clstr | baseline | baseline figure | ratio | unit |")
    print("|---|---:|---|---:|---:|---|")
    print(_row("ingest (ring, non-blocking)", rates["ingest"], deque, "events/s", "deque.append"))
    print(
        _row("ingest_raw, precomputed hash", rates["ingest_raw"], deque, "events/s", "deque.append")
    )
    print(
        _row("ingest, keys never repeat", rates["ingest_unique"], deque, "events/s", "deque.append")
    )
    print(
        _row(
            "ingest + dispatch to Noop (sustained)",
            rates["sustained"],
            deque,
            "events/s",
            "deque.append",
        )
    )
    print(_row("memory per ring slot", ours_slot, deque_slot, "bytes", "deque slot"))
    print(
        _row(
            "end to end into JetStream",
            js_rates["bus"],
            js_rates["raw"],
            "events/s",
            "nats-py publish_async, same batches",
        )
    )
    print(
        _row(
            "end to end into JetStream",
            js_rates["bus"],
            js_rates["hand"],
            "events/s",
            "by hand: route, batch, encode, publish_async",
        )
    )
    print(_row("poll from JetStream, Sequence", js_rates["poll_sequence"], None, "events/s", ""))
    print(_row("poll from JetStream, Timestamp", js_rates["poll_timestamp"], None, "events/s", ""))
    print(_row("poll from the memory log", mem_poll, None, "events/s", ""))


if __name__ == "__main__":
    asyncio.run(main())
