"""Membership: who is alive, and which shards each node serves.

Three implementations behind one interface (:class:`Membership`, defined by
the node layer with the :class:`~clstr.node.ShardHost` surface it may use):

* :class:`FixedShards` — the node serves a given list of shards.
* :class:`StaticMembership` — a fixed list of node ids; each node serves the
  shards HRW gives it (parity with the Go original).
* :class:`KvMembership` — dynamic, on NATS JetStream KV: heartbeats with a
  TTL in a members bucket, shard ownership as compare-and-set keys in a shards
  bucket, handoff that drains before it releases, and a lease that fences a
  node that lost its connection or its heartbeat. See docs/membership.md.
"""

from __future__ import annotations

from ..node import (
    ClusterState,
    FixedShards,
    MemberInfo,
    Membership,
    MembershipEvent,
    MembershipEventKind,
    MembershipListener,
    StaticMembership,
)
from ._control import control_subject
from ._kv import KvMembership
from ._settings import KvSettings

__all__ = [
    "Membership",
    "FixedShards",
    "StaticMembership",
    "KvMembership",
    "MemberInfo",
    "ClusterState",
    "MembershipEvent",
    "MembershipEventKind",
    "MembershipListener",
    "KvSettings",
    "control_subject",
]
