"""What a bus reports: its counters, whole and per shard.

The invariant: every ingested event is queued, in flight, dispatched or
dropped, so at any moment ``events_dispatched + events_dropped +
events_queued + events_in_flight == events_ingested``, and after shutdown
(nothing queued or in flight) ``events_dispatched + events_dropped ==
events_ingested``. Refused events (``events_rejected``) were never ingested.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from ._dispatch import ShardWorker
from ._ring import ShardRing

__all__ = ["BusStats", "ShardStats", "shard_stats"]


@dataclass(frozen=True, slots=True)
class ShardStats:
    """One shard's counters (``dropped`` includes ``evicted``)."""

    shard: int
    capacity: int
    queued: int
    in_flight: int
    ingested: int
    dispatched: int
    dropped: int
    evicted: int
    rejected: int
    batches: int
    latency_ms: float

    @property
    def fill(self) -> float:
        """How full the ring is now (0..1)."""
        return self.queued / self.capacity


@dataclass(frozen=True, slots=True)
class BusStats:
    """The bus's counters (see the module docstring for the invariant).

    ``events_dropped`` counts accepted events that will never reach the
    adapter: evicted (``DROP_OLDEST``), in batches the adapter refused for good,
    or given up by a shutdown past its deadline (then ``shutdown_was_lossy``).
    ``rejected`` breaks ``events_rejected`` down by reason: ``backpressure``,
    ``sampled``, ``unrouted``, ``shutting_down``, ``not_started``, ``invalid``.
    ``retries`` counts batch attempts repeated after a retryable adapter error.
    ``dispatch_latency_ms`` is a moving average of the time a batch took to
    reach the adapter. ``shards`` lists the live shards; ``retired_shards``
    the ids of removed ones (their counters stay in the totals).
    """

    events_ingested: int
    events_dispatched: int
    events_dropped: int
    events_queued: int
    events_in_flight: int
    events_rejected: int
    batches_dispatched: int
    batches_dropped: int
    retries: int
    shutdown_was_lossy: bool
    dispatch_latency_ms: float
    rejected: Mapping[str, int]
    shards: tuple[ShardStats, ...]
    retired_shards: tuple[int, ...]

    @property
    def invariant_holds(self) -> bool:
        """``dispatched + dropped + queued + in_flight == ingested``."""
        return (
            self.events_dispatched
            + self.events_dropped
            + self.events_queued
            + self.events_in_flight
            == self.events_ingested
        )


def shard_stats(ring: ShardRing, worker: ShardWorker) -> ShardStats:
    """The counters of one shard now."""
    return ShardStats(
        shard=ring.shard,
        capacity=ring.capacity,
        queued=len(ring.queue),
        in_flight=worker.in_flight,
        ingested=ring.accepted,
        dispatched=ring.dispatched,
        dropped=ring.dropped + ring.evicted,
        evicted=ring.evicted,
        rejected=ring.rejected,
        batches=worker.batches,
        latency_ms=worker.latency_ewma * 1000,
    )
