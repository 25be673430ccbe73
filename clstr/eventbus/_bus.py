"""The event bus: one handle to ingest (sharded, non-blocking) and to poll.

``ingest`` is synchronous and never waits: it hashes the key to a bucket,
the bucket's table slot is the shard's ring (or a refusal), and the event is
appended (:mod:`clstr.eventbus._routing`, :mod:`clstr.eventbus._ring`). One
worker task per shard batches the ring into the adapter
(:mod:`clstr.eventbus._dispatch`). Rescaling is in :mod:`clstr.eventbus._rescale`.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections import Counter
from collections.abc import Mapping
from types import TracebackType
from typing import Final, Self

import structlog

from ..errors import LifecycleError
from ._config import Backpressure, BusConfig
from ._dispatch import ShardWorker
from ._errors import (
    ConsumerAdapterError,
    EventSerializationError,
    SampledError,
    ShuttingDownError,
    UnroutedError,
)
from ._event import Event
from ._nonce import ProducerIdentity
from ._poll import poll
from ._query import PollRequest, PollResponse
from ._rescale import Rescaler
from ._ring import ShardRing
from ._routing import TABLE_MASK, TABLE_SIZE, Refusal, Slot, kept_buckets, key_hasher
from ._scaling import ScalingSuggestion
from ._stats import BusStats, shard_stats

__all__ = ["BusState", "EventBus", "MAX_KEY_LENGTH", "MAX_TYPE_LENGTH"]

_log = structlog.get_logger("clstr.eventbus")

#: The longest event key (characters of a str, bytes of a bytes key).
MAX_KEY_LENGTH: Final = 1024
#: The longest event type.
MAX_TYPE_LENGTH: Final = 256
# Room in a frame for one record's key, type, timestamp and framing.
_RECORD_ROOM: Final = 4 * MAX_KEY_LENGTH + 4 * MAX_TYPE_LENGTH + 64
_REASONS: Final = ("backpressure", "sampled", "unrouted", "shutting_down", "not_started", "invalid")

_time_ns = time.time_ns


class BusState(enum.Enum):
    """Where a bus is in its life."""

    CREATED = "created"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"


class EventBus:
    """Sharded, non-blocking event ingestion with batched dispatch to an adapter, and
    merged polling with cursors. Build it from a :class:`BusConfig`, ``await
    start()`` (or ``async with``), ingest, and ``await shutdown()``.

    Not thread-safe: call it from its event loop's thread.
    """

    def __init__(self, config: BusConfig | None = None) -> None:
        self.config = config = config or BusConfig()
        self.name = config.name
        self.adapter = config.adapter
        self.state = BusState.CREATED
        self._hash = key_hasher(config.seed)
        self._rejected: Counter[str] = Counter(dict.fromkeys(_REASONS, 0))
        self._refuse_sampled = Refusal("sampled", self._sampled_error, self._rejected)
        self._refuse_unrouted = Refusal("unrouted", self._unrouted_error, self._rejected)
        self._refuse_stopping = Refusal("shutting_down", self._stopping_error, self._rejected)
        not_started = Refusal("not_started", self._not_started_error, self._rejected)
        self._table: list[Slot] = [not_started] * TABLE_SIZE
        self._kept = kept_buckets(config.sample_rate)
        self.rings: dict[int, ShardRing] = {}
        self.workers: dict[int, ShardWorker] = {}
        # Payloads up to _max_payload take the fast path (any key and type fit with
        # them); larger ones are measured exactly against the frame limit.
        self._frame_limit = self._max_payload = 1 << 30  # until start asks the adapter
        self._identity: ProducerIdentity | None = None
        self._waiting = 0  # ingest_wait calls in progress
        self._no_waiting = asyncio.Event()
        self._no_waiting.set()
        self._lossy = False
        self._stopped = asyncio.Event()
        self.rescaler = Rescaler(self)

    # -- lifecycle ------------------------------------------------------------

    async def start(self) -> None:
        """Take the producer identity, open the adapter, start one worker per shard.

        Raises :class:`~clstr.LifecycleError` when started twice,
        :class:`~clstr.ConfigurationError` for a nonce file in use, and what the
        adapter's ``open`` raises.
        """
        if self.state is not BusState.CREATED:
            raise LifecycleError(f"bus {self.name!r} is {self.state.value}; it starts only once")
        config = self.config
        path = config.producer_nonce_path
        self._identity = await ProducerIdentity.load(path) if path else ProducerIdentity.ephemeral()
        try:
            await self.adapter.open(self.name, self._identity.prefix)
            self._frame_limit = self.adapter.max_frame_bytes
            self._max_payload = self._frame_limit - _RECORD_ROOM
            await self.rescaler.start(range(config.shards))
        except BaseException:
            self._identity.release()
            await self.adapter.close()
            self.state = BusState.STOPPED
            raise
        self.state = BusState.RUNNING
        _log.info(
            "event bus started",
            bus=self.name,
            shards=config.shards,
            adapter=self.adapter.kind,
            producer=self._identity.prefix,
        )

    async def shutdown(self, timeout: float | None = None) -> BusStats:
        """Stop taking events, let in-flight ``ingest_wait`` calls in, dispatch what
        is queued, stop the workers and close the adapter; return the final stats.

        Everything must be done within ``timeout`` seconds (default: the config's
        ``shutdown_timeout``); past it, what is left is dropped and
        ``shutdown_was_lossy`` is set. Idempotent.
        """
        if self.state is BusState.STOPPED:
            return self.stats()
        if self.state is BusState.STOPPING:
            await self._stopped.wait()
            return self.stats()
        started = self.state is BusState.RUNNING
        self.state = BusState.STOPPING
        self._table[:] = [self._refuse_stopping] * TABLE_SIZE
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self.config.shutdown_timeout if timeout is None else timeout)
        await self.rescaler.stop()
        try:
            async with asyncio.timeout_at(deadline):
                await self._no_waiting.wait()
        except TimeoutError:
            _log.warning("shutdown: ingest_wait calls still waiting: refusing them", bus=self.name)
        # Snapshots: a rescale that was waiting may retire shards meanwhile.
        rings, workers = list(self.rings.values()), list(self.workers.values())
        for ring in rings:
            ring.close(ShuttingDownError(f"bus {self.name!r} shut down before there was room"))
        for worker in workers:
            worker.stop()
        for worker in workers:
            await worker.wait(max(0.0, deadline - loop.time()))
        lost = sum(w.lost for w in workers)
        lost += sum(ring.drop_queued() for ring in rings)
        self._lossy = lost > 0
        if lost:
            _log.warning("shutdown dropped events", bus=self.name, events=lost)
        if started:
            try:
                async with asyncio.timeout(max(1.0, deadline - loop.time())):
                    await self.adapter.flush()
            except Exception as exc:
                _log.warning("adapter flush failed at shutdown", bus=self.name, error=repr(exc))
        await self.adapter.close()
        if self._identity is not None:
            self._identity.release()
        self.state = BusState.STOPPED
        self._stopped.set()
        stats = self.stats()
        _log.info(
            "event bus stopped",
            bus=self.name,
            ingested=stats.events_ingested,
            dispatched=stats.events_dispatched,
            dropped=stats.events_dropped,
        )
        return stats

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.shutdown()

    # -- ingestion ------------------------------------------------------------

    def hash_key(self, key: str | bytes) -> int:
        """The bus's hash of ``key`` (what ``ingest_raw(data, hash=...)`` takes to put
        raw events on the shard of ``key``)."""
        return self._hash(key)

    def ingest(self, event: Event) -> None:
        """Queue ``event`` on its key's shard and return at once.

        Raises (nothing is queued then) :class:`BackpressureError` (ring full under
        ``DropNewest`` or ``Block``: use :meth:`ingest_wait` to wait),
        :class:`SampledError`, :class:`UnroutedError` (the key's shard is
        changing: retry, or use :meth:`ingest_wait`), :class:`ShuttingDownError`,
        :class:`EventSerializationError`, and :class:`~clstr.LifecycleError` before
        :meth:`start`.
        """
        try:
            key, payload, type_, headers = event
            if (
                type(payload) is not bytes
                or len(payload) > self._max_payload
                or type(event) is not Event
                or type(type_) is not str
                or headers is not None
                or len(key) > MAX_KEY_LENGTH
            ):
                event = self._checked(key, payload, type_, headers)
            slot = self._table[self._hash(key) & TABLE_MASK]
        except (TypeError, ValueError) as exc:
            raise self._invalid(exc) from exc
        slot.push(event, _time_ns())

    def ingest_raw(self, data: bytes, *, hash: int | None = None) -> None:
        """Queue ``data`` as an event's payload, as it is (no key, no type): the fast
        path for pre-serialised events. ``hash`` places it (pass
        :meth:`hash_key` of its key to keep it with that key's events); without
        it, the shard comes from a hash of ``data``. Raises as :meth:`ingest`."""
        if type(data) is not bytes or len(data) > self._max_payload:
            data = self._checked_raw(data)
        try:
            bucket = (self._hash(data) if hash is None else hash) & TABLE_MASK
        except TypeError as exc:
            raise self._invalid(exc) from exc
        self._table[bucket].push(data, _time_ns())

    async def ingest_wait(self, event: Event) -> None:
        """Queue ``event``, waiting (without blocking the loop) while its ring is full
        under ``Block`` and while its key's shard changes; once shutdown began,
        a call already waiting is still let in (within the shutdown deadline).

        Raises as :meth:`ingest`, but for those two waits.
        """
        try:
            key, payload, type_, headers = event
            event = self._checked(key, payload, type_, headers)
            bucket = self._hash(key) & TABLE_MASK
        except (TypeError, ValueError) as exc:
            raise self._invalid(exc) from exc
        self._waiting += 1
        self._no_waiting.clear()
        ring: ShardRing | None = None
        try:
            while True:
                if ring is None or not ring.live or self.state is BusState.RUNNING:
                    slot = self._table[bucket]
                    if slot is self._refuse_unrouted:
                        await self.rescaler.settled()
                        continue
                    if not isinstance(slot, ShardRing):
                        slot.push(event, 0)  # raises its refusal
                        raise AssertionError("a refusal did not refuse")  # pragma: no cover
                    ring = slot
                if ring.has_room or ring.mode is not Backpressure.BLOCK:
                    ring.push(event, _time_ns())
                    return
                try:
                    await ring.wait_room()
                except ShuttingDownError:
                    self._rejected["shutting_down"] += 1
                    raise
        finally:
            self._waiting -= 1
            if not self._waiting:
                self._no_waiting.set()

    def _checked(self, key: object, payload: object, type_: object, headers: object) -> Event:
        """The slow path of ingest: a checked copy of the event, its fields converted
        (bytes-like payload, a copy of the headers), or TypeError/ValueError."""
        if not isinstance(key, str | bytes):
            raise TypeError(f"key must be str or bytes, got {type(key).__name__}")
        if len(key) > MAX_KEY_LENGTH:
            raise ValueError(f"key of {len(key)} is over {MAX_KEY_LENGTH}")
        if not isinstance(type_, str) or len(type_) > MAX_TYPE_LENGTH:
            raise TypeError(f"type must be a str of at most {MAX_TYPE_LENGTH}, got {type_!r:.80}")
        data = self._checked_raw(payload, rejecting=False)
        size = len(data) + len(type_.encode()) + 64
        size += len(key.encode()) if isinstance(key, str) else len(key)
        if headers is not None:
            if not isinstance(headers, Mapping) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in headers.items()
            ):
                raise TypeError("headers must map str to str")
            headers = dict(headers)
            size += sum(len(k) + len(v) + 10 for k, v in headers.items())
        if size > self._frame_limit:
            raise ValueError(
                f"event of {size} bytes is over the adapter's limit of {self._frame_limit}"
            )
        return Event(key, data, type_, headers)

    def _checked_raw(self, data: object, *, rejecting: bool = True) -> bytes:
        try:
            if isinstance(data, bytearray | memoryview):
                data = bytes(data)
            if not isinstance(data, bytes):
                raise TypeError(f"payload must be bytes, got {type(data).__name__}")
            if len(data) + 64 > self._frame_limit:
                raise ValueError(
                    f"payload of {len(data)} bytes is over the adapter's limit of "
                    f"{self._frame_limit}"
                )
        except (TypeError, ValueError) as exc:
            if rejecting:
                raise self._invalid(exc) from exc
            raise
        return data

    def _invalid(self, exc: BaseException) -> EventSerializationError:
        self._rejected["invalid"] += 1
        return EventSerializationError(f"not an event bus {self.name!r} can store: {exc}")

    def _sampled_error(self) -> SampledError:
        return SampledError(f"sampled out by bus {self.name!r} (sample_rate)")

    def _unrouted_error(self) -> UnroutedError:
        return UnroutedError(
            f"the key's shard is changing (bus {self.name!r} is rescaling): retry shortly, "
            "or use ingest_wait"
        )

    def _stopping_error(self) -> ShuttingDownError:
        return ShuttingDownError(f"bus {self.name!r} is shutting down; it takes no new events")

    def _not_started_error(self) -> LifecycleError:
        return LifecycleError(f"bus {self.name!r} is not started: await bus.start() first")

    @property
    def running(self) -> bool:
        """Whether the bus takes events."""
        return self.state is BusState.RUNNING

    def install(self, bucket: int, slot: Slot | None) -> None:
        """Route ``bucket`` to ``slot`` (``None``: its shard is moving). For the rescaler."""
        if self.state is BusState.STOPPING or self.state is BusState.STOPPED:
            return
        if bucket >= self._kept:
            self._table[bucket] = self._refuse_sampled
        else:
            self._table[bucket] = self._refuse_unrouted if slot is None else slot

    # -- flushing, polling, scaling --------------------------------------------

    async def flush(self) -> None:
        """Return once every event ingested before the call reached the adapter (was
        dispatched, or dropped) and the adapter flushed. Waits as long as a
        batch is being retried. Raises :class:`~clstr.LifecycleError` before start."""
        if self.state is BusState.CREATED:
            raise self._not_started_error()
        waiters = [w for ring in self.rings.values() if (w := ring.flush_target()) is not None]
        if waiters:
            await asyncio.gather(*waiters)
        if self.state is BusState.RUNNING:
            await self.adapter.flush()

    async def poll(self, request: PollRequest | None = None) -> PollResponse:
        """Read events back from the adapter's log, merged across shards (see
        :class:`PollRequest`). Works in any state, also after shutdown.

        Raises :class:`ConsumerAdapterError` when the adapter keeps no log (Noop,
        plain NATS subjects) or the log cannot be read, and
        :class:`InvalidCursorError`.
        """
        if self.state is BusState.CREATED:
            raise self._not_started_error()
        log = self.adapter.log
        if log is None:
            raise ConsumerAdapterError(
                f"the {self.adapter.kind} adapter of bus {self.name!r} keeps no events to "
                "poll: use a JetStreamAdapter (or MemoryAdapter)"
            )
        return await poll(log, self.name, request or PollRequest())

    async def add_shards(self, n: int) -> list[int]:
        """Add ``n`` shards; return their ids. See :mod:`clstr.eventbus._rescale` for
        what stays in order."""
        return await self.rescaler.add(n)

    async def remove_shards(self, shards: list[int]) -> None:
        """Remove ``shards`` after dispatching their queued events (nothing is lost)."""
        await self.rescaler.remove(shards)

    def suggest_scaling(self) -> ScalingSuggestion:
        """The scaling rule's advice over the window since the previous call (see
        :mod:`clstr.eventbus._scaling`)."""
        return self.rescaler.suggest()

    # -- reports --------------------------------------------------------------

    def stats(self) -> BusStats:
        """The bus's counters now (see :class:`BusStats` for the invariant)."""
        shards = tuple(shard_stats(self.rings[s], self.workers[s]) for s in sorted(self.rings))
        retired = self.rescaler.retired
        everything = (*shards, *retired.values())
        batches = sum(s.batches for s in everything)
        latency = [s.latency_ms for s in shards if s.batches]
        return BusStats(
            events_ingested=sum(s.ingested for s in everything),
            events_dispatched=sum(s.dispatched for s in everything),
            events_dropped=sum(s.dropped for s in everything),
            events_queued=sum(s.queued for s in shards),
            events_in_flight=sum(s.in_flight for s in shards),
            events_rejected=sum(self._rejected.values()) + sum(s.rejected for s in everything),
            batches_dispatched=batches,
            batches_dropped=sum(w.batches_dropped for w in self.workers.values())
            + self.rescaler.retired_batches_dropped,
            retries=sum(w.retries for w in self.workers.values()) + self.rescaler.retired_retries,
            shutdown_was_lossy=self._lossy,
            dispatch_latency_ms=sum(latency) / len(latency) if latency else 0.0,
            rejected={
                **self._rejected,
                "backpressure": sum(s.rejected for s in everything),
            },
            shards=shards,
            retired_shards=tuple(sorted(retired)),
        )

    def __repr__(self) -> str:
        return f"<EventBus {self.name!r} {self.state.value} shards={sorted(self.rings)}>"
