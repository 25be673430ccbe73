"""Adding and removing shards without losing or reordering events, and autoscaling.

A rescale computes the new bucket -> shard plan (HRW over the new shard ids,
so only the buckets whose owner changes move), then:

1. starts the new shards' rings and workers (no bucket routes to them yet);
2. marks every moving bucket *unrouted*: ``ingest`` refuses its keys with
   :class:`~clstr.eventbus.UnroutedError` and ``ingest_wait`` waits;
3. waits until every shard that loses buckets has resolved every event it
   had accepted (a flush barrier on those shards only; the other keys keep
   flowing, also into those shards);
4. routes the moving buckets to their new shards, and lets the waiters in;
5. stops the removed shards' workers (their rings are empty by then).

What holds across a rescale: **no event is lost** (a removed shard is
drained before it goes; nothing is refused but the moving keys, and only
while they move); **each shard's events stay in order**; and **a key's
events stay in ingestion order in the log**: every event of a moving key
that the old shard accepted has reached the adapter before the new shard
accepts the key's next one. Shard ids are never reused, so a removed shard's
subject in the log only ever holds its own events. What does not hold: an
order *between shards* (two shards' batches reach the adapter concurrently);
a reader that wants a key's events in order across a rescale merges by
timestamp (``Ordering.TIMESTAMP``), or reads the old shard to its end first.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from typing import Protocol

import structlog

from .._tasks import cancel_and_wait
from ..errors import ConfigurationError
from ._adapter import Adapter
from ._config import BusConfig
from ._dispatch import ShardWorker
from ._errors import ShuttingDownError
from ._ring import ShardRing
from ._routing import MAX_BUS_SHARDS, TABLE_SIZE, Slot, plan
from ._scaling import ScalingAction, ScalingSignals, ScalingSuggestion, suggest
from ._stats import ShardStats, shard_stats

__all__ = ["RescaleHost", "Rescaler"]

_log = structlog.get_logger("clstr.eventbus")


class RescaleHost(Protocol):
    """What the rescaler needs of its bus."""

    config: BusConfig
    adapter: Adapter
    name: str
    rings: dict[int, ShardRing]
    workers: dict[int, ShardWorker]

    @property
    def running(self) -> bool: ...

    def install(self, bucket: int, slot: Slot | None) -> None: ...


class Rescaler:
    """The shard set of one bus (see the module docstring)."""

    def __init__(self, host: RescaleHost) -> None:
        self._host = host
        self._plan: list[int] = []
        self._lock = asyncio.Lock()
        self._settled = asyncio.Event()
        self._settled.set()
        self._next_id = 0
        self.retired: dict[int, ShardStats] = {}
        self.retired_batches_dropped = 0
        self.retired_retries = 0
        self._auto: asyncio.Task[None] | None = None
        self._window_start = time.monotonic()
        self._window_pressure = 0
        self._window_offered = 0
        self._last_applied = float("-inf")

    # -- lifecycle ------------------------------------------------------------

    async def start(self, shards: Iterable[int]) -> None:
        """Start the first shards and route every bucket."""
        ids = list(shards)
        for shard in ids:
            self._add_ring(shard)
        self._plan = await asyncio.to_thread(plan, ids, self._host.config.seed)
        for bucket in range(TABLE_SIZE):
            self._host.install(bucket, self._host.rings[self._plan[bucket]])
        if self._host.config.scaling.auto:
            self._auto = asyncio.get_running_loop().create_task(
                self._autoscale(), name=f"clstr-bus-{self._host.name}-autoscale"
            )

    async def stop(self) -> None:
        """Stop autoscaling (the bus is shutting down)."""
        if self._auto is not None:
            await cancel_and_wait([self._auto], insist=True)
            self._auto = None

    async def settled(self) -> None:
        """Wait until no rescale is moving keys."""
        await self._settled.wait()

    def _add_ring(self, shard: int) -> None:
        config = self._host.config
        ring = ShardRing(shard, config.ring_capacity, config.batch.max_events, config.backpressure)
        worker = ShardWorker(
            ring,
            self._host.adapter,
            max_delay=config.batch.max_delay_ms / 1000,
            retry=config.retry,
        )
        self._host.rings[shard] = ring
        self._host.workers[shard] = worker
        worker.start()
        self._next_id = max(self._next_id, shard + 1)

    # -- rescaling ------------------------------------------------------------

    async def add(self, n: int) -> list[int]:
        """Add ``n`` shards (new ids, never reused); return their ids."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigurationError(f"add_shards takes a count >= 1, got {n!r}")
        async with self._lock:
            self._require_running()
            if len(self._host.rings) + n > MAX_BUS_SHARDS:
                raise ConfigurationError(
                    f"bus {self._host.name!r} would have {len(self._host.rings) + n} shards, "
                    f"over {MAX_BUS_SHARDS}"
                )
            added = list(range(self._next_id, self._next_id + n))
            await self._move([*self._host.rings, *added], added, [])
            _log.info("shards added", bus=self._host.name, added=added)
            return added

    async def remove(self, shards: Iterable[int]) -> None:
        """Remove ``shards`` once their queued events reached the adapter."""
        removed = sorted(set(shards))
        async with self._lock:
            self._require_running()
            unknown = [s for s in removed if s not in self._host.rings]
            if unknown:
                raise ConfigurationError(
                    f"bus {self._host.name!r} has no shard {unknown}; "
                    f"its shards: {sorted(self._host.rings)}"
                )
            left = [s for s in self._host.rings if s not in removed]
            if not left:
                raise ConfigurationError("remove_shards would leave the bus with no shard")
            await self._move(left, [], removed)
            for shard in removed:
                await self._retire(shard)
            _log.info("shards removed", bus=self._host.name, removed=removed)

    def _require_running(self) -> None:
        if not self._host.running:
            raise ShuttingDownError(f"bus {self._host.name!r} is not running: it cannot rescale")

    async def _move(self, target: list[int], added: list[int], removed: list[int]) -> None:
        host = self._host
        new_plan = await asyncio.to_thread(plan, sorted(target), host.config.seed)
        self._require_running()  # shutdown may have begun meanwhile: start no worker then
        for shard in added:
            self._add_ring(shard)
        old_plan = self._plan
        moving = [b for b in range(TABLE_SIZE) if new_plan[b] != old_plan[b]]
        self._settled.clear()
        try:
            for bucket in moving:
                host.install(bucket, None)
            losing = {old_plan[b] for b in moving}
            barrier = [w for s in losing if (w := host.rings[s].flush_target()) is not None]
            if barrier:
                await asyncio.gather(*barrier)
            self._require_running()
            self._plan = new_plan
        finally:
            # The new plan once the barrier held; the old one if it failed.
            for bucket in moving:
                host.install(bucket, host.rings[self._plan[bucket]])
            self._settled.set()
            if self._plan is old_plan:
                for shard in added:
                    await self._retire(shard)

    async def _retire(self, shard: int) -> None:
        host = self._host
        ring, worker = host.rings.pop(shard), host.workers.pop(shard)
        ring.live = False
        worker.stop()
        await worker.wait(None)
        ring.release_waiters()  # they route again, to the key's new shard
        self.retired[shard] = shard_stats(ring, worker)
        self.retired_batches_dropped += worker.batches_dropped
        self.retired_retries += worker.retries

    # -- the scaling rule -------------------------------------------------------

    def suggest(self) -> ScalingSuggestion:
        """Measure the signals over the window since the last call; apply the rule."""
        now = time.monotonic()
        rings = list(self._host.rings.values())
        workers = list(self._host.workers.values())
        peak = 0.0
        for ring in rings:
            peak = max(peak, max(ring.peak, len(ring.queue)) / ring.capacity)
            ring.peak = len(ring.queue)
        everything = [*(shard_stats(r, self._host.workers[r.shard]) for r in rings)]
        everything += self.retired.values()
        pressure = sum(s.evicted + s.rejected for s in everything)
        offered = sum(s.ingested + s.rejected for s in everything)
        d_pressure = pressure - self._window_pressure
        d_offered = offered - self._window_offered
        batches = sum(w.window_batches for w in workers)
        latency = sum(w.window_latency for w in workers) / batches * 1000 if batches else 0.0
        for worker in workers:
            worker.window_batches, worker.window_latency = 0, 0.0
        signals = ScalingSignals(
            window=now - self._window_start,
            peak_fill=peak,
            drop_rate=d_pressure / d_offered if d_offered else 0.0,
            latency_ms=latency,
            batches=batches,
        )
        self._window_start, self._window_pressure, self._window_offered = now, pressure, offered
        return suggest(self._host.config.scaling, len(rings), signals)

    async def _autoscale(self) -> None:
        policy = self._host.config.scaling
        while True:
            await asyncio.sleep(policy.interval)
            advice = self.suggest()
            if advice.action is ScalingAction.HOLD:
                continue
            if time.monotonic() - self._last_applied < policy.cooldown:
                continue
            try:
                if advice.action is ScalingAction.ADD:
                    await self.add(advice.shards)
                else:
                    await self.remove([max(self._host.rings)])
            except ShuttingDownError:
                return
            except Exception:
                _log.exception("autoscaling failed", bus=self._host.name)
                continue
            self._last_applied = time.monotonic()
            _log.info(
                "autoscaled",
                bus=self._host.name,
                action=advice.action.value,
                shards=advice.target,
                reason=advice.reason,
            )
