"""Streamed replies and interrupts over NATS, against raw nats-py, in one run.

    python benchmarks/bench_streams.py [--chunks 20000] [--window 64] [--runs 3]

* **Streams:** chunks/s of 100-byte chunks, one node streaming to one client
  through clstr (``client.stream_key``: frames, credit acknowledgements every
  half window), against raw nats-py doing the same work: a responder publishes
  the chunks to the caller's inbox and waits for an acknowledgement per half
  window, the caller acknowledges as it consumes. Same server, same window,
  both sides in this process; the ratio is clstr / raw (floor 0.7).
* **Interrupts:** time from ``client.interrupt(id)`` to the handler seeing
  ``CancelledError`` on the node (median and p99), handler and client in this
  process on one clock.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import time

import msgpack

PAYLOAD = b"x" * 100


async def clstr_stream(url: str, chunks: int, window: int) -> float:
    from clstr import Client, Envelope, Node
    from clstr.handlers import current_stream
    from clstr.transports.nats import NatsTransport

    async def handler(env: Envelope) -> bytes:
        sink = current_stream()
        assert sink is not None
        for _ in range(chunks):
            await sink.send(PAYLOAD)
        return b""

    node_transport = await NatsTransport.connect(url)
    client_transport = await NatsTransport.connect(url)
    try:
        async with Node(node_transport, handler, num_shards=1):
            client = Client(client_transport, num_shards=1, timeout=120)
            started = time.perf_counter()
            count = 0
            async for _ in client.stream_key("k", "stream", window=window):
                count += 1
            elapsed = time.perf_counter() - started
            assert count == chunks
    finally:
        await client_transport.close()
        await node_transport.close()
    return chunks / elapsed


async def raw_stream(url: str, chunks: int, window: int) -> float:
    import nats

    responder = await nats.connect(url)
    caller = await nats.connect(url)
    try:
        credit = asyncio.Event()
        state = {"acked": 0}

        async def on_ack(msg: object) -> None:
            state["acked"] = msgpack.unpackb(msg.data)  # type: ignore[attr-defined]
            credit.set()

        ack_subject = responder.new_inbox()
        await responder.subscribe(ack_subject, cb=on_ack)

        async def serve(msg: object) -> None:
            inbox = msg.reply  # type: ignore[attr-defined]
            await responder.publish(inbox, msgpack.packb({"a": ack_subject}))
            for n in range(1, chunks + 1):
                while n - state["acked"] > window:
                    credit.clear()
                    await credit.wait()
                await responder.publish(inbox, msgpack.packb({"n": n, "d": PAYLOAD}))
            await responder.publish(inbox, msgpack.packb({"end": True}))

        await responder.subscribe("raw.stream", cb=serve)
        await responder.flush()
        frames: asyncio.Queue[bytes] = asyncio.Queue()

        async def on_frame(msg: object) -> None:
            frames.put_nowait(msg.data)  # type: ignore[attr-defined]

        inbox = caller.new_inbox()
        await caller.subscribe(inbox, cb=on_frame)
        started = time.perf_counter()
        await caller.publish("raw.stream", b"go", reply=inbox)
        ack_to = msgpack.unpackb(await frames.get())["a"]
        consumed = acked = 0
        while True:
            frame = msgpack.unpackb(await frames.get())
            if frame.get("end"):
                break
            consumed += 1
            if consumed - acked >= max(1, window // 2):
                await caller.publish(ack_to, msgpack.packb(consumed))
                acked = consumed
        elapsed = time.perf_counter() - started
        assert consumed == chunks
    finally:
        await caller.close()
        await responder.close()
    return chunks / elapsed


async def interrupt_latency(url: str, samples: int) -> list[float]:
    from clstr import Client, Envelope, Node, RequestInterruptedError
    from clstr.transports.nats import NatsTransport

    entered = asyncio.Event()
    seen: list[float] = []

    async def handler(env: Envelope) -> bytes:
        entered.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            seen.append(time.perf_counter())
            raise
        return b""

    node_transport = await NatsTransport.connect(url)
    client_transport = await NatsTransport.connect(url)
    latencies: list[float] = []
    try:
        async with Node(node_transport, handler, num_shards=4):
            client = Client(client_transport, num_shards=4, timeout=30)
            for i in range(samples):
                entered.clear()
                call = asyncio.create_task(client.request_key("k", "hold", request_id=f"r{i}"))
                await entered.wait()
                sent = time.perf_counter()
                await client.interrupt(f"r{i}", key="k")
                with contextlib.suppress(RequestInterruptedError):
                    await call
                latencies.append(seen[-1] - sent)
    finally:
        await client_transport.close()
        await node_transport.close()
    return latencies


async def main(chunks: int, window: int, runs: int, samples: int) -> None:
    from clstr.testing import NatsServer

    async with NatsServer() as server:
        ratios = []
        for run in range(runs):
            sides = [clstr_stream, raw_stream] if run % 2 == 0 else [raw_stream, clstr_stream]
            rates = {side.__name__: await side(server.url, chunks, window) for side in sides}
            ratio = rates["clstr_stream"] / rates["raw_stream"]
            ratios.append(ratio)
            print(
                f"run {run + 1}: clstr {rates['clstr_stream']:,.0f} chunks/s, "
                f"raw nats-py {rates['raw_stream']:,.0f} chunks/s, ratio {ratio:.2f}"
            )
        print(f"streams: median ratio {statistics.median(ratios):.2f} (floor 0.7), window {window}")
        latencies = sorted(await interrupt_latency(server.url, samples))
        p50 = statistics.median(latencies) * 1000
        p99 = latencies[int(len(latencies) * 0.99) - 1] * 1000
        print(
            f"interrupt -> handler cancelled: median {p50:.2f} ms, p99 {p99:.2f} ms over {samples}"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--chunks", type=int, default=20_000)
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--samples", type=int, default=200)
    args = parser.parse_args()
    asyncio.run(main(args.chunks, args.window, args.runs, args.samples))
