"""Batches: keyed messages for many shards of one node in one NATS message.

A batch (``clstr.batch``, docs/protocol.md) is a keyless request whose payload
lists items, each a message of its own: type, key, the shard its sender
computed for the key, payload and request id. The node turns every item into
an envelope that shares the batch's headers and deadline and hands it to the
path every message takes after decoding (the key's shard, ownership of *that*
shard, the request id, room in the queue, the key's lane), so a batch of a
thousand items is a thousand messages that share one NATS message: per-key
order, idempotency and the handlers are the same ones. The batch is answered
once its last item is, with the items' replies in order, the node's id and the
shards it serves, so that a sender learns where to send the items refused
``not_owner``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

import msgpack
import structlog

from ..codec import Limits, check_limits, encode_payload
from ..envelope import Envelope, _envelope
from ..errors import BadRequestError, LimitExceededError
from ..protocol import BATCH_TYPE, INTERRUPT_TYPE, NODE_INFO_TYPE

__all__ = ["BatchReplies", "decode_batch", "encode_batch_reply"]

# Built-in messages are answered before the queue: never items of a batch.
_NOT_ITEMS: Final = frozenset({BATCH_TYPE, INTERRUPT_TYPE, NODE_INFO_TYPE})

_log = structlog.get_logger("clstr.node")


def decode_batch(env: Envelope, limits: Limits) -> list[Envelope]:
    """The items of batch ``env``, each an envelope on the shard its sender gave.

    Raises :class:`BadRequestError` saying what is wrong (the whole batch is
    refused: none of its items ran).
    """
    if env.key is not None or env.stream:
        raise BadRequestError("a batch carries no key and no stream window; its items carry keys")
    try:
        raw = msgpack.unpackb(env.data, raw=False, strict_map_key=True)
    except Exception as exc:
        raise BadRequestError(f"batch payload is not msgpack: {exc}") from None
    if not isinstance(raw, list) or not raw:
        raise BadRequestError("a batch's payload is a non-empty array of item maps")
    items: list[Envelope] = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict):
            raise BadRequestError(f"batch item {i} is a {type(item).__name__}, not a map")
        t, k, s, d, rid = (item.get(f) for f in ("t", "k", "s", "d", "id"))
        if (
            type(t) is not str
            or not t
            or type(k) is not str
            or not k
            or type(s) is not int
            or s < 0
            or (d is not None and type(d) is not bytes)
            or (rid is not None and type(rid) is not str)
        ):
            raise BadRequestError(
                f"batch item {i}: t (non-empty str), k (non-empty str) and s (int >= 0) "
                "are required; d (bin) and id (str) are optional"
            )
        if t in _NOT_ITEMS:
            raise BadRequestError(f"batch item {i}: {t!r} cannot be sent in a batch")
        item_env = _envelope(
            t, d or b"", s, k, env.headers, env.ttl, env.created_at, rid, env.deadline, 0
        )
        try:
            check_limits(item_env, limits)
        except LimitExceededError as exc:
            raise BadRequestError(f"batch item {i}: {exc}") from None
        items.append(item_env)
    return items


def encode_batch_reply(node_id: str, shards: list[int], replies: list[bytes]) -> bytes:
    """The payload of a batch's reply: the node, the shards it serves, and each
    item's reply body (as a request's reply body), in the items' order."""
    return encode_payload({"node_id": node_id, "shards": shards, "replies": replies})


class BatchReplies:
    """Collects the replies of a batch's items and calls ``done`` with them, in
    order, when the last one arrives."""

    __slots__ = ("_done", "_left", "_replies")

    def __init__(self, count: int, done: Callable[[list[bytes]], None]) -> None:
        self._left = count
        self._replies: list[Any] = [None] * count
        self._done = done

    def target(self, index: int) -> Callable[[bytes], None]:
        """Where item ``index``'s reply goes (the dispatcher calls it once)."""

        def put(body: bytes) -> None:
            if self._replies[index] is not None:
                return
            self._replies[index] = body
            self._left -= 1
            if not self._left:
                try:
                    self._done(self._replies)
                except Exception:  # never into the dispatcher's reply path
                    _log.exception("cannot answer a batch")

        return put
