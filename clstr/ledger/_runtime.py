"""What a ledger node's entities share: the journal, the node's origin and epoch
(for event ids), the settings, and the way back into the cluster."""

from __future__ import annotations

import functools
import itertools
import time
from dataclasses import dataclass, field
from typing import Final

from ..client import Client
from ..hashing import ShardMapper
from ..protocol import entity_key
from ._journal import Journal
from ._settings import LedgerSettings

__all__ = [
    "ACCOUNT_TYPE",
    "SHARD_INDEX_TYPE",
    "LedgerRuntime",
    "account_entity_id",
    "now_ms",
    "shard_index_ids",
]

#: The entity type of accounts: an account is the entity ``LedgerAccount/<bucket>/<account>``.
ACCOUNT_TYPE: Final = "LedgerAccount"
#: The entity type each shard answers ``get_balances`` with (see :func:`shard_index_ids`).
SHARD_INDEX_TYPE: Final = "LedgerShard"


def now_ms() -> int:
    """Wall-clock milliseconds since the Unix epoch (event times, expiries)."""
    return time.time_ns() // 1_000_000


def account_entity_id(bucket: str, account: str) -> str:
    """The entity id of an account: ``<bucket>/<account>`` (a bucket holds no ``/``)."""
    return f"{bucket}/{account}"


@functools.lru_cache(maxsize=16)
def shard_index_ids(num_shards: int, seed: str) -> tuple[str, ...]:
    """For each shard, the id of the ``LedgerShard`` entity that lives in it: the
    smallest integer whose entity key hashes to that shard. A request to it
    reaches the shard's owner, which lists the shard's accounts: that is how
    ``get_balances`` walks every shard (scatter-gather) with entity messages."""
    mapper = ShardMapper(num_shards, seed)
    found: dict[int, str] = {}
    for n in itertools.count():
        shard = mapper.shard(entity_key(SHARD_INDEX_TYPE, str(n)))
        found.setdefault(shard, str(n))
        if len(found) == num_shards:
            return tuple(found[s] for s in range(num_shards))
    raise AssertionError("unreachable")  # pragma: no cover


@dataclass(slots=True)
class LedgerRuntime:
    """A ledger node's shared parts (one per :class:`~clstr.ledger.LedgerService`)."""

    journal: Journal
    settings: LedgerSettings
    #: This node's id: the origin of the events it appends.
    origin: str
    client: Client
    mapper: ShardMapper
    #: This run's epoch (taken from the store when the service starts).
    epoch: int = 0
    _seq: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def next_seq(self) -> int:
        """The next sequence of an event this node originates in this epoch."""
        return next(self._seq)

    def shard_of(self, bucket: str, account: str) -> int:
        """The shard of an account."""
        return self.mapper.shard(entity_key(ACCOUNT_TYPE, account_entity_id(bucket, account)))
