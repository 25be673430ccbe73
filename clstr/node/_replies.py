"""Recent replies by request id (idempotent retries), and their handoff to a shard's next owner."""

from __future__ import annotations

from collections import OrderedDict

import msgpack

from .._clock import monotonic

__all__ = ["ReplyCache", "pack_handoff", "unpack_handoff"]


class ReplyCache:
    """Recent replies by request id: bounded in count, each kept for ``ttl`` seconds,
    each tagged with its shard so that a handoff can carry a shard's replies to
    its next owner."""

    def __init__(self, size: int, ttl: float) -> None:
        self.size = size
        self.ttl = ttl
        self._items: OrderedDict[str, tuple[float, bytes, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, request_id: str) -> bytes | None:
        item = self._items.get(request_id)
        if item is None:
            return None
        if item[0] <= monotonic():
            del self._items[request_id]
            return None
        return item[1]

    def put(self, request_id: str, body: bytes, shard: int, ttl: float | None = None) -> None:
        if not self.size:
            return
        items = self._items
        items[request_id] = (monotonic() + (self.ttl if ttl is None else ttl), body, shard)
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

    def export(self, shard: int, budget: int) -> list[tuple[str, float, bytes]]:
        """``shard``'s live replies as (id, seconds left, body), newest first,
        as many as fit in about ``budget`` bytes."""
        now = monotonic()
        out: list[tuple[str, float, bytes]] = []
        for request_id, (until, body, owner) in reversed(self._items.items()):
            if owner != shard or until <= now:
                continue
            budget -= len(request_id) + len(body) + 16
            if budget < 0:
                break
            out.append((request_id, until - now, body))
        return out


def pack_handoff(cache: ReplyCache, shard: int, budget: int) -> bytes | None:
    """``shard``'s recent replies as msgpack ``[[id, ms_left, body], ...]`` (newest
    first, about ``budget`` bytes at most), or ``None`` when there are none."""
    replies = cache.export(shard, budget)
    if not replies:
        return None
    packed: bytes = msgpack.packb(
        [[rid, max(1, int(left * 1000)), body] for rid, left, body in replies],
        use_bin_type=True,
    )
    return packed


def unpack_handoff(cache: ReplyCache, shard: int, data: bytes) -> int:
    """Put the replies :func:`pack_handoff` packed into ``cache``; return how many
    were new. Raises ``ValueError``/``TypeError`` (msgpack's or ours) on malformed data."""
    items = msgpack.unpackb(data, raw=False, max_bin_len=len(data), max_str_len=1024)
    taken = 0
    for rid, ms_left, body in reversed(items):  # oldest first: the newest end newest
        if not (isinstance(rid, str) and isinstance(ms_left, int) and isinstance(body, bytes)):
            raise TypeError(f"bad entry types {type(rid)}, {type(ms_left)}, {type(body)}")
        if cache.get(rid) is None:
            cache.put(rid, body, shard, ttl=ms_left / 1000)
            taken += 1
    return taken
