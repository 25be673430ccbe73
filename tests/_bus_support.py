"""Adapters with scripted behaviour for the event bus tests (they wrap the real memory
adapter: what they store is read back by real polls)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from clstr.eventbus import (
    BusStats,
    EventBus,
    FatalAdapterError,
    MemoryAdapter,
    TransientAdapterError,
)
from clstr.eventbus._event import Record


class ScriptedAdapter(MemoryAdapter):
    """A memory adapter that can be held (``gate``), fail ``transient`` attempts with a
    retryable error (``after_store``: having stored the frames first, as a lost ack
    does), and fail the batches whose first event number is in ``fatal_first``."""

    def __init__(
        self,
        *,
        open_gate: bool = True,
        transient: int = 0,
        after_store: bool = False,
        fatal_first: Sequence[tuple[int, int]] = (),
        max_frame_bytes: int = 0,
    ) -> None:
        super().__init__(max_frame_bytes=max_frame_bytes)
        self.gate = asyncio.Event()
        if open_gate:
            self.gate.set()
        self.transient = transient
        self.after_store = after_store
        self.fatal_first = set(fatal_first)
        self.attempts = 0
        self.entered = asyncio.Event()  # a send is waiting at the gate
        self.sent: list[tuple[int, int, int]] = []  # (shard, first, count) stored

    async def send(self, shard: int, first: int, records: Sequence[Record]) -> None:
        self.attempts += 1
        self.entered.set()
        await self.gate.wait()
        if (shard, first) in self.fatal_first:
            raise FatalAdapterError(f"batch {shard}/{first} refused for good")
        if self.transient:
            self.transient -= 1
            if self.after_store:
                await super().send(shard, first, records)
            raise TransientAdapterError("the ack was lost")
        await super().send(shard, first, records)
        self.sent.append((shard, first, len(records)))


def assert_invariant(stats: BusStats) -> None:
    """After shutdown: dispatched + dropped == ingested, nothing left queued or in flight."""
    assert stats.events_queued == 0
    assert stats.events_in_flight == 0
    assert stats.events_dispatched + stats.events_dropped == stats.events_ingested, stats
    assert stats.invariant_holds


def shard_of(bus: EventBus, key: str) -> int:
    """The shard ``key`` routes to now."""
    from clstr.eventbus._routing import TABLE_MASK

    slot = bus._table[bus.hash_key(key) & TABLE_MASK]
    return int(slot.shard)  # type: ignore[attr-defined]
