"""How a worker times what it runs: best-of timings, throughput with many
callers in flight, and sequential latency percentiles.
"""

from __future__ import annotations

import asyncio
import math
import statistics
import time
import timeit
from collections.abc import Awaitable, Callable, Sequence

from ._protocol import JSON


def best_time(fn: Callable[[], object], number: int = 1, repeat: int = 5) -> float:
    """The fastest of ``repeat`` timings of ``number`` calls of ``fn``, in seconds.

    The minimum, not the mean: noise only ever adds time.
    """
    return min(timeit.repeat(fn, number=number, repeat=repeat))


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ascending ``sorted_values``, nearest rank."""
    index = min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))
    return sorted_values[index]


async def drive(send: Callable[[int], Awaitable[object]], n: int, inflight: int) -> None:
    """Call ``send(i)`` for ``i`` in ``0..n-1`` with up to ``inflight`` calls at once."""
    indices = iter(range(n))

    async def lane() -> None:
        for i in indices:  # one shared iterator: each index goes to one lane
            await send(i)

    async with asyncio.TaskGroup() as tg:
        for _ in range(min(inflight, n)):
            tg.create_task(lane())


async def throughput(
    send: Callable[[int], Awaitable[object]], n: int, warmup: int, inflight: int
) -> JSON:
    """Calls per second of ``send`` with ``inflight`` concurrent callers, after
    warm-up, and this process's CPU time per call in microseconds.

    The CPU figure does not move when other processes load the machine, so it
    is the one to compare patches with on a noisy host.
    """
    await drive(send, warmup, inflight)
    started, cpu = time.perf_counter(), time.process_time()
    await drive(send, n, inflight)
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    return {"rate": n / elapsed, "cpu_us": cpu / n * 1e6}


async def latency(
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
        "p50": percentile(samples, 0.50),
        "p99": percentile(samples, 0.99),
        "mean": statistics.fmean(samples),
    }
