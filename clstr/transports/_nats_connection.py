"""The nats-py connection the NATS transport runs on.

:class:`NatsConnection` mends a nats-py defect and adds two fast paths
(direct subscribers on the read loop, publishing without a coroutine);
:class:`_NatsSubscription` is a subscription of it as a transport hands it
out; :func:`_abandon` ends a connection attempt that will not be used.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any, Final

import nats
import nats.errors
import structlog
from nats.aio.client import Client as NatsClient
from nats.aio.client import _validate_subject
from nats.aio.subscription import Subscription as NatsSubscription

from .._tasks import cancel_and_wait
from .base import Subscription

__all__ = ["DirectCallback", "NatsConnection"]

_log = structlog.get_logger("clstr.transport.nats")


# nats-py's connection states, as publish_nowait reads them (its properties
# each cost a call).
_CONNECTED: Final = NatsClient.CONNECTED
_CLOSED: Final = NatsClient.CLOSED
_DRAINING_SUBS: Final = NatsClient.DRAINING_SUBS
_DRAINING_PUBS: Final = NatsClient.DRAINING_PUBS

# How many subjects a connection remembers as valid; past that it starts over.
_VALID_SUBJECTS: Final = 1024

# How long an abandoned connection attempt gets to end once cancelled.
_ABANDON_GRACE: Final = 5.0


async def _abandon(
    connect: asyncio.Task[None], fatal_wait: asyncio.Task[Any], nc: NatsClient
) -> None:
    """End a connection attempt that will not be used: cancel it, wait for it
    (never swallowing our own cancellation), and close nats-py's client so that
    none of its tasks (reconnect loop, reader, pinger) goes on."""
    # nats-py may catch one cancellation in its retry loop: insist.
    await cancel_and_wait([connect, fatal_wait], _ABANDON_GRACE, insist=True)
    if connect.done() and not connect.cancelled():
        connect.exception()  # retrieved: the caller reports it, or nobody needs it
    with contextlib.suppress(Exception):
        await nc.close()


class _NatsSubscription(Subscription):
    def __init__(self, sub: NatsSubscription, forget: Callable[[_NatsSubscription], None]) -> None:
        self.subject = sub.subject
        self._sub = sub
        self._forget = forget

    async def drain(self) -> None:
        self._forget(self)
        if not self._sub._conn.is_connected:
            # Nothing more can arrive, and a drain would wait for a PONG that
            # cannot come until the connection is back.
            await self.unsubscribe()
            return
        with contextlib.suppress(nats.errors.Error):
            await self._sub.drain()  # type: ignore[no-untyped-call]

    async def unsubscribe(self) -> None:
        self._forget(self)
        with contextlib.suppress(nats.errors.Error):
            await self._sub.unsubscribe()


#: A direct subscriber of a :class:`NatsConnection`: called on the read loop
#: with the raw subject, reply subject, payload and header block of each message.
DirectCallback = Callable[[bytes, bytes, bytes, bytes | None], None]


class NatsConnection(NatsClient):
    """nats-py's client with one defect mended and two fast paths.

    The defect: nats-py answers each PONG by setting the result of the oldest
    flush future, without checking whether that flush was cancelled or timed
    out. The InvalidStateError then ends its read loop silently: the
    connection still says "connected" but never reads again
    (nats-io/nats.py#914). A flush can be cancelled in ordinary use (a
    caller's timeout), so the PONG handling here skips futures that are
    already done.

    The fast paths: :meth:`subscribe_direct` hands each message to a plain
    function on the read loop, without nats-py's per-subscription queue, task
    and ``Msg`` object; :meth:`publish_nowait` queues a message without a
    coroutine chain. :class:`NatsTransport` uses both; connect one yourself
    (``await nc.connect(...)``) to give a transport a connection you manage.
    """

    def __init__(self) -> None:
        super().__init__()
        self._direct: dict[int, DirectCallback] = {}
        self._kick: asyncio.Future[None] | None = None  # a done future: wakes the flusher
        self._valid_subjects: set[str] = set()  # subjects published to that passed the check

    async def subscribe_direct(
        self, subject: str, callback: DirectCallback, *, queue: str = ""
    ) -> NatsSubscription:
        """Subscribe with ``callback`` called synchronously for each message.

        It runs on the connection's read loop: it must not block, and what
        it raises is logged, not propagated. Unsubscribe or drain the
        returned nats-py subscription as usual.
        """
        # Registered before the SUB goes out: subscribe() may wait for a full
        # buffer to be written, and a message arriving meanwhile must find it.
        sid = self._sid + 1  # the id subscribe() gives it, with no wait before
        self._direct[sid] = callback
        try:
            sub = await self.subscribe(subject, queue=queue)
        except BaseException:
            self._direct.pop(sid, None)
            raise
        assert sub._id == sid, "nats-py numbered the subscription differently"
        return sub

    async def _process_msg(
        self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes | None
    ) -> None:
        direct = self._direct.get(sid)
        if direct is None:
            await super()._process_msg(sid, subject, reply, data, headers)  # type: ignore[arg-type]
            return
        stats = self.stats
        stats["in_msgs"] += 1
        stats["in_bytes"] += len(data)
        try:
            direct(subject, reply, data, headers)
        except Exception as exc:  # the read loop must go on
            _log.error("subscriber callback raised", subject=subject.decode(), error=repr(exc))

    def _remove_sub(self, sid: int, max_msgs: int = 0) -> None:
        # Called by nats-py when a subscription ends (unsubscribe, drain).
        super()._remove_sub(sid, max_msgs)
        self._direct.pop(sid, None)

    def publish_nowait(self, subject: str, payload: bytes, reply: str = "") -> None:
        """nats-py's ``publish`` without awaiting: the message joins the
        outgoing buffer and the flusher is woken. Unlike ``publish`` it never
        waits for a full buffer to be written (callers bound what they send
        some other way, as a node bounds its replies by its queue)."""
        # The checks of nats-py's publish, in its order; the subject's only
        # once (a client sends to a few shard subjects over and over).
        valid = self._valid_subjects
        if subject not in valid:
            _validate_subject(subject)
            if len(valid) >= _VALID_SUBJECTS:
                valid.clear()  # (replies, each to an inbox of its own, come and go)
            valid.add(subject)
        if reply:
            _validate_subject(reply)
        status = self._status
        if status == _CLOSED:
            raise nats.errors.ConnectionClosedError
        if status == _DRAINING_PUBS:
            raise nats.errors.ConnectionDrainingError
        size = len(payload)
        if size > self._max_payload:
            raise nats.errors.MaxPayloadError
        connected = status == _CONNECTED or status == _DRAINING_SUBS  # (is_connected)
        if not connected and (
            self._max_pending_size <= 0 or size + self._pending_data_size > self._max_pending_size
        ):
            raise nats.errors.OutboundBufferLimitError
        command = b"PUB %b %b %d\r\n%b\r\n" % (subject.encode(), reply.encode(), size, payload)
        self._pending.append(command)
        self._pending_data_size += len(command)
        stats = self.stats
        stats["out_msgs"] += 1
        stats["out_bytes"] += size
        queue = self._flush_queue
        if connected and queue is not None and queue.empty():
            kick = self._kick
            if kick is None:
                kick = self._kick = asyncio.get_running_loop().create_future()
                kick.set_result(None)
            queue.put_nowait(kick)

    @property
    def buffer_full(self) -> bool:
        """Whether more is waiting to be written than ``pending_size`` allows
        (nats-py's ``publish`` then waits for a flush: back-pressure)."""
        return 0 < self._max_pending_size < self._pending_data_size

    async def make_room(self) -> None:
        """Wait until the outgoing buffer is written, as nats-py's ``publish``
        does once it is :attr:`buffer_full` (call it only then: this is the
        slow path)."""
        await self._flush_pending(force_flush=True)

    async def _process_pong(self) -> None:
        if self._pongs:
            future = self._pongs.pop(0)
            if not future.done():
                future.set_result(True)
            self._pongs_received += 1
            self._pings_outstanding = 0
