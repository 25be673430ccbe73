"""Interrupts (group ``interrupt_latency``): from ``client.interrupt(id)`` to the
running handler seeing ``CancelledError``, over NATS, against a bare asyncio
``task.cancel()`` to the task seeing ``CancelledError``.

Both run in one worker process, one after the other, so that both ends of a
sample are read on one clock: clstr's node and client (each on its own
connection to the nats-server), and the bare task. The rows are reported
only: the baseline is what cancelling costs with no network at all, a scale
to read the figure against, not a figure clstr could reach.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Final

from ._group import Context, Workers, side_order
from ._local import NEAR_NATS, InProcessGroup
from ._protocol import JSON
from ._specs import Spec
from ._timing import percentile

_PREFIX: Final = "benchintr"
_BASELINE: Final = "bare asyncio: task.cancel() -> CancelledError seen, same process"

_SPECS: Final = (
    Spec(
        "interrupt_latency_p50",
        "interrupt_latency",
        "client.interrupt(id) -> handler sees CancelledError, over NATS, p50",
        _BASELINE,
        "us",
        False,
    ),
    Spec(
        "interrupt_latency_p99",
        "interrupt_latency",
        "client.interrupt(id) -> handler sees CancelledError, over NATS, p99",
        _BASELINE,
        "us",
        False,
    ),
)


async def clstr_interrupts(url: str, n: int, warmup: int) -> list[float]:
    """Seconds from ``client.interrupt`` to the handler's ``CancelledError``, for
    ``n`` requests interrupted one at a time after ``warmup`` others."""
    from clstr import Client, Envelope, Node, RequestInterruptedError
    from clstr.transports.nats import NatsOptions, NatsTransport

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

    node_transport = await NatsTransport.connect(url, NatsOptions(name="bench-interrupt-node"))
    client_transport = await NatsTransport.connect(url, NatsOptions(name="bench-interrupt-client"))
    client = Client(client_transport, num_shards=4, prefix=_PREFIX, timeout=30)
    latencies: list[float] = []
    try:
        async with Node(node_transport, handler, num_shards=4, prefix=_PREFIX):
            for i in range(warmup + n):
                entered.clear()
                call = asyncio.create_task(client.request_key("k", "hold", request_id=f"r{i}"))
                await entered.wait()
                sent = time.perf_counter()
                await client.interrupt(f"r{i}", key="k")
                with contextlib.suppress(RequestInterruptedError):
                    await call
                if i >= warmup:
                    latencies.append(seen[-1] - sent)
    finally:
        await client.close()
        await client_transport.close()
        await node_transport.close()
    return latencies


async def bare_cancels(n: int, warmup: int) -> list[float]:
    """Seconds from ``task.cancel()`` to the task's ``CancelledError``, ``n`` times."""
    entered = asyncio.Event()
    seen: list[float] = []

    async def hold() -> None:
        entered.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            seen.append(time.perf_counter())
            raise

    latencies: list[float] = []
    for i in range(warmup + n):
        entered.clear()
        task = asyncio.create_task(hold())
        await entered.wait()
        sent = time.perf_counter()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        if i >= warmup:
            latencies.append(seen[-1] - sent)
    return latencies


async def op(cmd: JSON) -> JSON:
    """One side's p50 and p99 in microseconds (``side``: clstr or raw)."""
    n, warmup = cmd["n"], cmd["warmup"]
    if cmd["side"] == "clstr":
        samples = await clstr_interrupts(cmd["url"], n, warmup)
    else:
        samples = await bare_cancels(n, warmup)
    samples.sort()
    return {"p50": percentile(samples, 0.5) * 1e6, "p99": percentile(samples, 0.99) * 1e6}


async def _measure(context: Context, workers: Workers, run_index: int) -> None:
    sizes = context.sizes
    answers: dict[str, JSON] = {}
    for side in side_order(run_index):
        context.progress.begin(f"interrupt_latency: {side} {context.run_text(run_index)}")
        command = {
            "op": "interrupt_latency",
            "side": side,
            "url": context.url,
            "n": sizes.interrupt_samples,
            "warmup": sizes.interrupt_warmup,
        }
        answers[side] = await workers["local"].call(command)
        context.progress.advance()
    clstr, raw = answers["clstr"], answers["raw"]
    context.out.add("interrupt_latency_p50", clstr["p50"], raw["p50"])
    context.out.add("interrupt_latency_p99", clstr["p99"], raw["p99"])


GROUP: Final = InProcessGroup(
    name="interrupt_latency",
    specs=_SPECS,
    steps=2,
    stage=NEAR_NATS,
    measure=_measure,
    op=op,
)
