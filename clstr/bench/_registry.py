"""Every benchmark group, in the order of the results table: a new group is
registered here, and only here.
"""

from __future__ import annotations

from typing import Final

from . import (
    _counters,
    _entity_call,
    _eventbus,
    _hashing,
    _ids,
    _interrupts,
    _keyhandler,
    _ledger,
    _memory_rr,
    _nats,
    _persisted,
    _senders,
    _startup,
    _streams,
)
from ._group import Group
from ._specs import Spec

REGISTERED: Final[tuple[Group, ...]] = (
    _nats.RR,
    _nats.LATENCY,
    _nats.NOTIFY,
    _entity_call.GROUP,
    _streams.GROUP,
    _interrupts.GROUP,
    _persisted.GROUP,
    _eventbus.JETSTREAM,
    _counters.GROUP,
    _ledger.GROUP,
    _senders.EDGE,
    _senders.TRACING,
    _memory_rr.GROUP,
    _hashing.SHARD_FOR_KEY,
    _hashing.HRW_ASSIGN,
    _keyhandler.GROUP,
    _eventbus.INGEST,
    _ids.GROUP,
    _startup.GROUP,
)

#: Every row, in the order of the results table.
SPECS: Final[tuple[Spec, ...]] = tuple(spec for group in REGISTERED for spec in group.specs)

#: The names ``--only`` accepts.
GROUPS: Final[tuple[str, ...]] = tuple(group.name for group in REGISTERED)
