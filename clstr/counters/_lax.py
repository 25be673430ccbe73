"""LaxCounter: increments added in memory, flushed to the keys' owners in batches.

``inc_nowait`` adds to a dict and returns: no network, no await. A flusher
task sends what was added every ``allowed_lag`` seconds, one batch message
per owner (:class:`~clstr.counters._routing.Courier`), each key's delta an
``add`` item under the flush's number (its batch id): the owner applies each
item once however often it is sent (the counters' sessions, ``_entity``).

What can be lost: only deltas this process added and had not had
acknowledged when it died (docs/counters.md). A flush that fails keeps its
deltas — under their number, so that sending them again never counts them
twice — and the next flush sends them again; while the cluster does not take
them, the counter holds at most ``max_keys`` keys and refuses increments of
new ones (:class:`~clstr.CounterFullError`, a metric, a log line).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Final, Self

import msgpack
import structlog

from .._clock import monotonic
from .._tasks import cancel_and_wait
from ..client import DEFAULT_TIMEOUT, Client, RetryPolicy
from ..entities import Sharding, StateStore
from ..errors import (
    ClstrError,
    ConfigurationError,
    CounterFlushError,
    CounterFullError,
    CounterRangeError,
    LifecycleError,
    RemoteHandlerError,
    RequestTimeoutError,
)
from ..metrics import NOOP_METRICS, Metrics
from ._entity import WRITER_TTL
from ._keys import VALUE_MAX, VALUE_MIN, check_amount, check_key
from ._routing import Delivery
from ._strict import ADD, DEFAULT_COUNTER_RETRY, StrictCounter, range_error

__all__ = ["DEFAULT_ALLOWED_LAG", "DEFAULT_FLUSH_TIMEOUT", "LaxCounter", "LaxStats"]

#: Seconds between flushes by default.
DEFAULT_ALLOWED_LAG: Final = 0.02
#: How long a flush waits for an owner's answer by default (at most the
#: counter's timeout). Short: a batch whose owner died with it is only found
#: out by this timeout, and sending it again is safe (the owner answers what
#: it applied already without applying it again, and drops what waited in its
#: queue past the batch's deadline).
DEFAULT_FLUSH_TIMEOUT: Final = 2.0
# A delta whose fate is still unknown this long after it was first sent is
# given up (logged): past WRITER_TTL its owner may no longer recognise it.
_GIVE_UP: Final = WRITER_TTL / 2
# Flush rounds that fail wait longer before the next one, up to this.
_MAX_PAUSE: Final = 1.0
# Flush rounds under way at once at most.
_ROUNDS: Final = 4
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


class _Item:
    """The delta of one key sent under number ``seq`` until it is answered."""

    __slots__ = ("delta", "key", "sent", "seq", "since")

    def __init__(self, key: str, delta: int, seq: int) -> None:
        self.key = key
        self.delta = delta
        self.seq = seq
        self.sent: asyncio.Event | None = None  # while being sent: set when answered
        self.since = monotonic()


class LaxCounter:
    """Counters incremented in memory and flushed in batches (module docstring):
    for page views, rate limits, metrics — where the last ``allowed_lag``
    seconds of increments of a process that dies may be lost.

    ``source``, ``namespace``, ``timeout``, ``retry`` and ``store`` are those of
    :class:`StrictCounter`, which :meth:`get`, :meth:`set`, :meth:`delete` and
    :meth:`clear` use after flushing the key's deltas. Increments are flushed
    every ``allowed_lag`` seconds, each flush waiting at most ``flush_timeout``
    (default 2 s, at most ``timeout``) for its answers. At most ``max_keys``
    keys are held unflushed. ``close()`` (or leaving ``async with``) flushes
    and stops the flusher.
    """

    def __init__(
        self,
        source: Client | Sharding,
        namespace: str,
        *,
        allowed_lag: float = DEFAULT_ALLOWED_LAG,
        max_keys: int = 100_000,
        timeout: float = DEFAULT_TIMEOUT,
        flush_timeout: float | None = None,
        retry: RetryPolicy = DEFAULT_COUNTER_RETRY,
        store: StateStore | None = None,
        metrics: Metrics = NOOP_METRICS,
    ) -> None:
        if not allowed_lag > 0 or max_keys < 1:
            raise ConfigurationError("LaxCounter needs allowed_lag > 0 and max_keys >= 1")
        self.strict = StrictCounter(source, namespace, timeout=timeout, retry=retry, store=store)
        self.namespace = self.strict.namespace
        self.allowed_lag = allowed_lag
        self.max_keys = max_keys
        self.timeout = timeout
        self.flush_timeout = (
            min(timeout, DEFAULT_FLUSH_TIMEOUT) if flush_timeout is None else flush_timeout
        )
        self.metrics = metrics
        self.stats = LaxStats()
        self._pending: dict[str, int] = {}  # added, not yet sent
        self._items: dict[str, list[_Item]] = {}  # sent, not yet answered
        self._known: dict[str, int] = {}  # totals the owners reported
        self._held: dict[str, int] = {}  # keys an operation flushes itself
        self._hold_all = 0
        self._closed = False
        self._flusher: asyncio.Task[None] | None = None
        self._work = asyncio.Event()  # something to flush
        self._stop = asyncio.Event()
        self._failing = False  # the last flush round acknowledged nothing
        self._full = False
        self._logged = 0.0

    # -- the hot path ------------------------------------------------------------

    def inc_nowait(self, key: str, n: int = 1) -> None:
        """Add ``n`` to ``key`` here; the flusher sends it within ``allowed_lag``.

        Call it from the event loop's thread. Raises
        :class:`~clstr.CounterFullError` for a new key while ``max_keys`` keys
        are held, :class:`~clstr.CounterRangeError` for an ``n`` (or an unflushed
        sum) outside the signed 64-bit range, :class:`~clstr.LifecycleError`
        once closed.
        """
        pending = self._pending
        total = pending.get(key)
        if total is None or self._closed:
            total = self._admit(key)
        total += n
        if type(n) is not int or not VALUE_MIN <= total <= VALUE_MAX:
            check_amount(n)
            raise CounterRangeError(
                f"the unflushed delta of {key!r} would leave the signed 64-bit range"
            )
        pending[key] = total

    def _admit(self, key: str) -> int:
        """A key new to the pending deltas: checked, within the bound, flusher awake."""
        self._check_open()
        check_key(key)
        held = len(self._pending) + len(self._items)
        if held >= self.max_keys:
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
        if not self._pending:
            self._wake()
        return 0

    def _check_open(self) -> None:
        if self._closed:
            raise LifecycleError(f"lax counter {self.namespace!r} is closed; make a new one")

    def _wake(self) -> None:
        if self._closed:
            return
        if self._flusher is None:
            self._flusher = asyncio.get_running_loop().create_task(
                self._run(), name=f"clstr-lax-flusher-{self.namespace}"
            )
        self._work.set()

    # -- the Counter interface ---------------------------------------------------

    async def inc(self, key: str, n: int = 1) -> int:
        """:meth:`inc_nowait`, then return the estimate: the last total the owner
        reported for ``key`` plus this process's unacknowledged deltas."""
        self.inc_nowait(key, n)
        return self.estimate(key)

    def estimate(self, key: str) -> int:
        """The last total the owner reported plus this process's deltas of ``key``
        that are not acknowledged (no network)."""
        sent = sum(item.delta for item in self._items.get(key, ()))
        return self._known.get(key, 0) + sent + self._pending.get(key, 0)

    async def get(self, key: str) -> int:
        """The owner's value after this process's deltas of ``key`` are flushed,
        plus those added since."""
        self._check_open()
        check_key(key)
        async with self._holding(key):
            await self._settle([key])
            value = await self.strict.get(key)
            self._note(key, value)
            return value + self._pending.get(key, 0)

    async def set(self, key: str, value: int) -> None:
        """Set ``key`` after this process's earlier deltas of it (which it flushes
        first); increments made meanwhile count after the set."""
        self._check_open()
        check_key(key)
        check_amount(value, "value")
        async with self._holding(key):
            await self._settle([key])
            await self.strict.set(key, value)
            self._note(key, value)

    async def delete(self, key: str) -> int:
        """Delete ``key`` after flushing this process's deltas of it; return its
        value before."""
        self._check_open()
        check_key(key)
        async with self._holding(key):
            await self._settle([key])
            old = await self.strict.delete(key)
            self._note(key, 0)
            return old

    async def clear(self) -> None:
        """Flush everything, then delete every key of the namespace."""
        self._check_open()
        self._hold_all += 1
        try:
            await self._settle(list({*self._pending, *self._items}))
            await self.strict.clear()
            self._known.clear()
        finally:
            self._hold_all -= 1

    async def flush(self) -> None:
        """Send every delta added so far and wait until all are acknowledged;
        raises the last error when some are not within ``timeout`` (they stay,
        for the next flush)."""
        self._check_open()
        self._hold_all += 1
        try:
            await self._settle(list({*self._pending, *self._items}))
        finally:
            self._hold_all -= 1

    def unflushed(self) -> dict[str, int]:
        """The deltas per key not acknowledged yet (added, or sent and unanswered)."""
        out = dict(self._pending)
        for key, items in self._items.items():
            out[key] = out.get(key, 0) + sum(i.delta for i in items)
        return {k: v for k, v in out.items() if v}

    async def close(self, timeout: float | None = None) -> None:
        """Stop the flusher, flush what is left (for up to ``timeout`` seconds,
        default the counter's) and release the counter. Idempotent.

        Raises :class:`~clstr.CounterFlushError` when deltas are left that could
        not be flushed (the message says how many): they are not counted.
        """
        if self._closed:
            return
        self._closed = True
        failure: ClstrError | None = None
        try:
            await self._stop_flusher()
            self.timeout = self.timeout if timeout is None else timeout
            await self._settle(list({*self._pending, *self._items}))
        except ClstrError as exc:
            failure = exc
        finally:
            await self.strict.close()
        left = self.unflushed()
        if left:
            _log.error(
                "lax counter closed with unflushed deltas: they are not counted",
                namespace=self.namespace,
                keys=len(left),
                error=str(failure),
            )
            raise CounterFlushError(
                f"lax counter {self.namespace!r} closed with deltas of {len(left)} keys "
                f"({sum(left.values()):+d} in all) not acknowledged: {failure}"
            )

    async def __aenter__(self) -> Self:
        self._check_open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- flushing ----------------------------------------------------------------

    async def _run(self) -> None:
        """The flusher: a round ``allowed_lag`` after work arrives, then one every
        ``allowed_lag`` while there is work. Rounds overlap (up to a few at once),
        so that an owner slow to answer holds up only its own keys; while rounds
        acknowledge nothing, the pause between them grows (up to 1 s)."""
        rounds: set[asyncio.Task[None]] = set()
        pause = self.allowed_lag
        try:
            while not self._stop.is_set():
                if not self._pending and not self._items:
                    self._work.clear()
                    await self._work.wait()  # (close() sets it too)
                    pause = self.allowed_lag
                    continue
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(pause):
                        await self._stop.wait()
                if self._stop.is_set():
                    break
                if len(rounds) < _ROUNDS:
                    task = asyncio.get_running_loop().create_task(self._round())
                    rounds.add(task)
                    task.add_done_callback(rounds.discard)
                pause = (
                    min(max(pause * 2, self.allowed_lag), _MAX_PAUSE)
                    if self._failing
                    else self.allowed_lag
                )
        finally:
            # Rounds under way end with their answers (or their timeout).
            if rounds:
                _, late = await asyncio.wait(rounds, timeout=self.flush_timeout + 1.0)
                await cancel_and_wait(late, insist=True)

    async def _round(self) -> None:
        """One flush: pending deltas become items under one number (the batch id),
        and every item not answered (nor being sent) is sent."""
        if self._hold_all:
            return
        held = self._held
        fresh = [(k, d) for k, d in self._pending.items() if k not in held and k not in self._items]
        for key, _ in fresh:
            del self._pending[key]
        self._itemize([(k, d) for k, d in fresh if d])
        todo = [
            item
            for key, items in self._items.items()
            if key not in held
            for item in items
            if item.sent is None
        ]
        if not todo:
            return
        acked, _ = await self._send(todo, self.flush_timeout)
        self.stats.flushes += 1
        self._failing = not acked

    def _itemize(self, deltas: Iterable[tuple[str, int]]) -> list[_Item]:
        """Items of ``deltas`` under one new number (a flush's batch id)."""
        deltas = list(deltas)
        if not deltas:
            return []
        seq = self.strict.session.open(len(deltas))
        made = [_Item(key, delta, seq) for key, delta in deltas]
        for item in made:
            self._items.setdefault(item.key, []).append(item)
        return made

    async def _send(self, items: list[_Item], timeout: float) -> tuple[int, ClstrError | None]:
        """Deliver ``items`` (one batch per owner); settle what came back; return
        how many were acknowledged, and the last error of the others."""
        strict = self.strict
        session = strict.session
        writer, low = session.writer, session.low
        deliveries = []
        answered = asyncio.Event()
        for item in items:
            item.sent = answered
            data = msgpack.packb({"n": item.delta, "w": writer, "q": item.seq, "lo": low})
            deliveries.append(strict.delivery(item.key, ADD, data))
        courier = strict.courier
        messages, sent = courier.messages, courier.items
        try:
            await courier.deliver(deliveries, timeout=timeout)
        finally:
            for item in items:
                item.sent = None
            answered.set()
        self.stats.messages += courier.messages - messages
        self.stats.items += courier.items - sent
        self.metrics.counter_flushed(self.namespace, courier.messages - messages, len(items))
        acked = sum(self._settle_item(item, d) for item, d in zip(items, deliveries, strict=True))
        errors = [d.error for d in deliveries if d.result is None and d.error is not None]
        held = len(self._pending) + len(self._items)
        self.metrics.counter_unflushed(self.namespace, held)
        if self._full and held < self.max_keys:
            self._full = False
            _log.info("lax counter takes new keys again", namespace=self.namespace, keys=held)
        return acked, errors[-1] if errors else None

    def _settle_item(self, item: _Item, delivery: Delivery) -> int:
        """Act on what came of one item: 1 when acknowledged."""
        if delivery.result is not None:
            self._forget(item)
            self._note(item.key, msgpack.unpackb(delivery.result))
            self.stats.acknowledged += 1
            return 1
        error = delivery.error
        mapped = range_error(error) if isinstance(error, RemoteHandlerError) else None
        if mapped is not None:
            self._drop(item, "out_of_range", mapped)
        elif monotonic() - item.since > _GIVE_UP:
            self._drop(item, "unknown", error)
        elif monotonic() - self._logged > _LOG_EVERY:
            self._logged = monotonic()
            _log.warning(
                "lax counter flush not acknowledged: kept for the next flush",
                namespace=self.namespace,
                keys=len(self._items),
                error=repr(error),
            )
        return 0

    def _forget(self, item: _Item) -> None:
        items = self._items.get(item.key)
        if items is not None and item in items:
            items.remove(item)
            if not items:
                del self._items[item.key]
            self.strict.session.close(item.seq)

    def _drop(self, item: _Item, reason: str, error: BaseException | None) -> None:
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

    def _note(self, key: str, total: int) -> None:
        known = self._known
        known[key] = total
        if len(known) > self.max_keys:
            del known[next(iter(known))]

    async def _settle(self, keys: list[str]) -> None:
        """Flush the deltas of ``keys`` (pending and unanswered) and wait for their
        answers; raises the last error of those still unanswered after ``timeout``."""
        deadline = monotonic() + self.timeout
        while True:
            # Sent by a flush (before the key was held) or another operation: its answer first.
            sending = [i.sent for k in keys for i in self._items.get(k, ()) if i.sent is not None]
            if not sending:
                break
            try:
                async with asyncio.timeout(max(deadline - monotonic(), 0)):
                    await sending[0].wait()
            except TimeoutError:
                raise RequestTimeoutError("a flush of these keys did not end in time") from None
        fresh = [(k, self._pending.pop(k)) for k in keys if k in self._pending]
        self._itemize([(k, d) for k, d in fresh if d])
        items = [i for k in keys for i in self._items.get(k, ()) if i.sent is None]
        if not items:
            return
        _, error = await self._send(items, max(deadline - monotonic(), 0.001))
        left = [i for i in items if i in self._items.get(i.key, ())]
        if left:
            raise error or RequestTimeoutError(
                f"deltas of {len(left)} keys of {self.namespace!r} are not acknowledged yet "
                "(kept for the next flush)"
            )

    @contextlib.asynccontextmanager
    async def _holding(self, key: str) -> AsyncIterator[None]:
        """The flusher leaves ``key`` alone meanwhile: the operation orders it."""
        self._held[key] = self._held.get(key, 0) + 1
        try:
            yield
        finally:
            left = self._held[key] - 1
            if left:
                self._held[key] = left
            else:
                del self._held[key]
                if self._pending.get(key):
                    self._wake()

    async def _stop_flusher(self) -> None:
        flusher, self._flusher = self._flusher, None
        if flusher is None:
            return
        self._stop.set()
        self._work.set()
        done, _ = await asyncio.wait({flusher}, timeout=self.flush_timeout + 1.0)
        if not done:
            await cancel_and_wait([flusher], insist=True)
