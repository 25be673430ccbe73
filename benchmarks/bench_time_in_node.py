"""What recording time in node costs the ShardStats handler wrapper (docs/observability.md).

    .venv/bin/python benchmarks/bench_time_in_node.py

Times three handlers on one envelope with a TTL, interleaved, best of 15
runs of 100 000 awaited calls: the bare handler, the wrapper as it was
before the histogram (per-shard counters only), and the wrapper now.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from clstr import Envelope
from clstr.observe import LatencyHistogram, ShardStats
from clstr.observe._discovery import _CountingHandler

CALLS = 100_000
RUNS = 15


class CountersOnly(_CountingHandler):
    """The wrapper before it recorded time in node."""

    async def __call__(self, env: Envelope) -> bytes | None:
        started = time.perf_counter_ns()
        error: str | None = None
        try:
            return await self._handler(env)
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            self._stats.record(env.shard, time.perf_counter_ns() - started, error)


async def echo(env: Envelope) -> bytes:
    return env.data


async def main() -> None:
    env = Envelope(type="t", data=b"", shard=3, key="k", ttl=5.0)
    handlers: dict[str, Callable[[Envelope], Awaitable[bytes | None]]] = {
        "handler alone": echo,
        "wrapper, counters only": CountersOnly(echo, ShardStats()),
        "wrapper, counters and time in node": ShardStats().wrap(echo),
    }
    best = dict.fromkeys(handlers, float("inf"))
    for _ in range(RUNS):
        for name, handler in handlers.items():
            started = time.perf_counter()
            for _ in range(CALLS):
                await handler(env)
            best[name] = min(best[name], (time.perf_counter() - started) / CALLS)
    for name, seconds in best.items():
        print(f"{name:36} {seconds * 1e6:.2f} µs a call")
    histogram = LatencyHistogram()
    started = time.perf_counter()
    for value in range(1_000_000, 1_000_000 + CALLS):
        histogram.record(value)
    print(f"{'LatencyHistogram.record':36} {(time.perf_counter() - started) / CALLS * 1e6:.2f} µs")


if __name__ == "__main__":
    asyncio.run(main())
