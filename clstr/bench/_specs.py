"""What a row of the results is (:class:`Spec`), how much work a run does
(:class:`Sizes`), and the workload both sides of a comparison share.

The rows themselves are defined by their groups (see ``_registry.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

#: The subject prefix of the clstr side.
CLSTR_PREFIX: Final = "bench"
#: Every request and notification carries this many random bytes ...
PAYLOAD_BYTES: Final = 100
#: ... and is addressed to one of this many keys, in turn.
KEYS: Final = 1024


class BenchError(RuntimeError):
    """A benchmark could not run (a worker failed, timed out, or a tool is missing)."""


@dataclass(frozen=True, slots=True)
class Spec:
    """One row of the results table: a clstr figure, its baseline, and the target ratio.

    ``ratio`` is always clstr / baseline. With ``higher_is_better`` (rates)
    the target is a floor (``ratio >= target``), otherwise (times, memory) a
    ceiling. Rows without a target are reported only.
    """

    name: str
    group: str
    what: str
    baseline: str
    unit: str
    higher_is_better: bool
    target: float | None = None

    def passed(self, ratio: float) -> bool | None:
        """Whether ``ratio`` meets the target (``None`` for a report-only row)."""
        if self.target is None:
            return None
        return ratio >= self.target if self.higher_is_better else ratio <= self.target

    def target_text(self) -> str:
        """The target as text: ``>= 0.85x``, ``<= 1.15x`` or ``report``."""
        if self.target is None:
            return "report"
        return f"{'>=' if self.higher_is_better else '<='} {self.target:g}x"


@dataclass(frozen=True, slots=True)
class Sizes:
    """How much work each measurement does (``--quick`` shrinks everything)."""

    inflight: int = 256
    nats_shards: int = 64
    rr_requests: int = 20_000
    rr_warmup: int = 2_000
    latency_requests: int = 2_000
    latency_warmup: int = 200
    notify_messages: int = 50_000
    memory_requests: int = 20_000
    hash_keys: int = 20_000
    hash_repeat: int = 5
    hrw_repeat: int = 3
    live_keys: int = 100_000
    startup_shards: int = 1024
    stream_chunks: int = 20_000
    stream_warmup: int = 2_000
    interrupt_samples: int = 200
    interrupt_warmup: int = 20
    persisted_messages: int = 5_000
    bus_events: int = 200_000
    bus_repeat: int = 5
    bus_jetstream_events: int = 200_000
    id_calls: int = 200_000
    id_repeat: int = 5
    counter_incs: int = 5_000
    counter_warmup: int = 1_024
    ledger_events: int = 3_000
    ledger_warmup: int = 1_024


FULL_SIZES: Final = Sizes()
QUICK_SIZES: Final = Sizes(
    rr_requests=600,
    rr_warmup=100,
    latency_requests=100,
    latency_warmup=20,
    notify_messages=1_000,
    memory_requests=600,
    hash_keys=2_000,
    hash_repeat=1,
    hrw_repeat=1,
    live_keys=2_000,
    startup_shards=128,
    stream_chunks=500,
    stream_warmup=100,
    interrupt_samples=20,
    interrupt_warmup=5,
    persisted_messages=200,
    bus_events=5_000,
    bus_repeat=1,
    bus_jetstream_events=5_000,
    id_calls=5_000,
    id_repeat=1,
    counter_incs=200,
    counter_warmup=50,
    ledger_events=100,
    ledger_warmup=50,
)
