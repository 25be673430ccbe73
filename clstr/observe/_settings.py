"""Timing of the dashboard."""

from __future__ import annotations

from dataclasses import dataclass, fields

from ..errors import ConfigurationError

__all__ = ["DashboardSettings"]


@dataclass(frozen=True, slots=True, kw_only=True)
class DashboardSettings:
    """Timing of the dashboard (seconds). Raises :class:`ConfigurationError` for
    values that cannot work."""

    #: How often service discovery is asked (KV changes show at once).
    poll_interval: float = 1.0
    #: How long one poll gathers answers.
    discovery_timeout: float = 0.75
    #: A node that has not answered for this long shows as silent (with the
    #: defaults: two polls in a row without its answer).
    silent_after: float = 1.5
    #: A silent node that is no member and holds no shard is dropped after this.
    forget_after: float = 30.0
    #: Requests/s and errors/s are averaged over this window.
    rate_window: float = 5.0
    #: p50/p99 are over the messages handled in this window.
    latency_window: float = 10.0
    #: Points kept for the sparklines (one per poll).
    history: int = 120
    #: Membership events kept.
    max_events: int = 50
    #: Bound on one connection attempt, and the pause between attempts.
    connect_timeout: float = 3.0
    retry_interval: float = 2.0

    def __post_init__(self) -> None:
        for f in fields(self):
            if not getattr(self, f.name) > 0:
                raise ConfigurationError(f"dashboard setting {f.name} must be > 0")
        if self.discovery_timeout >= self.poll_interval:
            raise ConfigurationError(
                f"discovery_timeout ({self.discovery_timeout} s) must be shorter than "
                f"poll_interval ({self.poll_interval} s)"
            )
