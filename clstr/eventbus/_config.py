"""The bus's settings: keyword-only value objects with named defaults, checked when built."""

from __future__ import annotations

import enum
import math
import os
import re
from dataclasses import dataclass, field

from ..errors import ConfigurationError
from ._adapter import Adapter
from ._routing import MAX_BUS_SHARDS
from ._scaling import ScalingPolicy

__all__ = [
    "Backpressure",
    "BatchConfig",
    "BusConfig",
    "DispatchRetry",
    "MAX_BUS_SHARDS",
    "check_bus_name",
]

_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def check_bus_name(name: str) -> str:
    """``name`` if it can name a bus (it becomes part of NATS subjects and a stream
    name): 1 to 64 of ``A-Z a-z 0-9 _ -``. Raises :class:`ConfigurationError`."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ConfigurationError(
            f"bus name {name!r} must be 1 to 64 characters of A-Z, a-z, 0-9, _ and -"
        )
    return name


class Backpressure(enum.Enum):
    """What ingesting into a full shard ring does.

    ``BLOCK``: wait for room; the plain ``ingest`` cannot wait without blocking
    the loop, so it raises :class:`~clstr.eventbus.BackpressureError` and
    ``await ingest_wait(event)`` waits. ``DROP_OLDEST``: evict the ring's
    oldest event (counted as dropped) and take the new one. ``DROP_NEWEST``:
    refuse the new one with :class:`~clstr.eventbus.BackpressureError`.
    """

    BLOCK = "block"
    DROP_OLDEST = "drop_oldest"
    DROP_NEWEST = "drop_newest"


@dataclass(frozen=True, slots=True, kw_only=True)
class BatchConfig:
    """How a shard's worker batches: it sends as soon as ``max_events`` are queued,
    or ``max_delay_ms`` after the first event of a batch arrived (0: at once)."""

    max_events: int = 1024
    max_delay_ms: float = 5.0

    def __post_init__(self) -> None:
        if isinstance(self.max_events, bool) or not 1 <= self.max_events <= 65_536:
            raise ConfigurationError(f"batch max_events must be in 1..65536, got {self.max_events}")
        if not 0 <= self.max_delay_ms <= 60_000:
            raise ConfigurationError(
                f"batch max_delay_ms must be in 0..60000, got {self.max_delay_ms}"
            )


@dataclass(frozen=True, slots=True, kw_only=True)
class DispatchRetry:
    """How the dispatch loop retries a batch whose adapter error is retryable: after
    ``initial_backoff`` seconds, doubling up to ``max_backoff``, for at most
    ``max_attempts`` attempts in all (``None``: until it succeeds or the bus's
    shutdown deadline passes). A batch out of attempts is dropped (counted)."""

    initial_backoff: float = 0.01
    max_backoff: float = 1.0
    max_attempts: int | None = None

    def __post_init__(self) -> None:
        if not 0 < self.initial_backoff <= self.max_backoff:
            raise ConfigurationError(
                "retry needs 0 < initial_backoff <= max_backoff, got "
                f"{self.initial_backoff} and {self.max_backoff}"
            )
        if self.max_attempts is not None and self.max_attempts < 1:
            raise ConfigurationError(f"retry max_attempts must be >= 1, got {self.max_attempts}")


def _default_adapter() -> Adapter:
    from ._adapter import NoopAdapter

    return NoopAdapter()


@dataclass(frozen=True, kw_only=True)
class BusConfig:
    """Everything an :class:`~clstr.eventbus.EventBus` is built from.

    * ``name``: the bus's name (subjects, stream and cursors carry it).
    * ``shards``: how many shards to start with (each a ring and a worker
      with one batch in flight: the bus's dispatch parallelism).
    * ``ring_capacity``: events a shard queues at most (plus one batch in flight).
    * ``batch``, ``backpressure``, ``retry``: see their classes.
    * ``adapter``: where batches go (default :class:`~clstr.eventbus.NoopAdapter`).
      One adapter serves one bus.
    * ``scaling``: the rule :meth:`~clstr.eventbus.EventBus.suggest_scaling`
      applies, and whether the bus applies it itself.
    * ``producer_nonce_path``: a file that keeps this producer's id and a
      restart counter, so that a restarted producer never reuses a message id
      (``None``: a random id per run). A running bus locks it.
    * ``seed``: mixed into the key hash (as a cluster's seed is).
    * ``sample_rate``: the share of keys kept (1.0: all; a key's events are all
      kept or all refused with :class:`~clstr.eventbus.SampledError`).
    * ``shutdown_timeout``: how long :meth:`~clstr.eventbus.EventBus.shutdown`
      lets queued events reach the adapter before it drops the rest.

    Raises :class:`~clstr.ConfigurationError` for values out of range.
    """

    name: str = "events"
    shards: int = 4
    ring_capacity: int = 4096
    batch: BatchConfig = field(default_factory=BatchConfig)
    backpressure: Backpressure = Backpressure.BLOCK
    adapter: Adapter = field(default_factory=_default_adapter)
    scaling: ScalingPolicy = field(default_factory=ScalingPolicy)
    producer_nonce_path: str | os.PathLike[str] | None = None
    seed: str = ""
    sample_rate: float = 1.0
    retry: DispatchRetry = field(default_factory=DispatchRetry)
    shutdown_timeout: float = 30.0

    def __post_init__(self) -> None:
        check_bus_name(self.name)
        if isinstance(self.shards, bool) or not 1 <= self.shards <= MAX_BUS_SHARDS:
            raise ConfigurationError(f"shards must be in 1..{MAX_BUS_SHARDS}, got {self.shards}")
        if isinstance(self.ring_capacity, bool) or not 1 <= self.ring_capacity <= 1 << 24:
            raise ConfigurationError(
                f"ring_capacity must be in 1..{1 << 24}, got {self.ring_capacity}"
            )
        if not isinstance(self.backpressure, Backpressure):
            raise ConfigurationError(
                f"backpressure must be a Backpressure, got {self.backpressure}"
            )
        if not isinstance(self.adapter, Adapter):
            raise ConfigurationError(
                f"adapter must be a clstr.eventbus.Adapter, got {type(self.adapter).__name__}"
            )
        if not (0.0 < self.sample_rate <= 1.0) or math.isnan(self.sample_rate):
            raise ConfigurationError(f"sample_rate must be in (0, 1], got {self.sample_rate}")
        if not self.shutdown_timeout >= 0:
            raise ConfigurationError(
                f"shutdown_timeout must be >= 0 seconds, got {self.shutdown_timeout}"
            )
        if not self.scaling.min_shards <= self.shards <= self.scaling.max_shards:
            raise ConfigurationError(
                f"shards ({self.shards}) must be within the scaling policy's "
                f"{self.scaling.min_shards}..{self.scaling.max_shards}"
            )
