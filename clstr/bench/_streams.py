"""Streamed replies over NATS (group ``stream_chunks``): chunks per second of a
node streaming 100-byte chunks to a client, against raw nats-py doing the same
work.

clstr: the node's handler sends each chunk with ``clstr.current_stream()``;
the client reads them with ``client.stream_key(...)`` (window 64: frames,
credit acknowledgements every half window). Raw nats-py: a responder
publishes the same chunks (msgpack frames with a sequence number) to the
caller's inbox and waits for an acknowledgement once a window is
outstanding; the caller acknowledges every half window as it consumes. Both
sides run a node process and a client process; each run streams once to
warm up, then times one stream from the request to its last chunk.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any, Final

from ._group import Context, Group, Workers
from ._pairs import add_throughput, both_sides, pair_stage
from ._protocol import JSON, cpu, quiet_logs, serve
from ._specs import PAYLOAD_BYTES, Spec

#: Chunks the node may have unacknowledged, on both sides.
WINDOW: Final = 64
_PREFIX: Final = "benchstream"
_RAW_SUBJECT: Final = "rawstream.go"

_SPECS: Final = (
    Spec(
        "stream_chunks_rate",
        "stream_chunks",
        "streamed reply over NATS: 100 B chunks, window 64 (current_stream -> stream_key)",
        "raw nats-py: chunks published to the caller's inbox, an ack per half window",
        "chunks/s",
        True,
        0.7,
    ),
)


async def clstr_node(cfg: JSON) -> None:
    """A clstr node whose handler streams as many chunks as the request asks for."""
    from clstr import Envelope, Node, current_stream
    from clstr.transports.nats import NatsOptions, NatsTransport

    quiet_logs()
    chunk = os.urandom(PAYLOAD_BYTES)

    async def handler(env: Envelope) -> bytes:
        sink = current_stream()
        if sink is None:
            raise ValueError("the stream benchmark's requests are streamed")
        send = sink.send
        for _ in range(int(env.data)):
            await send(chunk)
        return b""

    transport = await NatsTransport.connect(cfg["url"], NatsOptions(name="bench-stream-node"))
    node = Node(transport, handler, num_shards=1, prefix=_PREFIX, node_id="bench-stream")
    try:
        async with node:
            await serve({"cpu": cpu})
    finally:
        await transport.close()


async def clstr_client(cfg: JSON) -> None:
    """A clstr client reading streamed replies with ``stream_key``."""
    from clstr import Client
    from clstr.transports.nats import NatsOptions, NatsTransport

    quiet_logs()
    transport = await NatsTransport.connect(cfg["url"], NatsOptions(name="bench-stream-client"))
    client = Client(transport, num_shards=1, prefix=_PREFIX, timeout=cfg["timeout"])

    async def stream(n: int) -> None:
        count = 0
        async for _ in client.stream_key("stream", "stream", str(n).encode(), window=WINDOW):
            count += 1
        if count != n:
            raise RuntimeError(f"streamed {count} chunks of {n}")

    try:
        await serve({"stream_chunks": lambda cmd: _timed(stream, cmd)})
    finally:
        await client.close()
        await transport.close()


async def raw_node(cfg: JSON) -> None:
    """A raw nats-py responder streaming msgpack frames with credit (never imports clstr)."""
    import msgpack
    import nats

    nc = await nats.connect(cfg["url"], name="bench-raw-stream-node")
    chunk = os.urandom(PAYLOAD_BYTES)
    pack = msgpack.packb

    async def on_request(msg: Any) -> None:
        inbox, n = msg.reply, int(msg.data)
        credit = asyncio.Event()
        acked = 0

        async def on_ack(ack: Any) -> None:
            nonlocal acked
            acked = msgpack.unpackb(ack.data)
            credit.set()

        ack_subject = nc.new_inbox()
        acks = await nc.subscribe(ack_subject, cb=on_ack)
        try:
            await nc.publish(inbox, pack({"a": ack_subject}))
            for seq in range(1, n + 1):
                while seq - acked > WINDOW:
                    credit.clear()
                    await credit.wait()
                await nc.publish(inbox, pack({"n": seq, "d": chunk}))
            await nc.publish(inbox, pack({"end": True}))
        finally:
            await acks.unsubscribe()

    try:
        await nc.subscribe(_RAW_SUBJECT, cb=on_request)
        await nc.flush()
        await serve({"cpu": cpu})
    finally:
        await nc.drain()


async def raw_client(cfg: JSON) -> None:
    """A raw nats-py caller consuming the frames and acknowledging every half window."""
    import msgpack
    import nats

    nc = await nats.connect(cfg["url"], name="bench-raw-stream-client")
    unpack, pack = msgpack.unpackb, msgpack.packb
    every = max(1, WINDOW // 2)

    async def stream(n: int) -> None:
        frames: asyncio.Queue[bytes] = asyncio.Queue()

        async def on_frame(msg: Any) -> None:
            frames.put_nowait(msg.data)

        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox, cb=on_frame)
        try:
            await nc.publish(_RAW_SUBJECT, str(n).encode(), reply=inbox)
            ack_to = unpack(await frames.get())["a"]
            consumed = acked = 0
            while True:
                frame = unpack(await frames.get())
                if frame.get("end"):
                    break
                consumed += 1
                if consumed - acked >= every:
                    await nc.publish(ack_to, pack(consumed))
                    acked = consumed
        finally:
            await sub.unsubscribe()
        if consumed != n:
            raise RuntimeError(f"streamed {consumed} chunks of {n}")

    try:
        await serve({"stream_chunks": lambda cmd: _timed(stream, cmd)})
    finally:
        await nc.drain()


async def _timed(stream: Any, cmd: JSON) -> JSON:
    """One warm-up stream, then chunks/s and CPU µs per chunk of one timed stream."""
    await stream(cmd["warmup"])
    n = cmd["n"]
    started, cpu_started = time.perf_counter(), time.process_time()
    await stream(n)
    elapsed, cpu_used = time.perf_counter() - started, time.process_time() - cpu_started
    return {"rate": n / elapsed, "cpu_us": cpu_used / n * 1e6}


def _config(context: Context) -> JSON:
    return {"url": context.url, "timeout": context.options.timeout}


_STAGE: Final = pair_stage(
    {
        "clstr-node": clstr_node,
        "raw-node": raw_node,
        "clstr-client": clstr_client,
        "raw-client": raw_client,
    },
    _config,
    what="stream workers (2 nodes, 2 clients)",
)


async def _measure(context: Context, workers: Workers, run_index: int) -> None:
    sizes = context.sizes
    command = {"n": sizes.stream_chunks, "warmup": sizes.stream_warmup}
    answers = await both_sides(context, workers, run_index, "stream_chunks", command)
    add_throughput(context, "stream_chunks_rate", answers)


GROUP: Final = Group(name="stream_chunks", specs=_SPECS, steps=2, stage=_STAGE, measure=_measure)
