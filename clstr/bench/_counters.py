"""Distributed counters over NATS (group ``counters``): ``StrictCounter.inc``
against a plain keyed request doing the same work, and ``LaxCounter`` against
the strict increments.

Four processes, all clstr: a counter node (a ``Sharding`` runner with
``serve_counters`` and its state in JetStream KV) and a client process for it;
a plain node (a :class:`~clstr.Router`) and a client process for it. 64
shards, 1024 keys, 256 increments in flight.

* ``counter_strict_inc``: ``StrictCounter.inc(key)`` against
  ``client.key(key).call(Bump(1), int)`` to a Router whose handler adds to a
  dict and writes the key's new value to a KV bucket, conditional on the
  revision it last wrote (create, then update): one request and one
  conditional KV write per increment on both sides. The ratio is what the
  counter layer costs on top: the entity host (look-up, per-key instance,
  ``@handles`` dispatch), the writer's session (the exactly-once record
  written with the value), the request ids of the retry policy.
  Against a raw JetStream KV update from the client the baseline would skip
  the request to the key's owner (what ``nats_rr`` measures) and, with many
  writers, race on the revision: not the same work.
* ``counter_lax_inc``: the same increments (count and keys) through
  ``LaxCounter.inc_nowait``, timed until ``flush()`` has every delta
  acknowledged, against the strict increments of the same run: what batching
  (one message per owner) and coalescing (one KV write per key per flush)
  buy. It grows with the increments per key (here about 5 of them per key).

Each stage uses a new namespace and KV bucket and deletes them at the end.
``benchmarks/bench_counters.py`` measures more (three nodes, state in memory,
the cost of one ``inc_nowait``, flush traffic).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from typing import Final

from ._group import Context, Group, Workers
from ._pairs import add_throughput, both_sides, drop_streams, pair_stage
from ._protocol import JSON, cpu, quiet_logs, serve
from ._specs import KEYS, Spec
from ._timing import throughput

_COUNTER_PREFIX: Final = "benchctr"
_ROUTER_PREFIX: Final = "benchkvr"

_STRICT: Final = "StrictCounter.inc over NATS, state in JetStream KV (256 in flight, 1024 keys)"
_SPECS: Final = (
    Spec(
        "counter_strict_inc",
        "counters",
        _STRICT,
        "typed request to a Router node that adds and writes the value to KV (conditional)",
        "inc/s",
        True,
        # Medians of --runs 3: 0.68-0.88x on asyncio, 0.48-0.76x on uvloop (CPU
        # 0.69-0.79x; single runs 0.47-1.29x): the floor is ~60-65 % of the ~0.72x
        # typical of them.
        0.45,
    ),
    Spec(
        "counter_lax_inc",
        "counters",
        "LaxCounter.inc_nowait, the same increments, until flush() has them all acknowledged",
        "StrictCounter.inc: the same increments, keys and node (the row above)",
        "inc/s",
        True,
        # Medians of --runs 3: 6.3-7.9x (4.8x once, at load 6; CPU 6.6-7.6x): the
        # floor is ~60 % of the ~6.6x typical of them.
        4.0,
    ),
)


@dataclass(slots=True)
class Bump:
    """The baseline's increment (its class name is its message type)."""

    n: int


def _keys() -> list[str]:
    return [f"key-{i}" for i in range(KEYS)]


async def counter_node(cfg: JSON) -> None:
    """A runner serving every counter namespace, state in JetStream KV."""
    from clstr.counters import serve_counters
    from clstr.entities import KvStateStore, Sharding
    from clstr.transports.nats import NatsOptions, NatsTransport

    quiet_logs()
    transport = await NatsTransport.connect(cfg["url"], NatsOptions(name="bench-counter-node"))
    sharding = Sharding(
        transport,
        num_shards=cfg["shards"],
        prefix=_COUNTER_PREFIX,
        node_id="bench-counters",
        store=KvStateStore(transport, prefix=cfg["store"]),
    )
    serve_counters(sharding)
    try:
        async with sharding:
            await serve({"cpu": cpu})
    finally:
        await drop_streams(transport.nc, cfg["store"])
        await transport.close()


async def kv_router_node(cfg: JSON) -> None:
    """A Router node whose handler adds to a dict and writes the new value to KV,
    conditional on the key's last revision (the node's per-key lanes keep one
    write per key at a time, as an entity's lane does)."""
    import msgpack

    from clstr import Envelope, Node, Router
    from clstr.transports.jetstream import bucket_name, open_bucket
    from clstr.transports.nats import NatsOptions, NatsTransport

    quiet_logs()
    transport = await NatsTransport.connect(cfg["url"], NatsOptions(name="bench-kvrouter-node"))
    kv = await open_bucket(
        transport.nc.jetstream(), bucket_name(cfg["store"], "router_values"), replicas=1
    )
    values: dict[str, int] = {}
    revisions: dict[str, int] = {}
    router = Router()

    @router.on(Bump)
    async def add(msg: Bump, env: Envelope) -> int:
        key = env.key or ""
        total = values.get(key, 0) + msg.n
        # The counter's record is {"v": 1, "s": state, "r": replies}: the same shape.
        record = msgpack.packb({"v": 1, "s": {"value": total}, "r": []})
        revision = revisions.get(key)
        if revision is None:
            revisions[key] = await kv.create(key, record)
        else:
            revisions[key] = await kv.update(key, record, last=revision)
        values[key] = total
        return total

    node = Node(
        transport, router, num_shards=cfg["shards"], prefix=_ROUTER_PREFIX, node_id="bench-kvr"
    )
    try:
        async with node:
            await serve({"cpu": cpu})
    finally:
        await drop_streams(transport.nc, cfg["store"])
        await transport.close()


