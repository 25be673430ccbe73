"""The event bus's exceptions, under :class:`~clstr.ClstrError`.

::

    ClstrError
    └── EventBusError                       is_retryable() says whether trying again may help
        ├── IngestError                     an event was refused: it was not ingested
        │   ├── BackpressureError           its shard's ring is full (DropNewest; Block via ingest)
        │   ├── SampledError                the sampling policy left it out
        │   ├── UnroutedError               its key is moving to another shard (mid-rescale)
        │   ├── ShuttingDownError           the bus is shutting down or stopped
        │   └── EventSerializationError     it is not an event the bus can store (type, size)
        ├── ConsumeError                    a poll or a consumer could not read
        │   ├── ConsumerAdapterError        the store failed (or keeps no events)
        │   ├── InvalidCursorError          the cursor is malformed or of another bus
        │   └── InvalidFilterError          the filter cannot be understood or matches nothing
        └── AdapterError                    an adapter could not take a batch
            ├── TransientAdapterError       try again (a timeout, a leader election)
            ├── AdapterBackpressureError    the broker is full for now: try again later
            ├── FatalAdapterError           retrying cannot help: the batch is dropped at once
            ├── AdapterConnectionError      the connection is closed for good
            ├── AdapterShutdownError        the adapter is closed
            └── AdapterSerializationError   the broker refused the batch's bytes (too large)

An ingestion error means the event is not the bus's responsibility: it is
counted in ``events_rejected`` (not in ``events_ingested``), and the caller
decides whether to retry. The dispatch loop retries a batch while its
adapter error is retryable (:class:`TransientAdapterError`,
:class:`AdapterBackpressureError`) and drops it at once otherwise, counting
its events in ``events_dropped``.
"""

from __future__ import annotations

from typing import ClassVar

from ..errors import ClstrError, LifecycleError

__all__ = [
    "EventBusError",
    "IngestError",
    "BackpressureError",
    "SampledError",
    "UnroutedError",
    "ShuttingDownError",
    "EventSerializationError",
    "ConsumeError",
    "ConsumerAdapterError",
    "InvalidCursorError",
    "InvalidFilterError",
    "AdapterError",
    "TransientAdapterError",
    "AdapterBackpressureError",
    "FatalAdapterError",
    "AdapterConnectionError",
    "AdapterShutdownError",
    "AdapterSerializationError",
]


class EventBusError(ClstrError):
    """Root of the event bus's errors."""

    retryable: ClassVar[bool] = False

    def is_retryable(self) -> bool:
        """Whether the same operation may succeed if tried again later."""
        return self.retryable


# -- ingestion ------------------------------------------------------------------


class IngestError(EventBusError):
    """The event was refused and not ingested (counted in ``events_rejected``)."""


class BackpressureError(IngestError):
    """The event's shard ring is full. Under ``DropNewest`` the event is rejected;
    under ``Block`` the plain :meth:`~clstr.eventbus.EventBus.ingest` cannot wait,
    so use ``await bus.ingest_wait(event)``. Retryable once the ring drains."""

    retryable = True


class SampledError(IngestError):
    """The bus's ``sample_rate`` left this event's key out (on purpose: not a failure
    to retry; a key is either always kept or always left out)."""


class UnroutedError(IngestError):
    """The event's key is moving to another shard while the bus rescales; its old
    shard is still being flushed, so that the key's events stay in order. Retry
    in a moment, or use ``ingest_wait``, which waits for the rescale."""

    retryable = True


class ShuttingDownError(IngestError, LifecycleError):
    """The bus is shutting down or stopped and takes no new events."""


class EventSerializationError(IngestError, ValueError):
    """The event cannot be stored: a field of the wrong type, or larger than the
    adapter carries. Fix the event; retrying the same one cannot help."""


# -- consumption ----------------------------------------------------------------


class ConsumeError(EventBusError):
    """A poll (or a consumer) could not read the bus's events."""


class ConsumerAdapterError(ConsumeError):
    """The store the events are read from failed, or the bus's adapter keeps no
    events to read (``Noop``, plain NATS subjects): poll a JetStream bus."""

    retryable = True


class InvalidCursorError(ConsumeError, ValueError):
    """The cursor is not one a poll of this bus returned (malformed, truncated, or
    from another bus). Start again without a cursor, or pass the last good one."""


class InvalidFilterError(ConsumeError, ValueError):
    """The filter cannot be parsed, has a field of the wrong type, or can match
    nothing (an empty set). See :class:`~clstr.eventbus.EventFilter`."""


# -- adapters -------------------------------------------------------------------


class AdapterError(EventBusError):
    """An adapter failed to take a batch. :meth:`is_retryable` tells the dispatch
    loop whether to send it again (with backoff) or to drop it."""


class TransientAdapterError(AdapterError):
    """A passing failure (an ack timeout, a stream leader election): retried."""

    retryable = True


class AdapterBackpressureError(AdapterError):
    """The broker is full or its outgoing buffer is: retried after a backoff."""

    retryable = True


class FatalAdapterError(AdapterError):
    """Retrying cannot help (the stream is gone, a permission is missing): the
    batch is dropped at once and its events counted as dropped."""


class AdapterConnectionError(AdapterError):
    """The adapter's connection is closed for good (not a reconnect in progress:
    nats-py buffers through those)."""


class AdapterShutdownError(AdapterError):
    """The adapter is closed; it takes no more batches."""


class AdapterSerializationError(AdapterError):
    """The broker refused the batch's bytes (a frame over its ``max_payload``)."""
