"""Sending a batch: keyed messages for many shards of one node in one NATS message.

``send_batch(client, shard, items)`` sends ``items`` (each a message with its
own key, type, payload and request id) to whoever serves ``shard`` in one
``clstr.batch`` request (docs/protocol.md, Batches). That node handles each
item as if it had been sent alone (its key's shard, per-key order, the
request id's rules) and answers every item: with its reply, or with the
refusal of an item whose shard it does not serve (``not_owner``), which the
caller sends again where :attr:`BatchReply.shards` says, or to the item's own
shard subject.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgpack

from ..codec import decode_reply
from ..errors import BadRequestError, ConfigurationError, RequestError
from ..protocol import BATCH_TYPE

if TYPE_CHECKING:
    from ._client import Client

__all__ = ["BatchItem", "BatchReply", "send_batch"]


@dataclass(frozen=True, slots=True)
class BatchItem:
    """One message of a batch: its type, key (required), payload and request id."""

    type: str
    key: str
    data: bytes = b""
    request_id: str | None = None


@dataclass(frozen=True, slots=True)
class BatchReply:
    """The answer to a batch: who answered, the shards it serves now, and for each
    item (in order) its reply's payload or the :class:`~clstr.RequestError` it got."""

    node_id: str
    shards: list[int]
    results: list[bytes | RequestError]


async def send_batch(
    client: Client,
    shard: int,
    items: Sequence[BatchItem],
    *,
    timeout: float | None = None,
) -> BatchReply:
    """Send ``items`` in one message to the node that serves ``shard``.

    The batch has one deadline (``timeout``, default the client's) that every
    item shares. Raises what a request raises when the batch as a whole fails
    (:class:`~clstr.NoShardOwnerError` when nobody serves ``shard``,
    :class:`~clstr.RequestTimeoutError`...: then each item may or may not have
    run, so send it again under its request id); item failures are in
    :attr:`BatchReply.results`.
    """
    if not items:
        raise ConfigurationError("a batch needs at least one item")
    body: list[dict[str, Any]] = []
    for item in items:
        entry: dict[str, Any] = {"t": item.type, "k": item.key, "s": client.shard_for(item.key)}
        if item.data:
            entry["d"] = item.data
        if item.request_id is not None:
            entry["id"] = item.request_id
        body.append(entry)
    payload = await client.request_shard(
        shard, BATCH_TYPE, msgpack.packb(body, use_bin_type=True), timeout=timeout
    )
    return _decode(payload, len(items), client)


def _decode(payload: bytes, count: int, client: Client) -> BatchReply:
    try:
        body = msgpack.unpackb(payload, raw=False)
        node_id, shards, replies = body["node_id"], body["shards"], body["replies"]
        if not (
            isinstance(node_id, str)
            and isinstance(shards, list)
            and all(isinstance(s, int) for s in shards)
            and isinstance(replies, list)
            and len(replies) == count
            and all(isinstance(r, bytes) for r in replies)
        ):
            raise TypeError("unexpected field types")
    except Exception as exc:
        raise BadRequestError(f"malformed batch reply: {exc}") from None
    results: list[bytes | RequestError] = []
    for reply in replies:
        try:
            results.append(decode_reply(reply, limits=client.limits))
        except RequestError as exc:
            results.append(exc)
    return BatchReply(node_id, shards, results)
