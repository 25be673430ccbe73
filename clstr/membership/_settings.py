"""Timing of the KV membership, checked when it is built."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigurationError

__all__ = ["KvSettings"]


@dataclass(frozen=True, slots=True, kw_only=True)
class KvSettings:
    """Timing of :class:`~clstr.membership.KvMembership` (seconds).

    A crashed node's shards move after ``heartbeat_ttl`` plus the time the
    server takes to place the expiry marker; a node whose heartbeat has not
    been renewed for ``lease_fraction * heartbeat_ttl`` stops handling
    (fences itself) so that it can never overlap with the next owner.

    Raises :class:`~clstr.ConfigurationError` for timings that cannot work.
    """

    heartbeat_interval: float = 1.0
    heartbeat_ttl: float = 3.0
    lease_fraction: float = 0.8
    handoff_timeout: float = 5.0
    reconcile_interval: float = 1.0
    replicas: int = 1

    def __post_init__(self) -> None:
        if not 0 < self.heartbeat_interval < self.heartbeat_ttl:
            raise ConfigurationError(
                "heartbeat_interval must be > 0 and shorter than heartbeat_ttl "
                f"(got {self.heartbeat_interval} and {self.heartbeat_ttl})"
            )
        if self.heartbeat_ttl < 1:
            raise ConfigurationError("heartbeat_ttl must be >= 1 s (JetStream's TTL resolution)")
        if not 0 < self.lease_fraction < 1:
            raise ConfigurationError(f"lease_fraction must be in (0, 1), got {self.lease_fraction}")
        if self.heartbeat_interval >= self.lease:
            raise ConfigurationError(
                f"heartbeat_interval ({self.heartbeat_interval} s) must be shorter than the lease "
                f"(lease_fraction * heartbeat_ttl = {self.lease:.3g} s), "
                "or the node fences itself between heartbeats"
            )

    @property
    def lease(self) -> float:
        """Seconds a node may handle messages after its last successful heartbeat."""
        return self.heartbeat_ttl * self.lease_fraction
