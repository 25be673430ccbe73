"""Which shard an event goes to: a key hash, a bucket, and the bucket's shard.

A key hashes as clstr hashes every key (:func:`clstr.shard_for_key`, BLAKE3
with the bus's seed) into ``0..2**20-1`` (:data:`clstr.hashing.MAX_SHARDS`
buckets: :meth:`~clstr.eventbus.EventBus.hash_key` returns it, and
``ingest_raw(data, hash=...)`` takes it). Its low 12 bits pick one of 4096
buckets, and each bucket belongs to one shard by rendezvous (HRW) hashing over
the live shard ids (:func:`clstr.assign_shards`, shard ids as node ids). So
routing an event is one hash and one list lookup, and when shards are added
or removed only the buckets that change owner move: adding a shard to ``n``
moves about ``1/(n+1)`` of the keys, all onto the new shard; removing one
moves only its own keys.

A table slot holds a shard's ring, or a :class:`Refusal` that raises the
ingestion error of its condition: sampled out, moving (mid-rescale), the bus
not started, shutting down. The hot path therefore never tests the bus's state.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, MutableMapping
from typing import Final, Protocol

from ..hashing import MAX_SHARDS, ShardMapper, assign_shards
from ._event import Event

__all__ = [
    "KEY_HASH_SPACE",
    "MAX_BUS_SHARDS",
    "TABLE_MASK",
    "TABLE_SIZE",
    "Refusal",
    "Slot",
    "kept_buckets",
    "key_hasher",
    "plan",
]

TABLE_SIZE: Final = 4096
TABLE_MASK: Final = TABLE_SIZE - 1
#: Key hashes are in ``0..KEY_HASH_SPACE-1``.
KEY_HASH_SPACE: Final = MAX_SHARDS
#: The most shards one bus may have (a shard gets ~16 buckets at least).
MAX_BUS_SHARDS: Final = 256
_CACHED_KEYS: Final = 8192
_CACHED_KEY_LENGTH: Final = 128


class Slot(Protocol):
    """What a routing table slot does with an event's record."""

    def push(self, item: Event | bytes, stamp: int) -> None: ...


class Refusal:
    """A table slot that refuses: counts ``reason`` and raises ``make()``."""

    __slots__ = ("counts", "make", "reason")

    def __init__(
        self, reason: str, make: Callable[[], Exception], counts: MutableMapping[str, int]
    ) -> None:
        self.reason = reason
        self.make = make
        self.counts = counts

    def push(self, item: Event | bytes, stamp: int) -> None:
        self.counts[self.reason] += 1
        raise self.make()


def key_hasher(seed: str) -> Callable[[str | bytes], int]:
    """The bus's key hash: ``shard_for_key(key, 2**20, seed)``, remembered for the last
    few thousand short keys.

    Event keys repeat (a user's, a device's events): a dict lookup costs a tenth
    of a BLAKE3 digest (docs/eventbus.md), and a miss costs one lookup more. The
    cache is emptied when full, and keys over 128 characters are not kept, so
    it holds at most ``_CACHED_KEYS`` small keys.
    """
    digest = ShardMapper(KEY_HASH_SPACE, seed).shard
    cache: dict[str | bytes, int] = {}
    lookup = cache.get

    def hash_key(key: str | bytes) -> int:
        value = lookup(key)
        if value is None:
            value = digest(key)
            if len(key) <= _CACHED_KEY_LENGTH:
                if len(cache) >= _CACHED_KEYS:
                    cache.clear()
                cache[key] = value
        return value

    return hash_key


def plan(shards: Collection[int], seed: str) -> list[int]:
    """The owner shard of every bucket, by HRW over ``shards``."""
    owners = assign_shards([str(s) for s in shards], TABLE_SIZE, seed)
    return [int(owners[b]) for b in range(TABLE_SIZE)]


def kept_buckets(sample_rate: float) -> int:
    """How many buckets (the lowest ones) ``sample_rate`` keeps (at least one)."""
    return max(1, min(TABLE_SIZE, round(sample_rate * TABLE_SIZE)))
