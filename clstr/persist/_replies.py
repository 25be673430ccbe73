"""Stored replies: the outcome of each persisted message, by request id, in JetStream KV.

The bucket ``<prefix>_replies`` holds one key per request id (ids that are
not valid KV keys are base64url behind ``b64.``); its value is a msgpack map
``{v: 1, f: <fingerprint>, r: <the v1 reply body>}``. A reply is written only
if none is stored under its id yet (a conditional create): the first outcome
of a request stands, as in a node's reply cache, and a duplicate delivery
after a crash cannot replace it. Entries live for the bucket's max age.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import msgpack

from ..codec import decode_reply, encode_error_reply
from ..errors import PayloadError, RequestTimeoutError, TransportError
from ..protocol import DEFAULT_PREFIX
from ..transports.base import Transport
from ..transports.jetstream import (
    is_cas_failure,
    jetstream_of,
    kv_key,
    open_bucket,
    settling,
    stop_watcher,
)
from ._names import PersistSettings, reply_bucket

__all__ = ["ReplyStore", "StoredReply"]

# Room left in a stored value for the KV message's own subject and headers.
_KV_OVERHEAD: Final = 1024
# A batched get that has not ended by then is taken as not supported.
_BATCH_GET_TIMEOUT: Final = 5.0


class _NoBatchGet(Exception):
    """The server or the bucket offers no batched direct get."""


@dataclass(frozen=True, slots=True)
class StoredReply:
    """The outcome of one persisted message: the node's v1 reply body (a success
    or an error) and the fingerprint of the request that produced it."""

    request_id: str
    fingerprint: bytes
    body: bytes

    def payload(self) -> bytes:
        """The reply's payload; raises the :class:`~clstr.RequestError` of an error
        reply (``RemoteHandlerError`` for a handler that raised, say)."""
        return decode_reply(self.body)

    def encode(self) -> bytes:
        """The bucket value (see the module docstring)."""
        packed: bytes = msgpack.packb(
            {"v": 1, "f": self.fingerprint, "r": self.body}, use_bin_type=True
        )
        return packed

    @classmethod
    def decode(cls, request_id: str, data: bytes) -> StoredReply:
        """Raises :class:`~clstr.PayloadError` when ``data`` is not a stored reply."""
        try:
            body = msgpack.unpackb(data, raw=False)
            return cls(request_id, bytes(body["f"]), bytes(body["r"]))
        except Exception as exc:
            raise PayloadError(f"not a stored reply for {request_id!r}: {exc}") from exc


class ReplyStore:
    """The stored replies of a cluster (``prefix``), in the KV bucket
    ``<prefix>_replies`` (created with ``settings.reply_max_age`` when missing).
    Needs a NATS transport with JetStream."""

    def __init__(
        self,
        transport: Transport,
        *,
        prefix: str = DEFAULT_PREFIX,
        settings: PersistSettings | None = None,
    ) -> None:
        self._js = jetstream_of(transport, "stored replies")
        self._transport = transport
        self._settings = settings or PersistSettings()
        self.name = reply_bucket(prefix)
        self._bucket: Any = None
        self._opening = asyncio.Lock()
        self._batched: bool | None = None  # whether batched gets work (None: not tried)

    async def bucket(self) -> Any:
        """The nats-py ``KeyValue`` of the replies, created when missing."""
        if self._bucket is None:
            async with self._opening:
                if self._bucket is None:
                    settings = self._settings
                    self._bucket = await settling(
                        lambda: open_bucket(
                            self._js,
                            self.name,
                            replicas=settings.replicas,
                            max_age=settings.reply_max_age,
                            direct=True,
                        )
                    )
        return self._bucket

    async def get(self, request_id: str) -> StoredReply | None:
        """The reply stored for ``request_id``, or ``None``."""
        import nats.js.errors

        bucket = await self.bucket()
        try:
            entry = await bucket.get(kv_key(request_id))
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
            return None
        return StoredReply.decode(request_id, entry.value) if entry.value else None

    async def get_many(self, request_ids: Sequence[str]) -> dict[str, StoredReply]:
        """The stored replies of those of ``request_ids`` that have one: in one
        batched direct get (JetStream's ``multi_last``, nats-server 2.11+, a bucket
        with direct gets), else one get each."""
        if not request_ids:
            return {}
        if self._batched is not False:
            try:
                found = await self._get_batch(request_ids)
                self._batched = True
                return found
            except _NoBatchGet:
                self._batched = False
        replies = await asyncio.gather(*(self.get(rid) for rid in request_ids))
        return {r.request_id: r for r in replies if r is not None}

    async def _get_batch(self, request_ids: Sequence[str]) -> dict[str, StoredReply]:
        import json

        import nats.js.api as api

        await self.bucket()  # created when missing: the direct get addresses its stream
        subjects = {f"$KV.{self.name}.{kv_key(rid)}": rid for rid in request_ids}
        nc = self._js._nc  # the batched get is not in nats-py: its raw request
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox)
        found: dict[str, StoredReply] = {}
        try:
            request = {"multi_last": list(subjects), "batch": len(subjects)}
            await nc.publish(
                f"$JS.API.DIRECT.GET.KV_{self.name}", json.dumps(request).encode(), inbox
            )
            while True:
                msg = await sub.next_msg(timeout=_BATCH_GET_TIMEOUT)
                headers = msg.headers or {}
                status = headers.get(api.Header.STATUS)
                if status == "204" or status == "404":  # end of batch; none found
                    return found
                if status:
                    raise _NoBatchGet(f"{status} {headers.get(api.Header.DESCRIPTION)}")
                rid = subjects.get(headers.get("Nats-Subject", ""))
                if rid is not None and msg.data and headers.get("KV-Operation") is None:
                    found[rid] = StoredReply.decode(rid, msg.data)
        except TimeoutError as exc:  # nats-py's, or asyncio's
            raise _NoBatchGet("no answer") from exc
        finally:
            await sub.unsubscribe()

    async def put(self, reply: StoredReply) -> bool:
        """Store ``reply`` unless a reply is stored under its id already; return
        whether this one was stored. A reply too large for the bucket is stored
        as a ``reply_too_large`` error instead."""
        value = reply.encode()
        limit = self._transport.max_payload - _KV_OVERHEAD
        if len(value) > limit:
            body = encode_error_reply(
                "reply_too_large",
                "ReplyTooLargeError",
                f"the reply of {len(reply.body)} bytes does not fit the reply store "
                f"(at most about {limit} bytes with the server's max_payload); return less",
            )
            value = StoredReply(reply.request_id, reply.fingerprint, body).encode()
        bucket = await self.bucket()
        try:
            await bucket.create(kv_key(reply.request_id), value)
        except Exception as exc:
            if is_cas_failure(exc):
                return False
            raise
        return True

    async def wait(self, request_id: str, timeout: float | None = None) -> StoredReply:
        """The reply stored for ``request_id``: at once when it is there, else as
        soon as it is stored (a watch on its key, no polling). Raises
        :class:`~clstr.RequestTimeoutError` when none is stored within ``timeout``
        seconds (``None``: wait for as long as it takes)."""
        found = await self.get(request_id)
        if found is not None:
            return found
        bucket = await self.bucket()
        # The watch delivers the key's current value first: a reply stored since
        # the get above is not missed.
        watcher = await bucket.watch(kv_key(request_id))
        try:
            async with asyncio.timeout(timeout):
                async for entry in watcher:
                    if entry is not None and entry.operation is None and entry.value:
                        return StoredReply.decode(request_id, entry.value)
        except TimeoutError:
            raise RequestTimeoutError(
                f"no reply stored for request {request_id!r} within {timeout}s; "
                "it may still be pending: await it again later"
            ) from None
        finally:
            await stop_watcher(watcher)
        raise TransportError(
            f"the watch on request {request_id!r} ended (the connection closed?); await it again"
        )
