"""Recent replies by request id (idempotent retries), and their handoff to a shard's next owner.

A request id names one request, as an idempotency key does in payment APIs:
the cache keeps, with each reply, the :func:`~clstr.protocol.fingerprint` of the request it
answered, and only outcomes of a handler that ran (see
:data:`NOT_STORED`); a later request under the same id gets the stored reply
if its fingerprint matches, and ``id_reused`` otherwise.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Final

import msgpack

from .._clock import monotonic

__all__ = ["NOT_STORED", "ReplyCache", "pack_handoff", "unpack_handoff"]

#: Error codes of refusals that ran no handler: never stored, so that a
#: corrected retry under the same id runs (docs/protocol.md, idempotency).
NOT_STORED: Final = frozenset(
    {
        "bad_request",
        "wrong_shard",
        "no_handler",
        "key_required",
        "expired",
        "overloaded",
        "not_owner",
        "no_owner",
        "id_reused",
    }
)


class ReplyCache:
    """Recent replies by request id: bounded in count, each kept for ``ttl`` seconds,
    each tagged with its shard so that a handoff can carry a shard's replies to
    its next owner."""

    def __init__(self, size: int, ttl: float) -> None:
        self.size = size
        self.ttl = ttl
        # id -> (until, reply body, shard, fingerprint of the request)
        self._items: OrderedDict[str, tuple[float, bytes, int, bytes]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, request_id: str) -> tuple[bytes, bytes] | None:
        """The live reply stored under ``request_id`` and its request's
        fingerprint, or ``None``."""
        item = self._items.get(request_id)
        if item is None:
            return None
        if item[0] <= monotonic():
            del self._items[request_id]
            return None
        return item[1], item[3]

    def put(
        self, request_id: str, body: bytes, shard: int, print_: bytes, ttl: float | None = None
    ) -> None:
        """Store ``body`` as the reply to the request ``print_`` under ``request_id``."""
        if not self.size:
            return
        items = self._items
        until = monotonic() + (self.ttl if ttl is None else ttl)
        items[request_id] = (until, body, shard, print_)
        items.move_to_end(request_id)
        while len(items) > self.size:
            items.popitem(last=False)
        # Drop expired entries from the old end, a few per call.
        now = monotonic()
        for _ in range(2):
            oldest = next(iter(items.values()), None)
            if oldest is None or oldest[0] > now:
                break
            items.popitem(last=False)

    def export(self, shard: int, budget: int) -> list[tuple[str, float, bytes, bytes]]:
        """``shard``'s live replies as (id, seconds left, body, fingerprint),
        newest first, as many as fit in about ``budget`` bytes."""
        now = monotonic()
        out: list[tuple[str, float, bytes, bytes]] = []
        for request_id, (until, body, owner, print_) in reversed(self._items.items()):
            if owner != shard or until <= now:
                continue
            budget -= len(request_id) + len(body) + 32
            if budget < 0:
                break
            out.append((request_id, until - now, body, print_))
        return out


def pack_handoff(cache: ReplyCache, shard: int, budget: int) -> bytes | None:
    """``shard``'s recent replies as msgpack ``[[id, ms_left, body, fingerprint], ...]``
    (newest first, about ``budget`` bytes at most), or ``None`` when there are none."""
    replies = cache.export(shard, budget)
    if not replies:
        return None
    packed: bytes = msgpack.packb(
        [[rid, max(1, int(left * 1000)), body, fp] for rid, left, body, fp in replies],
        use_bin_type=True,
    )
    return packed


def unpack_handoff(cache: ReplyCache, shard: int, data: bytes) -> int:
    """Put the replies :func:`pack_handoff` packed into ``cache``; return how many
    were new. Raises ``ValueError``/``TypeError`` (msgpack's or ours) on malformed data."""
    items = msgpack.unpackb(data, raw=False, max_bin_len=len(data), max_str_len=1024)
    taken = 0
    for rid, ms_left, body, print_ in reversed(items):  # oldest first: newest end newest
        if not (
            isinstance(rid, str)
            and isinstance(ms_left, int)
            and isinstance(body, bytes)
            and isinstance(print_, bytes)
        ):
            raise TypeError(f"bad entry types {[type(x).__name__ for x in (rid, ms_left, body)]}")
        if cache.get(rid) is None:
            cache.put(rid, body, shard, print_, ttl=ms_left / 1000)
            taken += 1
    return taken
