"""Persisted request/reply (group ``persisted_rr``): messages sent with
``clstr.persist`` and answered by a node's persisted-message consumers, against
raw nats-py doing the JetStream part alone.

Each side runs in one process of its own (``persist-clstr``, ``persist-raw``),
publisher and consumer together, on one nats-server with file storage; 8
shards, 256 keys, 100-byte messages, 256 publishes in flight (a sliding
window). Every round uses a new stream and deletes it afterwards.

* clstr: ``PersistedClient.send_raw`` to a node serving the shards with
  ``serve_persisted``: the reply-store check, the node's message path (an echo
  handler), the reply stored in KV, the message acknowledged; timed from the
  first publish to the last stored reply.
* raw: ``js.publish`` with a ``Nats-Msg-Id`` to a work-queue stream, one
  durable pull consumer per shard (batches of 64), each message acknowledged;
  timed from the first publish to the last acknowledgement. Never imports clstr.
* raw + reply: the same, and a reply created in a KV bucket per message (the
  least a stored reply costs), for a second, report-only row.

``benchmarks/bench_persist.py`` runs the same rounds in its own process, and
measures recovery after a crash.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, Final

from ._group import Context, Workers, side_order
from ._local import NEAR_NATS, InProcessGroup
from ._protocol import JSON
from ._specs import Spec

NUM_SHARDS: Final = 8
KEYS: Final = 256
IN_FLIGHT: Final = 256
PAYLOAD: Final = b"x" * 100

_WHAT: Final = "persisted request -> stored reply (clstr.persist; 8 shards, 256 in flight, 100 B)"
_SPECS: Final = (
    Spec(
        "persisted_rr_throughput",
        "persisted_rr",
        _WHAT,
        "raw nats-py: JetStream publish + pull consume + ack",
        "msg/s",
        True,
        0.2,
    ),
    Spec(
        "persisted_rr_vs_reply",
        "persisted_rr",
        _WHAT,
        "raw nats-py: the same + a KV reply create per message",
        "msg/s",
        True,
    ),
)


async def windowed(count: int, send: Callable[[int], Awaitable[Any]]) -> None:
    """``send(0)`` ... ``send(count - 1)``, ``IN_FLIGHT`` at a time (a sliding window)."""
    room = asyncio.Semaphore(IN_FLIGHT)

    async def one(n: int) -> None:
        try:
            await send(n)
        finally:
            room.release()

    async with asyncio.TaskGroup() as group:
        for n in range(count):
            await room.acquire()
            group.create_task(one(n))


async def raw_round(url: str, count: int, *, reply: bool) -> float:
    """Publish ``count`` messages to a work-queue stream and pull them (acknowledging
    each, and with ``reply`` creating a KV reply first); seconds from first to last."""
    import nats
    import nats.js.api as api

    nc = await nats.connect(url, name="bench-persist-raw")
    js = nc.jetstream()
    name = f"raw{uuid.uuid4().hex[:8]}"
    await js.add_stream(name=name, subjects=[f"{name}.*"], retention=api.RetentionPolicy.WORK_QUEUE)
    bucket = await js.create_key_value(bucket=f"{name}_replies", history=1) if reply else None
    subs = []
    for shard in range(NUM_SHARDS):
        config = api.ConsumerConfig(ack_policy=api.AckPolicy.EXPLICIT)
        durable = f"{name}_{shard}"
        subs.append(await js.pull_subscribe(f"{name}.{shard}", durable, stream=name, config=config))
    done = 0
    finished = asyncio.Event()

    async def consume(sub: Any) -> None:
        nonlocal done
        while not finished.is_set():
            try:
                msgs = await sub.fetch(64, timeout=0.5)
            except TimeoutError:  # nats-py raises its own and asyncio's
                continue
            for msg in msgs:
                if bucket is not None:
                    await bucket.create(msg.headers["Nats-Msg-Id"], b"reply")
                await msg.ack()
            done += len(msgs)
            if done >= count:
                finished.set()

    async def publish(n: int) -> None:
        subject = f"{name}.{n % KEYS % NUM_SHARDS}"
        await js.publish(subject, PAYLOAD, headers={"Nats-Msg-Id": f"m{n}"})

    try:
        started = time.perf_counter()
        async with asyncio.TaskGroup() as consumers:
            for sub in subs:
                consumers.create_task(consume(sub))
            await windowed(count, publish)
            await finished.wait()
            elapsed = time.perf_counter() - started
        await js.delete_stream(name)
        if reply:
            await js.delete_key_value(f"{name}_replies")
    finally:
        await nc.close()
    return elapsed


async def clstr_round(url: str, count: int) -> float:
    """Send ``count`` persisted messages to a node that consumes them; seconds from
    the first publish to the last stored reply."""
    from clstr import Client, Envelope, Node
    from clstr.persist import PersistedClient, reply_bucket, serve_persisted, stream_name
    from clstr.transports.nats import NatsOptions, NatsTransport

    prefix = f"b{uuid.uuid4().hex[:8]}"
    node_transport = await NatsTransport.connect(url, NatsOptions(name="bench-persist-node"))
    client_transport = await NatsTransport.connect(url, NatsOptions(name="bench-persist-client"))

    async def echo(env: Envelope) -> bytes:
        return env.data

    try:
        node = Node(node_transport, echo, num_shards=NUM_SHARDS, prefix=prefix)
        consumers = serve_persisted(node)
        client = Client(client_transport, num_shards=NUM_SHARDS, prefix=prefix)
        persisted = PersistedClient(client)
        async with node:
            await persisted.send_raw("warm", key="k0")  # the stream and bucket exist first
            while consumers.stats.stored < 1:  # noqa: ASYNC110 - a counter, no event
                await asyncio.sleep(0.01)

            async def send(n: int) -> None:
                await persisted.send_raw("echo", PAYLOAD, key=f"k{n % KEYS}")

            started = time.perf_counter()
            await windowed(count, send)
            while consumers.stats.stored < count + 1:  # noqa: ASYNC110 - a counter, no event
                await asyncio.sleep(0.001)
            elapsed = time.perf_counter() - started
        await client.close()
        js = client_transport.nc.jetstream()
        await js.delete_stream(stream_name(prefix))
        await js.delete_key_value(reply_bucket(prefix))
    finally:
        await client_transport.close()
        await node_transport.close()
    return elapsed


async def op(cmd: JSON) -> JSON:
    """Messages per second of one round of ``side`` (clstr, raw or raw_reply)."""
    side, url, count = cmd["side"], cmd["url"], cmd["n"]
    if side == "clstr":
        elapsed = await clstr_round(url, count)
    else:
        elapsed = await raw_round(url, count, reply=side == "raw_reply")
    return {"rate": count / elapsed}


async def _measure(context: Context, workers: Workers, run_index: int) -> None:
    rates: dict[str, float] = {}
    for side in side_order(run_index):
        for kind in ("raw", "raw_reply") if side == "raw" else ("clstr",):
            context.progress.begin(f"persisted_rr: {kind} {context.run_text(run_index)}")
            command = {
                "op": "persisted_rr",
                "side": kind,
                "url": context.url,
                "n": context.sizes.persisted_messages,
            }
            rates[kind] = (await workers[f"persist-{side}"].call(command))["rate"]
            context.progress.advance()
    context.out.add("persisted_rr_throughput", rates["clstr"], rates["raw"])
    context.out.add("persisted_rr_vs_reply", rates["clstr"], rates["raw_reply"])


GROUP: Final = InProcessGroup(
    name="persisted_rr",
    specs=_SPECS,
    steps=3,
    stage=NEAR_NATS,
    measure=_measure,
    op=op,
    own_processes="persist",
)
