"""Distributed counters: StrictCounter and LaxCounter behind one interface.

* :class:`Counter` — the interface both share: ``inc``, ``get``, ``set``,
  ``delete``, ``clear`` (all ``async``), in a namespace.
* :class:`StrictCounter` — every operation a request to the key's owner,
  saved before it is acknowledged, applied once however often it is retried.
* :class:`LaxCounter` — ``inc_nowait`` adds in memory; a flusher sends the
  deltas every ``allowed_lag`` (20 ms), one batch message per owner.
* :func:`serve_counters` — what the nodes run: one entity per counter key
  (docs/counters.md explains the design, the guarantees and the figures).
"""

from __future__ import annotations

from ._counter import Counter
from ._entity import (
    CLOCK_SKEW,
    MAX_WRITERS,
    WRITER_TTL,
    Add,
    CounterEntity,
    CounterState,
    Put,
    Read,
    Take,
    counter_entity,
    serve_counters,
)
from ._keys import MAX_KEY_BYTES, check_key, check_namespace, counter_key, counter_type
from ._lax import DEFAULT_ALLOWED_LAG, LaxCounter, LaxStats
from ._strict import DEFAULT_COUNTER_RETRY, StrictCounter

__all__ = [
    "Counter",
    "StrictCounter",
    "LaxCounter",
    "LaxStats",
    "serve_counters",
    "DEFAULT_ALLOWED_LAG",
    "DEFAULT_COUNTER_RETRY",
    "WRITER_TTL",
    "MAX_WRITERS",
    "CLOCK_SKEW",
    "MAX_KEY_BYTES",
    # the node side: one entity per key
    "CounterEntity",
    "CounterState",
    "counter_entity",
    "Add",
    "Put",
    "Take",
    "Read",
    # names
    "check_namespace",
    "check_key",
    "counter_type",
    "counter_key",
]
