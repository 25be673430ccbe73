"""When to add or remove shards: the policy, the signals, the rule.

A shard is a ring and a worker with one batch in flight, so shards are the
bus's dispatch parallelism. Three signals are measured over a window (since
the previous evaluation):

* **peak fill**: the fullest any ring got, as a share of its capacity;
* **drop rate**: events lost to pressure (evicted, or rejected with
  ``BackpressureError``) per event offered;
* **dispatch latency**: the mean time a batch took to reach the adapter
  (retries included).

The rule (:func:`suggest`), in order:

1. **Up** when any of: peak fill >= ``scale_up_fill``; drop rate >
   ``max_drop_rate``; latency > ``target_latency_ms`` while the rings hold
   events (peak fill > ``scale_down_fill``: a slow adapter with nothing
   queued is not helped by more shards). Adds ``ceil(n * growth)`` shards (at
   least one), up to ``max_shards``.
2. **Down** when all of: peak fill <= ``scale_down_fill``, nothing dropped,
   latency <= half the target, and at least one batch went out in the window
   (an idle bus has no evidence). Removes one shard, down to ``min_shards``.
3. Otherwise **hold**.

With ``auto`` the bus evaluates the rule every ``interval`` seconds and
applies it, at most once per ``cooldown``.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

from ..errors import ConfigurationError
from ._routing import MAX_BUS_SHARDS

__all__ = ["ScalingAction", "ScalingPolicy", "ScalingSignals", "ScalingSuggestion", "suggest"]


@dataclass(frozen=True, slots=True, kw_only=True)
class ScalingPolicy:
    """The thresholds of the scaling rule (see :mod:`clstr.eventbus._scaling`)."""

    min_shards: int = 1
    max_shards: int = 64
    scale_up_fill: float = 0.75
    scale_down_fill: float = 0.05
    max_drop_rate: float = 0.0
    target_latency_ms: float = 250.0
    growth: float = 0.5
    auto: bool = False
    interval: float = 5.0
    cooldown: float = 30.0

    def __post_init__(self) -> None:
        if not 1 <= self.min_shards <= self.max_shards <= MAX_BUS_SHARDS:
            raise ConfigurationError(
                f"scaling needs 1 <= min_shards <= max_shards <= {MAX_BUS_SHARDS}, got "
                f"{self.min_shards} and {self.max_shards}"
            )
        if not 0 <= self.scale_down_fill < self.scale_up_fill <= 1:
            raise ConfigurationError(
                "scaling needs 0 <= scale_down_fill < scale_up_fill <= 1, got "
                f"{self.scale_down_fill} and {self.scale_up_fill}"
            )
        if not 0 <= self.max_drop_rate < 1:
            raise ConfigurationError(f"max_drop_rate must be in [0, 1), got {self.max_drop_rate}")
        if not self.target_latency_ms > 0 or not self.growth > 0:
            raise ConfigurationError("target_latency_ms and growth must be > 0")
        if not self.interval > 0 or not self.cooldown >= 0:
            raise ConfigurationError("interval must be > 0 and cooldown >= 0 seconds")


class ScalingAction(enum.Enum):
    """What :meth:`~clstr.eventbus.EventBus.suggest_scaling` advises."""

    ADD = "add"
    REMOVE = "remove"
    HOLD = "hold"


@dataclass(frozen=True, slots=True)
class ScalingSignals:
    """What the rule looked at, over ``window`` seconds."""

    window: float
    peak_fill: float
    drop_rate: float
    latency_ms: float
    batches: int


@dataclass(frozen=True, slots=True)
class ScalingSuggestion:
    """The advice: ``action``, how many ``shards`` to add or remove (0 to hold), the
    resulting shard count ``target``, the ``reason`` in words, and the ``signals``."""

    action: ScalingAction
    shards: int
    current: int
    target: int
    reason: str
    signals: ScalingSignals


def suggest(policy: ScalingPolicy, current: int, signals: ScalingSignals) -> ScalingSuggestion:
    """Apply the rule of the module docstring."""
    s = signals
    pressure = []
    if s.peak_fill >= policy.scale_up_fill:
        pressure.append(f"rings reached {s.peak_fill:.0%} full (>= {policy.scale_up_fill:.0%})")
    if s.drop_rate > policy.max_drop_rate:
        pressure.append(f"{s.drop_rate:.2%} of events dropped (> {policy.max_drop_rate:.2%})")
    if s.latency_ms > policy.target_latency_ms and s.peak_fill > policy.scale_down_fill:
        pressure.append(
            f"batches took {s.latency_ms:.0f} ms (> {policy.target_latency_ms:.0f} ms) "
            "with events queued"
        )
    if pressure:
        if current >= policy.max_shards:
            return _hold(current, s, "; ".join(pressure) + ", but already at max_shards")
        add = min(max(1, math.ceil(current * policy.growth)), policy.max_shards - current)
        return ScalingSuggestion(
            ScalingAction.ADD, add, current, current + add, "; ".join(pressure), s
        )
    idle = (
        s.peak_fill <= policy.scale_down_fill
        and s.drop_rate == 0
        and s.latency_ms <= policy.target_latency_ms / 2
        and s.batches > 0
    )
    if idle and current > policy.min_shards:
        return ScalingSuggestion(
            ScalingAction.REMOVE,
            1,
            current,
            current - 1,
            f"rings peaked at {s.peak_fill:.0%} full, nothing dropped, "
            f"batches took {s.latency_ms:.0f} ms",
            s,
        )
    return _hold(current, s, "within the policy's thresholds")


def _hold(current: int, signals: ScalingSignals, reason: str) -> ScalingSuggestion:
    return ScalingSuggestion(ScalingAction.HOLD, 0, current, current, reason, signals)
