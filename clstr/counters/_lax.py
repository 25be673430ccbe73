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
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Final, Self

import structlog

from .._tasks import cancel_and_wait
from ..client import DEFAULT_TIMEOUT, Client, RetryPolicy
from ..entities import Sharding, StateStore
from ..errors import (
    ClstrError,
    ConfigurationError,
    CounterFlushError,
    CounterRangeError,
    LifecycleError,
)
from ..metrics import NOOP_METRICS, Metrics
from ._deltas import Deltas, LaxStats
from ._keys import VALUE_MAX, VALUE_MIN, check_amount, check_key
from ._session import Session
from ._strict import DEFAULT_COUNTER_RETRY, StrictCounter

__all__ = ["DEFAULT_ALLOWED_LAG", "DEFAULT_FLUSH_TIMEOUT", "LaxCounter", "LaxStats"]

#: Seconds between flushes by default.
DEFAULT_ALLOWED_LAG: Final = 0.02
#: How long a flush waits for an owner's answer by default (at most the
#: counter's timeout). Short: a batch whose owner died with it is only found
#: out by this timeout, and sending it again is safe (the owner answers what
#: it applied already without applying it again, and drops what waited in its
#: queue past the batch's deadline).
DEFAULT_FLUSH_TIMEOUT: Final = 2.0
# Flush rounds that fail wait longer before the next one, up to this.
_MAX_PAUSE: Final = 1.0
# Flush rounds under way at once at most.
_ROUNDS: Final = 4

_log = structlog.get_logger("clstr.counters")


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
        # A writer session of its own: its deltas may wait long for an owner, and
        # strict counters sharing the session would then keep more replies.
        self.strict = StrictCounter(
            source, namespace, timeout=timeout, retry=retry, store=store, session=Session()
        )
        self.namespace = self.strict.namespace
        self.allowed_lag = allowed_lag
        self.flush_timeout = (
            min(timeout, DEFAULT_FLUSH_TIMEOUT) if flush_timeout is None else flush_timeout
        )
        self.deltas = Deltas(self.strict, max_keys=max_keys, timeout=timeout, metrics=metrics)
        self._pending = self.deltas.pending  # the hot path's dict
        self._closed = False
        self._flusher: asyncio.Task[None] | None = None
        self._work = asyncio.Event()  # something to flush
        self._stop = asyncio.Event()

    @property
    def stats(self) -> LaxStats:
        """What this counter did since it was made."""
        return self.deltas.stats

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
        self.deltas.admit(key)
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
        return self.deltas.estimate(key)

    def estimate(self, key: str) -> int:
        """The last total the owner reported plus this process's deltas of ``key``
        that are not acknowledged (no network)."""
        return self.deltas.estimate(key)

    async def get(self, key: str) -> int:
        """The owner's value after this process's deltas of ``key`` are flushed,
        plus those added since."""
        self._check_open()
        check_key(key)
        async with self._holding(key):
            await self.deltas.settle([key])
            value = await self.strict.get(key)
            self.deltas.note(key, value)
            return value + self._pending.get(key, 0)

    async def set(self, key: str, value: int) -> None:
        """Set ``key`` after this process's earlier deltas of it (which it flushes
        first); increments made meanwhile count after the set."""
        self._check_open()
        check_key(key)
        check_amount(value, "value")
        async with self._holding(key):
            await self.deltas.settle([key])
            await self.strict.set(key, value)
            self.deltas.note(key, value)

    async def delete(self, key: str) -> int:
        """Delete ``key`` after flushing this process's deltas of it; return its
        value before."""
        self._check_open()
        check_key(key)
        async with self._holding(key):
            await self.deltas.settle([key])
            old = await self.strict.delete(key)
            self.deltas.note(key, 0)
            return old

    async def clear(self) -> None:
        """Flush everything, then delete every key of the namespace."""
        self._check_open()
        async with self._holding(None):
            await self.deltas.settle(self._all_keys())
            await self.strict.clear()
            self.deltas.known.clear()

    async def flush(self) -> None:
        """Send every delta added so far and wait until all are acknowledged;
        raises the last error when some are not within ``timeout`` (they stay,
        for the next flush)."""
        self._check_open()
        async with self._holding(None):
            await self.deltas.settle(self._all_keys())

    def unflushed(self) -> dict[str, int]:
        """The deltas per key not acknowledged yet (added, or sent and unanswered)."""
        return self.deltas.unflushed()

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
            if timeout is not None:
                self.deltas.timeout = timeout
            await self.deltas.settle(self._all_keys())
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

    # -- the flusher -------------------------------------------------------------

    async def _run(self) -> None:
        """The flusher: a round ``allowed_lag`` after work arrives, then one every
        ``allowed_lag`` while there is work. Rounds overlap (up to a few at once),
        so that an owner slow to answer holds up only its own keys; while rounds
        acknowledge nothing, the pause between them grows (up to 1 s)."""
        deltas = self.deltas
        rounds: set[asyncio.Task[None]] = set()
        pause = self.allowed_lag
        try:
            while not self._stop.is_set():
                if not deltas.pending and not deltas.items:
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
                    task = asyncio.get_running_loop().create_task(deltas.round(self.flush_timeout))
                    rounds.add(task)
                    task.add_done_callback(rounds.discard)
                pause = (
                    min(max(pause * 2, self.allowed_lag), _MAX_PAUSE)
                    if deltas.failing
                    else self.allowed_lag
                )
        finally:
            # Rounds under way end with their answers (or their timeout).
            if rounds:
                _, late = await asyncio.wait(rounds, timeout=self.flush_timeout + 1.0)
                await cancel_and_wait(late, insist=True)

    def _all_keys(self) -> list[str]:
        return list({*self.deltas.pending, *self.deltas.items})

    @contextlib.asynccontextmanager
    async def _holding(self, key: str | None) -> AsyncIterator[None]:
        """The flusher leaves ``key`` (``None``: every key) alone meanwhile: the
        operation sends its deltas itself, in its order."""
        deltas = self.deltas
        if key is None:
            deltas.hold_all += 1
        else:
            deltas.held[key] = deltas.held.get(key, 0) + 1
        try:
            yield
        finally:
            if key is None:
                deltas.hold_all -= 1
            else:
                left = deltas.held[key] - 1
                if left:
                    deltas.held[key] = left
                else:
                    del deltas.held[key]
            if self._pending:
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
