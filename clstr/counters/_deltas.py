"""What a :class:`LaxCounter` holds and how it sends it: the deltas not yet sent,
those sent and not yet answered (each under the number it was first sent
with), the totals the owners reported, and the flush round that turns the
first into the second and sends them, one batch per owner.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

import msgpack
import structlog

from .._clock import monotonic
from ..errors import (
    ClstrError,
    CounterFullError,
    CounterRangeError,
    RemoteHandlerError,
    RequestTimeoutError,
)
from ..metrics import Metrics
from ._entity import WRITER_TTL
from ._routing import Delivery
from ._strict import ADD, StrictCounter, counter_error, now_ms

__all__ = ["Deltas", "Item", "LaxStats"]

# A delta whose fate is still unknown this long after it was first sent is
# given up (logged): past WRITER_TTL its owner may no longer recognise it.
_GIVE_UP: Final = WRITER_TTL / 2
_LOG_EVERY: Final = 10.0

_log = structlog.get_logger("clstr.counters")


@dataclass(slots=True)
class LaxStats:
    """What a :class:`LaxCounter` did since it was made."""

    flushes: int = 0  # flush rounds that sent something
    messages: int = 0  # batch messages sent
    items: int = 0  # key deltas sent (a retried one counts again)
    acknowledged: int = 0  # key deltas acknowledged
    refused: int = 0  # increments of new keys refused (full)
    dropped: int = 0  # deltas given up (out of range, or unknown for too long)


class Item:
    """The delta of one key sent under number ``seq`` until it is answered."""

    __slots__ = ("delta", "first", "key", "sent", "seq", "since")

    def __init__(self, key: str, delta: int, seq: int, first: int) -> None:
        self.key = key
        self.delta = delta
        self.seq = seq
        self.sent: asyncio.Event | None = None  # while being sent: set when answered
        self.since = monotonic()
        self.first = first  # when it was first sent: wall clock, ms (the message's t)


class Deltas:
    """The deltas of one lax counter (module docstring). ``held`` keys (and all,
    while ``hold_all``) are left alone by :meth:`round`: an operation sends
    them itself, in its order."""

    def __init__(
        self, strict: StrictCounter, *, max_keys: int, timeout: float, metrics: Metrics
    ) -> None:
        self.strict = strict
        self.namespace = strict.namespace
        self.max_keys = max_keys
        self.timeout = timeout
        self.metrics = metrics
        self.stats = LaxStats()
        self.pending: dict[str, int] = {}  # added, not yet sent
        self.items: dict[str, list[Item]] = {}  # sent, not yet answered
        self.known: dict[str, int] = {}  # totals the owners reported
        self.held: dict[str, int] = {}
        self.hold_all = 0
        self.failing = False  # the last flush round acknowledged nothing
        self._full = False
        self._logged = 0.0

    def admit(self, key: str) -> None:
        """Room for a new key, or :class:`~clstr.CounterFullError` (counted, logged)."""
        held = len(self.pending) + len(self.items)
        if held < self.max_keys:
            return
        self.stats.refused += 1
        self.metrics.counter_refused(self.namespace)
        if not self._full:
            self._full = True
            _log.warning(
                "lax counter full: refusing increments of new keys until a flush gets through",
                namespace=self.namespace,
                keys=held,
                max_keys=self.max_keys,
            )
        raise CounterFullError(
            f"lax counter {self.namespace!r} holds unflushed deltas of {held} keys "
            f"(max_keys={self.max_keys}): its flushes are failing; {key!r} was not counted"
        )

    def estimate(self, key: str) -> int:
        """The last total the owner reported plus this process's deltas of ``key``
        that are not acknowledged."""
        sent = sum(item.delta for item in self.items.get(key, ()))
        return self.known.get(key, 0) + sent + self.pending.get(key, 0)

    def unflushed(self) -> dict[str, int]:
        """The deltas per key not acknowledged yet (added, or sent and unanswered)."""
        out = dict(self.pending)
        for key, items in self.items.items():
            out[key] = out.get(key, 0) + sum(i.delta for i in items)
        return {k: v for k, v in out.items() if v}

    async def round(self, flush_timeout: float) -> None:
        """One flush: pending deltas become items under one number (the batch id),
        and every item not answered (nor being sent) is sent."""
        if self.hold_all:
            return
        held = self.held
        fresh = [(k, d) for k, d in self.pending.items() if k not in held and k not in self.items]
        for key, _ in fresh:
            del self.pending[key]
        self.itemize([(k, d) for k, d in fresh if d])
        todo = [
            item
            for key, items in self.items.items()
            if key not in held
            for item in items
            if item.sent is None
        ]
        if not todo:
            return
        acked, _ = await self.send(todo, flush_timeout, patient=False)
        self.stats.flushes += 1
        self.failing = not acked

    def itemize(self, deltas: Iterable[tuple[str, int]]) -> list[Item]:
        """Items of ``deltas`` under one new number (a flush's batch id)."""
        deltas = list(deltas)
        if not deltas:
            return []
        seq = self.strict.session.open(key for key, _ in deltas)
        first = now_ms()
        made = [Item(key, delta, seq, first) for key, delta in deltas]
        for item in made:
            self.items.setdefault(item.key, []).append(item)
        return made

    async def send(
        self, items: list[Item], timeout: float, *, patient: bool = True
    ) -> tuple[int, ClstrError | None]:
        """Deliver ``items`` (one batch per owner); settle what came back; return
        how many were acknowledged, and the last error of the others."""
        strict = self.strict
        session = strict.session
        writer = session.writer
        deliveries = []
        answered = asyncio.Event()
        for item in items:
            item.sent = answered
            data = msgpack.packb(
                {
                    "n": item.delta,
                    "w": writer,
                    "q": item.seq,
                    "lo": session.low(item.key),
                    "t": item.first,
                }
            )
            deliveries.append(strict.delivery(item.key, ADD, data))
        courier = strict.courier
        messages, sent = courier.messages, courier.items
        try:
            await courier.deliver(deliveries, timeout=timeout, patient=patient)
        finally:
            for item in items:
                item.sent = None
            answered.set()
        self.stats.messages += courier.messages - messages
        self.stats.items += courier.items - sent
        self.metrics.counter_flushed(self.namespace, courier.messages - messages, len(items))
        acked = sum(self._settle_item(item, d) for item, d in zip(items, deliveries, strict=True))
        errors = [d.error for d in deliveries if d.result is None and d.error is not None]
        held = len(self.pending) + len(self.items)
        self.metrics.counter_unflushed(self.namespace, held)
        if self._full and held < self.max_keys:
            self._full = False
            _log.info("lax counter takes new keys again", namespace=self.namespace, keys=held)
        return acked, errors[-1] if errors else None

    def _settle_item(self, item: Item, delivery: Delivery) -> int:
        """Act on what came of one item: 1 when acknowledged."""
        if delivery.result is not None:
            self._forget(item)
            self.note(item.key, msgpack.unpackb(delivery.result))
            self.stats.acknowledged += 1
            return 1
        error = delivery.error
        mapped = counter_error(error) if isinstance(error, RemoteHandlerError) else None
        if mapped is not None:
            reason = "out_of_range" if isinstance(mapped, CounterRangeError) else "session_lost"
            self._drop(item, reason, mapped)
        elif monotonic() - item.since > _GIVE_UP:
            self._drop(item, "unknown", error)
        elif monotonic() - self._logged > _LOG_EVERY:
            self._logged = monotonic()
            _log.warning(
                "lax counter flush not acknowledged: kept for the next flush",
                namespace=self.namespace,
                keys=len(self.items),
                error=repr(error),
            )
        return 0

    def _forget(self, item: Item) -> None:
        items = self.items.get(item.key)
        if items is not None and item in items:
            items.remove(item)
            if not items:
                del self.items[item.key]
            self.strict.session.close(item.key, item.seq)

    def _drop(self, item: Item, reason: str, error: BaseException | None) -> None:
        self._forget(item)
        self.stats.dropped += 1
        self.metrics.counter_dropped(self.namespace, reason)
        _log.error(
            "lax counter gave up a delta",
            namespace=self.namespace,
            key=item.key,
            delta=item.delta,
            reason=reason,
            error=repr(error),
        )

    def note(self, key: str, total: int) -> None:
        """Remember the total the owner reported for ``key`` (for the estimate)."""
        known = self.known
        known[key] = total
        if len(known) > self.max_keys:
            del known[next(iter(known))]

    async def settle(self, keys: list[str]) -> None:
        """Flush the deltas of ``keys`` (pending and unanswered) and wait for their
        answers; raises the last error of those still unanswered after ``timeout``."""
        deadline = monotonic() + self.timeout
        while True:
            # Sent by a flush (before the key was held) or another operation: its answer first.
            sending = [i.sent for k in keys for i in self.items.get(k, ()) if i.sent is not None]
            if not sending:
                break
            try:
                async with asyncio.timeout(max(deadline - monotonic(), 0)):
                    await sending[0].wait()
            except TimeoutError:
                raise RequestTimeoutError("a flush of these keys did not end in time") from None
        fresh = [(k, self.pending.pop(k)) for k in keys if k in self.pending]
        self.itemize([(k, d) for k, d in fresh if d])
        items = [i for k in keys for i in self.items.get(k, ()) if i.sent is None]
        if not items:
            return
        _, error = await self.send(items, max(deadline - monotonic(), 0.001))
        left = [i for i in items if i in self.items.get(i.key, ())]
        if left:
            raise error or RequestTimeoutError(
                f"deltas of {len(left)} keys of {self.namespace!r} are not acknowledged yet "
                "(kept for the next flush)"
            )
