"""Snowflake ids: 64-bit, time-ordered, unique across the live nodes of a cluster.

* :class:`Snowflake` issues the ids: ``next_id()`` is a plain call, ids of one
  generator strictly increase even when the wall clock steps back, 4096 per
  millisecond (more by borrowing the next milliseconds, within ``max_lead``).
* :func:`parse_snowflake` reads an id back into a :class:`SnowflakeParts`.
* A generator's machine id comes from a :class:`MachineIdSource`: a
  :class:`MachineIdLease` on JetStream KV (no two live nodes share one), a
  :class:`StaticMachineId` for fixed deployments, or :class:`LocalMachineIds`
  for the generators of one process (a test cluster on the memory transport).
* :func:`node_snowflake` picks the source a node's transport calls for.

The layout, the epoch, the clock strategy and what is guaranteed under which
assumptions: docs/ids.md.
"""

from __future__ import annotations

from ._layout import (
    EPOCH,
    EPOCH_MS,
    MAX_MACHINE_ID,
    MAX_SEQUENCE,
    MAX_TIMESTAMP,
    SnowflakeParts,
    parse_snowflake,
)
from ._lease import LeaseSettings, MachineIdLease
from ._machine import LocalMachineId, LocalMachineIds, MachineIdSource, StaticMachineId
from ._node import node_snowflake
from ._snowflake import DEFAULT_MAX_LEAD, Snowflake

__all__ = [
    "Snowflake",
    "DEFAULT_MAX_LEAD",
    "parse_snowflake",
    "SnowflakeParts",
    "EPOCH",
    "EPOCH_MS",
    "MAX_MACHINE_ID",
    "MAX_SEQUENCE",
    "MAX_TIMESTAMP",
    "MachineIdSource",
    "StaticMachineId",
    "LocalMachineIds",
    "LocalMachineId",
    "MachineIdLease",
    "LeaseSettings",
    "node_snowflake",
]
