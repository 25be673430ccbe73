"""A client bound to one key or one shard, speaking typed payloads."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, Sequence
from typing import Protocol, TypeVar

from ..codec import decode_payload, encode_payload, message_type
from ..envelope import EnvelopeOption
from ..errors import PayloadError
from ..protocol import NODE_INFO_TYPE, NodeInfo

__all__ = ["ScopedClient"]

T = TypeVar("T")


class Sender(Protocol):
    """What a :class:`ScopedClient` uses of its :class:`~clstr.Client`."""

    async def request_shard(
        self,
        shard: int,
        msg_type: str,
        data: bytes = b"",
        *,
        key: str | None = None,
        timeout: float | None = None,
        options: Sequence[EnvelopeOption] = (),
        request_id: str | None = None,
    ) -> bytes: ...

    async def notify_shard(
        self,
        shard: int,
        msg_type: str,
        data: bytes = b"",
        *,
        key: str | None = None,
        options: Sequence[EnvelopeOption] = (),
    ) -> None: ...

    def stream_shard(
        self,
        shard: int,
        msg_type: str,
        data: bytes = b"",
        *,
        key: str | None = None,
        window: int = 64,
        timeout: float | None = None,
        options: Sequence[EnvelopeOption] = (),
    ) -> AsyncGenerator[bytes, None]: ...


def _encode_typed(payload: object) -> tuple[str, bytes]:
    validate = getattr(payload, "validate", None)
    if callable(validate):
        try:
            validate()
        except Exception as exc:
            raise PayloadError(f"invalid {type(payload).__name__} payload: {exc}") from exc
    return message_type(payload), encode_payload(payload)


class ScopedClient:
    """A client bound to one key or one shard, speaking typed payloads.

    A payload is a dataclass instance (or plain msgpack values); its message
    type is its class's ``message_type`` attribute, else the class name. A
    payload with a ``validate()`` method is validated before sending.
    """

    def __init__(
        self,
        client: Sender,
        shard: int,
        key: str | None,
        options: Sequence[EnvelopeOption],
    ) -> None:
        self.client = client
        self.shard = shard
        self.key = key
        self.options = tuple(options)

    async def request_raw(
        self,
        msg_type: str,
        data: bytes = b"",
        *,
        timeout: float | None = None,
        options: Sequence[EnvelopeOption] = (),
        request_id: str | None = None,
    ) -> bytes:
        """Send raw bytes with an explicit message type; return the raw reply."""
        return await self.client.request_shard(
            self.shard,
            msg_type,
            data,
            key=self.key,
            timeout=timeout,
            options=(*self.options, *options),
            request_id=request_id,
        )

    async def request(
        self,
        payload: object,
        *,
        timeout: float | None = None,
        options: Sequence[EnvelopeOption] = (),
        request_id: str | None = None,
    ) -> bytes:
        """Send a typed payload; return the reply's raw (msgpack) bytes."""
        msg_type, data = _encode_typed(payload)
        return await self.request_raw(
            msg_type, data, timeout=timeout, options=options, request_id=request_id
        )

    async def call(
        self,
        payload: object,
        reply_type: type[T],
        *,
        timeout: float | None = None,
        options: Sequence[EnvelopeOption] = (),
        request_id: str | None = None,
    ) -> T:
        """Send a typed payload and decode the reply into ``reply_type``.

        Raises :class:`~clstr.PayloadError` when the reply does not fit ``reply_type``.
        """
        data = await self.request(payload, timeout=timeout, options=options, request_id=request_id)
        return decode_payload(data, reply_type)

    async def notify(self, payload: object, *, options: Sequence[EnvelopeOption] = ()) -> None:
        """Publish a typed payload; fire and forget."""
        msg_type, data = _encode_typed(payload)
        await self.client.notify_shard(
            self.shard, msg_type, data, key=self.key, options=(*self.options, *options)
        )

    async def stream(
        self,
        payload: object,
        item_type: type[T],
        *,
        window: int = 64,
        timeout: float | None = None,
        options: Sequence[EnvelopeOption] = (),
    ) -> AsyncGenerator[T, None]:
        """Send a typed payload and iterate the streamed reply's chunks, each
        decoded into ``item_type`` (see :meth:`~clstr.Client.stream_shard`)::

            async for row in client.key("report-7").stream(Query(...), Row):
                ...
        """
        msg_type, data = _encode_typed(payload)
        chunks = self.client.stream_shard(
            self.shard,
            msg_type,
            data,
            key=self.key,
            window=window,
            timeout=timeout,
            options=(*self.options, *options),
        )
        async with contextlib.aclosing(chunks):
            async for chunk in chunks:
                yield decode_payload(chunk, item_type)

    async def node_info(self, *, timeout: float | None = None) -> NodeInfo:
        """Ask the node serving this shard who it is and what it owns."""
        data = await self.request_raw(NODE_INFO_TYPE, b"", timeout=timeout)
        return decode_payload(data, NodeInfo)
