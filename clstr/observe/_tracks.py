"""What the dashboard remembers of each node between polls: its last STATS
reply and a short history of its counters, from which rates and recent
percentiles are differences (the nodes publish totals since they started)."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from ._latency import counts_from_json, quantile

__all__ = ["NodeTrack", "Sample", "stats_data"]


def stats_data(reply: dict[str, Any]) -> dict[str, Any]:
    """The clstr part (``data``) of a STATS reply, or ``{}``."""
    data = reply.get("data")
    return data if isinstance(data, dict) else {}


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


@dataclass(slots=True)
class Sample:
    """One node's totals at one poll (``t`` on the loop's clock)."""

    t: float
    requests: int
    errors: int
    latency: dict[int, int]


@dataclass(slots=True)
class NodeTrack:
    """One node as the dashboard knows it."""

    node_id: str
    color: int
    #: The node's last STATS reply (``None``: never answered, e.g. a KV member
    #: that runs no service discovery).
    reply: dict[str, Any] | None = None
    #: When it last answered (loop time), and when it was first seen.
    answered_at: float | None = None
    first_seen: float = 0.0
    samples: deque[Sample] = field(default_factory=deque)

    @property
    def data(self) -> dict[str, Any]:
        return stats_data(self.reply) if self.reply is not None else {}

    @property
    def shards(self) -> list[int]:
        """The shards it announced last (what it serves, by its own word)."""
        shards = self.data.get("shards")
        if isinstance(shards, list):
            return sorted(s for s in shards if isinstance(s, int))
        endpoints = (self.reply or {}).get("endpoints") or []
        found = []
        for endpoint in endpoints:
            data = endpoint.get("data") if isinstance(endpoint, dict) else None
            if isinstance(data, dict) and isinstance(data.get("shard"), int):
                found.append(data["shard"])
        return sorted(found)

    def answering(self, now: float, silent_after: float) -> bool:
        """Whether it answered within ``silent_after`` seconds."""
        return self.answered_at is not None and now - self.answered_at <= silent_after

    def observe(self, reply: dict[str, Any], now: float, keep: float) -> None:
        """Take a fresh STATS reply; keep ``keep`` seconds of samples."""
        previous = self.reply
        self.reply = reply
        self.answered_at = now
        data = stats_data(reply)
        rejected = data.get("rejected")
        refused = sum(_int(v) for v in rejected.values()) if isinstance(rejected, dict) else 0
        failed = _int(data.get("errors")) + refused
        sample = Sample(
            t=now,
            requests=_int(data.get("handled")) + failed,
            errors=failed,
            latency=counts_from_json(
                (data.get("time_in_node") or {}).get("buckets") or []
                if isinstance(data.get("time_in_node"), dict)
                else []
            ),
        )
        restarted = previous is not None and previous.get("started") != reply.get("started")
        if restarted or (self.samples and sample.requests < self.samples[-1].requests):
            self.samples.clear()  # a new process under the same id: totals start again
        self.samples.append(sample)
        while len(self.samples) > 2 and now - self.samples[1].t >= keep:
            self.samples.popleft()

    def _since(self, now: float, window: float) -> tuple[Sample, Sample] | None:
        """The oldest sample within ``window`` of the newest, and the newest."""
        if len(self.samples) < 2:
            return None
        newest = self.samples[-1]
        if now - newest.t > window:
            return None  # stale: nothing recent to compare
        oldest = next(s for s in self.samples if newest.t - s.t <= window)
        if oldest is newest:
            oldest = self.samples[-2]
        return oldest, newest

    def rates(self, now: float, window: float) -> tuple[float | None, float | None]:
        """Requests and errors per second over the last ``window`` seconds."""
        pair = self._since(now, window)
        if pair is None:
            return None, None
        old, new = pair
        span = new.t - old.t
        if span <= 0:
            return None, None
        return (new.requests - old.requests) / span, (new.errors - old.errors) / span

    def latency(self, now: float, window: float) -> tuple[float | None, float | None]:
        """p50 and p99 of time in node (ms) of the messages handled in the last
        ``window`` seconds (``None``: none were)."""
        pair = self._since(now, window)
        if pair is None:
            return None, None
        old, new = pair
        delta = {i: c - old.latency.get(i, 0) for i, c in new.latency.items()}
        p50, p99 = quantile(delta, 0.50), quantile(delta, 0.99)
        return (
            None if p50 is None else p50 / 1e6,
            None if p99 is None else p99 / 1e6,
        )
