"""The dispatch loop of one shard: batch, send, retry, count.

One task per shard, one batch in flight per shard, so a shard's batches
reach the adapter in order. The worker sends as soon as a batch is full, a
flush wants the events, or the bus stops; otherwise it lingers up to
``max_delay`` for a fuller batch. A retryable adapter error is retried with
a doubling backoff (``DispatchRetry``); any other error drops the batch at
once (its events counted as dropped). Cancelled mid-send (shutdown past its
deadline), the batch counts as dropped and as lost by shutdown.
"""

from __future__ import annotations

import asyncio
import time

import structlog

from .._tasks import cancel_and_wait
from ._adapter import Adapter
from ._config import DispatchRetry
from ._errors import AdapterError
from ._event import Record, to_records
from ._ring import ShardRing

__all__ = ["ShardWorker"]

_log = structlog.get_logger("clstr.eventbus")
# Weight of the newest batch in the latency average.
_EWMA: float = 0.2


class ShardWorker:
    """Sends one shard's batches (see the module docstring)."""

    def __init__(
        self, ring: ShardRing, adapter: Adapter, *, max_delay: float, retry: DispatchRetry
    ) -> None:
        self.ring = ring
        self.adapter = adapter
        self.max_delay = max_delay
        self.retry = retry
        self.stopping = False
        self.in_flight = 0  # events of the batch being sent
        self.batches = 0  # batches the adapter took
        self.batches_dropped = 0
        self.retries = 0
        self.lost = 0  # events dropped because shutdown cut a send short
        self.latency_ewma = 0.0  # seconds
        self.window_latency = 0.0  # sum over the scaling window
        self.window_batches = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start the loop (a task this worker owns)."""
        self._task = asyncio.get_running_loop().create_task(
            self.run(), name=f"clstr-bus-{self.adapter.bus}-shard-{self.ring.shard}"
        )

    def stop(self) -> None:
        """Finish what is queued, then end (see :meth:`wait`)."""
        self.stopping = True
        self.ring.wake.set()
        self.ring.full.set()

    async def wait(self, timeout: float | None) -> bool:
        """Wait up to ``timeout`` seconds for the loop to end; cancel it past that.
        Return whether it ended on its own."""
        task = self._task
        if task is None:
            return True
        done, _ = await asyncio.wait({task}, timeout=timeout)
        if done:
            return True
        await cancel_and_wait([task], insist=True)
        return False

    async def run(self) -> None:
        ring = self.ring
        queue = ring.queue
        while True:
            if not queue:
                if self.stopping:
                    return
                ring.wake.clear()
                await ring.wake.wait()
                continue
            if self.max_delay > 0 and not self.stopping and ring.lingering_allowed:
                ring.full.clear()
                try:
                    async with asyncio.timeout(self.max_delay):
                        await ring.full.wait()
                except TimeoutError:
                    pass
            first, items, stamps = ring.take(ring.batch_max)
            await self._send(first, to_records(items, stamps))

    async def _send(self, first: int, batch: list[Record]) -> None:
        ring = self.ring
        retry = self.retry
        started = time.perf_counter()
        backoff = retry.initial_backoff
        attempt = 1
        self.in_flight = len(batch)
        resolved = False
        try:
            while True:
                try:
                    await self.adapter.send(ring.shard, first, batch)
                except AdapterError as exc:
                    if exc.is_retryable() and (
                        retry.max_attempts is None or attempt < retry.max_attempts
                    ):
                        self.retries += 1
                        _log.info(
                            "adapter error: retrying the batch",
                            bus=self.adapter.bus,
                            shard=ring.shard,
                            attempt=attempt,
                            error=str(exc),
                        )
                        await asyncio.sleep(backoff)
                        backoff = min(backoff * 2, retry.max_backoff)
                        attempt += 1
                        continue
                    self._drop(first, batch, exc, attempt)
                except Exception as exc:  # an adapter bug: never retried
                    _log.exception("adapter raised a non-adapter error", bus=self.adapter.bus)
                    self._drop(first, batch, exc, attempt)
                else:
                    ring.resolve(dispatched=len(batch))
                    self.batches += 1
                resolved = True
                return
        finally:
            self.in_flight = 0
            if not resolved:  # cancelled: shutdown gave up on it
                self.lost += len(batch)
                ring.resolve(dropped=len(batch))
            elapsed = time.perf_counter() - started
            self.latency_ewma += _EWMA * (elapsed - self.latency_ewma)
            self.window_latency += elapsed
            self.window_batches += 1

    def _drop(self, first: int, batch: list[Record], exc: BaseException, attempts: int) -> None:
        self.batches_dropped += 1
        self.ring.resolve(dropped=len(batch))
        _log.warning(
            "batch dropped",
            bus=self.adapter.bus,
            shard=self.ring.shard,
            events=len(batch),
            first=first,
            attempts=attempts,
            error=f"{type(exc).__name__}: {exc}",
        )
