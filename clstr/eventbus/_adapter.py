"""Adapters: where a shard's batches go.

An :class:`Adapter` takes one batch at a time per shard (the bus never sends
two batches of one shard at once, so a shard's events reach it in order)
and either returns, meaning the batch is stored or sent, or raises an
:class:`~clstr.eventbus.AdapterError` saying whether retrying may help. An
adapter whose events can be read back has a :attr:`~Adapter.log`, which is
what :meth:`~clstr.eventbus.EventBus.poll` and the consumers read.

Here: :class:`NoopAdapter` (the default: takes everything, keeps nothing)
and :class:`NatsSubjectsAdapter` (one frame per message on one subject per
shard, over any clstr transport: fire and forget). JetStream and memory
adapters are in their own modules.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import ClassVar, Final

from ..errors import LifecycleError, LimitExceededError, TransportClosedError, TransportError
from ..protocol import DEFAULT_PREFIX
from ..transports.base import Transport
from ._errors import (
    AdapterConnectionError,
    AdapterSerializationError,
    AdapterShutdownError,
    TransientAdapterError,
)
from ._event import Record, encode_frames
from ._log import EventLog

__all__ = ["Adapter", "NatsSubjectsAdapter", "NoopAdapter", "bus_subject", "DEFAULT_FRAME_BYTES"]

#: The frame limit of adapters that have no transport to ask (NATS's default max_payload).
DEFAULT_FRAME_BYTES: Final = 1024 * 1024
# Room left in a message for the frame's own header (version, message id).
_HEADROOM: Final = 512


def bus_subject(prefix: str, bus: str, shard: int | str) -> str:
    """The NATS subject of one bus shard: ``<prefix>.bus.<bus>.<shard>`` (``"*"``: all)."""
    return f"{prefix}.bus.{bus}.{shard}"


class Adapter(abc.ABC):
    """Where batches go (see the module docstring). One adapter serves one bus: the
    bus opens it on start and closes it on shutdown."""

    #: A short name for logs and errors.
    kind: ClassVar[str] = "adapter"

    def __init__(self) -> None:
        self.bus = ""
        self.producer = ""
        self._state = "new"

    async def open(self, bus: str, producer: str) -> None:
        """Get ready to take ``bus``'s batches, written by ``producer`` (the prefix of
        every frame's message id). Raises :class:`~clstr.LifecycleError` when the
        adapter already serves a bus."""
        if self._state != "new":
            raise LifecycleError(
                f"this {self.kind} adapter already served bus {self.bus!r}: give each bus "
                "its own adapter"
            )
        self.bus, self.producer, self._state = bus, producer, "open"

    @property
    def max_frame_bytes(self) -> int:
        """The largest frame the adapter carries (an event must fit in one)."""
        return DEFAULT_FRAME_BYTES - _HEADROOM

    @abc.abstractmethod
    async def send(self, shard: int, first: int, records: Sequence[Record]) -> None:
        """Store or send events ``first..first+len(records)-1`` of ``shard``.

        Raises :class:`~clstr.eventbus.AdapterError` (retryable or not).
        """

    async def flush(self) -> None:  # noqa: B027 - optional: most adapters do not buffer
        """Return once everything :meth:`send` returned for has left this process
        (for adapters that buffer)."""

    async def close(self) -> None:
        """Release what :meth:`open` took. Idempotent."""
        self._state = "closed"

    @property
    def log(self) -> EventLog | None:
        """Where this adapter's events can be read back (``None``: nowhere)."""
        return None

    def _check_open(self) -> None:
        if self._state != "open":
            raise AdapterShutdownError(f"the {self.kind} adapter of bus {self.bus!r} is closed")


class NoopAdapter(Adapter):
    """Takes every batch and keeps nothing (the default adapter: measures the bus itself)."""

    kind = "noop"

    async def send(self, shard: int, first: int, records: Sequence[Record]) -> None:
        self._check_open()


class NatsSubjectsAdapter(Adapter):
    """Publishes each batch as frames on ``<prefix>.bus.<bus>.<shard>`` over a clstr
    transport (NATS, or memory in tests). Core NATS: no storage and no
    acknowledgement, so subscribers that are not listening miss events, and
    :meth:`flush` waits only until the server has them (a NATS round trip)."""

    kind = "nats"

    def __init__(self, transport: Transport, *, prefix: str = DEFAULT_PREFIX) -> None:
        super().__init__()
        self.transport = transport
        self.prefix = prefix

    @property
    def max_frame_bytes(self) -> int:
        return self.transport.max_payload - _HEADROOM

    async def send(self, shard: int, first: int, records: Sequence[Record]) -> None:
        self._check_open()
        frames = encode_frames(self.producer, shard, first, records, self.max_frame_bytes)
        subject = bus_subject(self.prefix, self.bus, shard)
        for frame in frames:
            try:
                await self.transport.publish(subject, frame.data)
            except TransportClosedError as exc:
                raise AdapterConnectionError(f"cannot publish to {subject}: {exc}") from exc
            except LimitExceededError as exc:
                raise AdapterSerializationError(f"cannot publish to {subject}: {exc}") from exc
            except TransportError as exc:
                raise TransientAdapterError(f"cannot publish to {subject}: {exc}") from exc

    async def flush(self) -> None:
        nc = getattr(self.transport, "nc", None)  # a NatsTransport: wait for the server
        if nc is not None and nc.is_connected:
            try:
                await nc.flush(timeout=5)
            except Exception as exc:
                raise TransientAdapterError(f"cannot flush to the NATS server: {exc}") from exc
