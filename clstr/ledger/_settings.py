"""The ledger's settings, checked when they are built."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import ConfigurationError

__all__ = ["LedgerSettings"]

_PREFIX = re.compile(r"[A-Za-z0-9_-]{1,32}")


@dataclass(frozen=True, slots=True, kw_only=True)
class LedgerSettings:
    """How a ledger node keeps its data and times its work.

    ``store_prefix`` names everything the ledger keeps in JetStream: the journal
    of bucket ``b`` is the stream ``<store_prefix>_ledger_<b>`` on the subjects
    ``<store_prefix>.ledger.<b>.<account>``, account snapshots are the entity
    bucket ``<store_prefix>_entity_LedgerAccount``, node epochs
    ``<store_prefix>_ledger_epochs`` and open reservations
    ``<store_prefix>_ledger_holds``. Every node of every cluster that serves the
    same ledger uses the same one (and the same JetStream), whatever the prefix
    of its cluster's subjects.

    ``replicas``: JetStream replicas of the journals and buckets.
    ``duplicate_window``: seconds the journal remembers the nonces it took
    (JetStream's deduplication), beyond the account's own memory of its last
    128 nonces. ``sweep_interval``: how often the expiry sweeper looks for
    reservations past their expiry. ``idle_timeout``: seconds an account stays
    in memory unused. ``balances_concurrency``: accounts a shard reads at once
    for ``get_balances``. ``max_conflicts``: how many times an account re-reads
    its journal and tries again when another writer appended first, before it
    answers ``not_owner`` (retryable). ``snapshot_every``: an account's snapshot is
    written to KV after every n events (1: write-through, before each reply);
    the journal is the source of truth either way, so a larger n loses nothing
    and repeats nothing, it only makes a new owner read up to n - 1 events from
    the journal after a crash (docs/ledger.md has the measured trade-off).
    ``store_timeout``: seconds a JetStream operation may take; an append the
    store does not confirm in time is answered ``not_owner`` (retryable, not
    kept), so that the retry of its nonce learns from the journal whether it
    landed. Keep it below the clients' timeouts.

    Raises :class:`~clstr.ConfigurationError` for values that cannot work.
    """

    store_prefix: str = "clstr"
    replicas: int = 1
    duplicate_window: float = 120.0
    sweep_interval: float = 1.0
    idle_timeout: float = 300.0
    balances_concurrency: int = 32
    max_conflicts: int = 8
    snapshot_every: int = 1
    store_timeout: float = 2.0

    def __post_init__(self) -> None:
        if not _PREFIX.fullmatch(self.store_prefix):
            raise ConfigurationError(
                f"store_prefix {self.store_prefix!r} must be 1 to 32 letters, digits, '_' or '-'"
            )
        if self.replicas < 1:
            raise ConfigurationError(f"replicas must be >= 1, got {self.replicas}")
        for name in ("duplicate_window", "sweep_interval", "idle_timeout", "store_timeout"):
            if not getattr(self, name) > 0:
                raise ConfigurationError(f"{name} must be > 0 seconds, got {getattr(self, name)}")
        if min(self.balances_concurrency, self.max_conflicts, self.snapshot_every) < 1:
            raise ConfigurationError(
                "balances_concurrency, max_conflicts and snapshot_every must be >= 1"
            )
