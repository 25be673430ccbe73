"""The sender's side of persisted messages: publish a request to the stream, read
its stored reply later (from this process or any other)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar, overload

from ..client import Client
from ..codec import decode_payload, encode_payload, message_type
from ..envelope import EnvelopeOption
from ..errors import ConfigurationError, PayloadError, TransportError
from ..transports.jetstream import jetstream_of, settling
from ._ids import new_request_id
from ._names import MSG_ID_HEADER, PersistSettings, ensure_stream, persist_subject, stream_name
from ._replies import ReplyStore, StoredReply

__all__ = ["PersistedClient"]

T = TypeVar("T")


class PersistedClient:
    """Persisted messages over ``client``'s NATS connection (its prefix, shard count
    and seed; the client's and each call's envelope options apply).

    :meth:`send` writes a request to the stream of persisted messages and
    returns its request id once JetStream has stored it; the owner of its shard
    handles it (now, or when one serves the shard again) and stores the reply.
    :meth:`replies_for` and :meth:`await_reply` read that reply, from any
    process. ``ids`` makes request ids (default: unique 64-bit ids; pass
    ``lambda: str(sharding.snowflake())`` for snowflakes).
    """

    def __init__(
        self,
        client: Client,
        *,
        settings: PersistSettings | None = None,
        ids: Callable[[], str] = new_request_id,
    ) -> None:
        self.client = client
        self.settings = settings or PersistSettings()
        self.replies = ReplyStore(client.transport, prefix=client.prefix, settings=self.settings)
        self._js = jetstream_of(client.transport, "persisted messages")
        self._ids = ids
        self._stream = stream_name(client.prefix)
        self._stream_ready = False

    # -- sending ------------------------------------------------------------------

    async def send(
        self,
        message: object,
        *,
        key: str | None = None,
        shard: int | None = None,
        request_id: str | None = None,
        options: Sequence[EnvelopeOption] = (),
    ) -> str:
        """Persist a typed ``message`` (a dataclass, as :meth:`~clstr.ScopedClient.call`
        sends) for ``key``'s owner (or ``shard``'s) and return its request id.
        See :meth:`send_raw`."""
        validate = getattr(message, "validate", None)
        if callable(validate):
            try:
                validate()
            except Exception as exc:
                raise PayloadError(f"invalid {type(message).__name__} payload: {exc}") from exc
        return await self.send_raw(
            message_type(message),
            encode_payload(message),
            key=key,
            shard=shard,
            request_id=request_id,
            options=options,
        )

    async def send_raw(
        self,
        msg_type: str,
        data: bytes = b"",
        *,
        key: str | None = None,
        shard: int | None = None,
        request_id: str | None = None,
        options: Sequence[EnvelopeOption] = (),
    ) -> str:
        """Persist a request for ``key``'s owner (or ``shard``'s) and return its
        request id (``request_id``, or a new one) once JetStream has stored it.

        Sending an id again is safe: within the stream's duplicate window it is
        stored once, and later the reply stored for it answers it. Without a TTL
        option (``with_ttl``) the message waits for as long as it takes; with
        one, a message not handled in time is answered ``expired``. Raises
        :class:`~clstr.TransportError` when JetStream does not store it.
        """
        if shard is None:
            if key is None:
                raise ConfigurationError("a persisted message needs a key or a shard")
            shard = self.client.shard_for(key)
        rid = self._ids() if request_id is None else request_id
        _, body = self.client.build_request(
            shard, msg_type, data, key=key, options=options, request_id=rid
        )
        if not self._stream_ready:
            await ensure_stream(self._js, self.client.prefix, self.settings)
            self._stream_ready = True
        subject = persist_subject(self.client.prefix, shard)
        try:
            await settling(
                lambda: self._js.publish(
                    subject, body, stream=self._stream, headers={MSG_ID_HEADER: rid}
                )
            )
        except Exception as exc:
            if isinstance(exc, TransportError):
                raise
            raise TransportError(
                f"JetStream did not store persisted message {rid} on {subject}: {exc!r}; "
                "send it again (same id: it is stored once)"
            ) from exc
        return rid

    # -- replies ------------------------------------------------------------------

    @overload
    async def replies_for(self, request_id: str) -> list[bytes]: ...

    @overload
    async def replies_for(self, request_id: str, reply_type: type[T]) -> list[T]: ...

    async def replies_for(self, request_id: str, reply_type: type[Any] | None = None) -> list[Any]:
        """The stored replies of ``request_id``: ``[]`` while none is stored, else
        the one reply's payload (decoded as ``reply_type`` when given). Raises the
        :class:`~clstr.RequestError` of a stored error (``RemoteHandlerError`` when
        the handler raised, ...)."""
        stored = await self.replies.get(request_id)
        return [] if stored is None else [_payload(stored, reply_type)]

    @overload
    async def await_reply(self, request_id: str, *, timeout: float | None = None) -> bytes: ...

    @overload
    async def await_reply(
        self, request_id: str, reply_type: type[T], *, timeout: float | None = None
    ) -> T: ...

    async def await_reply(
        self,
        request_id: str,
        reply_type: type[Any] | None = None,
        *,
        timeout: float | None = None,
    ) -> Any:
        """The reply of ``request_id``: at once when it is stored, else as soon as it
        is (a watch on its key, no polling), decoded as ``reply_type`` when given.
        Raises the :class:`~clstr.RequestError` of a stored error, and
        :class:`~clstr.RequestTimeoutError` when none is stored within ``timeout``
        seconds (``None``: no bound)."""
        return _payload(await self.replies.wait(request_id, timeout), reply_type)

    async def stored_reply(self, request_id: str) -> StoredReply | None:
        """The stored reply of ``request_id`` as it is kept (fingerprint and v1 reply
        body), or ``None``."""
        return await self.replies.get(request_id)


def _payload(stored: StoredReply, reply_type: type[Any] | None) -> Any:
    payload = stored.payload()
    return payload if reply_type is None else decode_payload(payload, reply_type)
