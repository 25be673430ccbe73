"""The node layer: a cluster member that owns shards and runs their handlers.

:class:`Node` takes the messages of the shards it serves, limits concurrency,
keeps one key's messages in order, runs the handler under the deadline and
replies. Which shards it serves is decided by a :class:`Membership`, which
talks to the node through :class:`ShardHost` (both defined here, so that the
memberships above this layer never reach into the node's internals).
"""

from __future__ import annotations

from ..protocol import DEFAULT_PREFIX, NODE_INFO_TYPE, NodeInfo, shard_subject
from ._bound import ShardContext, ShardTask
from ._node import Node
from ._ownership import (
    ClusterState,
    FixedShards,
    MemberInfo,
    Membership,
    MembershipEvent,
    MembershipEventKind,
    MembershipListener,
    ShardHost,
    StaticMembership,
)
from ._replies import ReplyCache
from ._state import NodeEvent, NodeEventKind, NodeListener, NodeState, NodeStats

__all__ = [
    "Node",
    "NodeState",
    "NodeStats",
    "NodeInfo",
    "NODE_INFO_TYPE",
    "DEFAULT_PREFIX",
    "shard_subject",
    "ReplyCache",
    # shard-bound tasks and node events
    "ShardContext",
    "ShardTask",
    "NodeEvent",
    "NodeEventKind",
    "NodeListener",
    # ownership: the node's contract with its membership
    "ShardHost",
    "Membership",
    "FixedShards",
    "StaticMembership",
    "MemberInfo",
    "ClusterState",
    "MembershipEvent",
    "MembershipEventKind",
    "MembershipListener",
]