async def counter_client(cfg: JSON) -> None:
    """Strict increments (``counter_inc``) and lax ones (``counter_lax``)."""
    from clstr import Client
    from clstr.counters import LaxCounter, StrictCounter
    from clstr.transports.nats import NatsOptions, NatsTransport

    quiet_logs()
    transport = await NatsTransport.connect(cfg["url"], NatsOptions(name="bench-counter-client"))
    client = Client(transport, num_shards=cfg["shards"], prefix=_COUNTER_PREFIX, timeout=30.0)
    namespace = cfg["namespace"]
    strict = StrictCounter(client, namespace, timeout=30.0)
    lax = LaxCounter(client, namespace, timeout=30.0)
    keys = _keys()

    async def inc(i: int) -> object:
        return await strict.inc(keys[i % KEYS])

    async def strict_op(cmd: JSON) -> JSON:
        return await throughput(inc, cmd["n"], cmd["warmup"], cfg["inflight"])

    async def lax_warm_op(cmd: JSON) -> JSON:
        # The courier learns the owner, the flusher task starts.
        for key in keys[: cmd["warmup"]]:
            lax.inc_nowait(key)
        await lax.flush()
        return {}

    async def lax_op(cmd: JSON) -> JSON:
        add = lax.inc_nowait
        n = cmd["n"]
        before = (lax.stats.messages, lax.stats.items)
        started, used = time.perf_counter(), time.process_time()
        for i in range(n):
            add(keys[i % KEYS])
            if i & 1023 == 1023:
                await asyncio.sleep(0)  # a producer yields now and then: the flusher runs
        await lax.flush()
        elapsed, used = time.perf_counter() - started, time.process_time() - used
        return {
            "rate": n / elapsed,
            "cpu_us": used / n * 1e6,
            "batches": lax.stats.messages - before[0],
            "deltas": lax.stats.items - before[1],
        }

    try:
        await serve(
            {"counter_inc": strict_op, "counter_lax": lax_op, "counter_lax_warm": lax_warm_op}
        )
    finally:
        await lax.close()
        await strict.close()
        await client.close()
        await transport.close()


async def kv_router_client(cfg: JSON) -> None:
    """Typed requests ``Bump(1)`` to the same keys, for the Router node."""
    from clstr import Client
    from clstr.transports.nats import NatsOptions, NatsTransport

    quiet_logs()
    transport = await NatsTransport.connect(cfg["url"], NatsOptions(name="bench-kvr-client"))
    client = Client(transport, num_shards=cfg["shards"], prefix=_ROUTER_PREFIX, timeout=30.0)
    keys = _keys()
    one = Bump(1)

    async def call(i: int) -> object:
        return await client.key(keys[i % KEYS]).call(one, int)

    async def measure(cmd: JSON) -> JSON:
        return await throughput(call, cmd["n"], cmd["warmup"], cfg["inflight"])

    try:
        await serve({"counter_inc": measure})
    finally:
        await client.close()
        await transport.close()


def _config(context: Context) -> JSON:
    sizes = context.sizes
    run = uuid.uuid4().hex[:8]
    return {
        "url": context.url,
        "shards": sizes.nats_shards,
        "inflight": sizes.inflight,
        "namespace": f"bench{run}",
        "store": f"benchctr{run}",
    }


_STAGE: Final = pair_stage(
    {
        "counter-node": counter_node,
        "kvrouter-node": kv_router_node,
        "counter-client": counter_client,
        "kvrouter-client": kv_router_client,
    },
    _config,
    what="counter and KV router workers (2 nodes, 2 clients)",
)


async def _measure(context: Context, workers: Workers, run_index: int) -> None:
    sizes = context.sizes
    command = {"n": sizes.counter_incs, "warmup": sizes.counter_warmup}
    answers = await both_sides(
        context, workers, run_index, "counter_inc", command, {"clstr": "counter", "raw": "kvrouter"}
    )
    add_throughput(context, "counter_strict_inc", answers)
    strict = answers["clstr"]
    context.progress.begin(f"counter_lax {context.run_text(run_index)}")
    node, client = workers["counter-node"], workers["counter-client"]
    if run_index == 0:
        await client.call({"op": "counter_lax_warm", **command})
    before = (await node.call({"op": "cpu"}))["cpu"]
    lax = await client.call({"op": "counter_lax", **command})
    node_cpu = ((await node.call({"op": "cpu"}))["cpu"] - before) / command["n"] * 1e6
    context.progress.advance()
    out = context.out
    out.add("counter_lax_inc", lax["rate"], strict["rate"])
    out.cpu("counter_lax_inc", "client", lax["cpu_us"], strict["cpu_us"])
    out.cpu("counter_lax_inc", "node", node_cpu, strict["node_cpu_us"])
    out.note_run("counter_lax_inc", batch_messages=lax["batches"], key_deltas=lax["deltas"])


GROUP: Final = Group(name="counters", specs=_SPECS, steps=3, stage=_STAGE, measure=_measure)
