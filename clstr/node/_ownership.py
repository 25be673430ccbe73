"""Ownership: the contract between a node and whatever decides which shards it serves.

The node layer defines both sides of it, so that memberships (above it) talk
to a node through this small surface and never through its internals:

* :class:`ShardHost` is what a membership may ask of a node: serve a shard
  (:meth:`~ShardHost.acquire`), stop serving one after draining it
  (:meth:`~ShardHost.release`), stop handling at once (:meth:`~ShardHost.fence`),
  handle only within a lease (:meth:`~ShardHost.set_lease`), and carry a shard's
  recent replies to its next owner (:meth:`~ShardHost.handoff_state`,
  :meth:`~ShardHost.restore_handoff`).
* :class:`Membership` is what the node asks of its membership: join (serve
  the shards this node should own), leave (hand them back), close, and the
  cluster as it sees it.

Two memberships whose shard set is known up front live here too, because a
node builds them itself from ``nodes=`` or ``shards=``: :class:`FixedShards`
and :class:`StaticMembership`. The dynamic one, on JetStream KV, is
:class:`clstr.membership.KvMembership`.
"""

from __future__ import annotations

import abc
import asyncio
import enum
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

import structlog

from ..errors import ConfigurationError, LifecycleError, ShardOutOfRangeError
from ..hashing import assign_shards, shards_for_node
from ..transports.base import Transport

__all__ = [
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

_log = structlog.get_logger("clstr.membership")


class ShardHost(Protocol):
    """What a membership may use of a node (:class:`~clstr.Node` is one)."""

    @property
    def node_id(self) -> str: ...

    @property
    def num_shards(self) -> int: ...

    @property
    def seed(self) -> str: ...

    @property
    def prefix(self) -> str: ...

    @property
    def transport(self) -> Transport: ...

    @property
    def shards(self) -> list[int]:
        """The shards served now, sorted."""
        ...

    @property
    def reply_cache_ttl(self) -> float:
        """Seconds a reply is kept for retries (the life of handed-over replies)."""
        ...

    async def acquire(self, shard: int, *, token: int = 0) -> None:
        """Serve ``shard`` under fencing ``token`` (a number that grows with every
        new owner, 0 when the membership has none); return once the server
        routes it to the node."""

    async def release(self, shard: int, *, timeout: float | None = None) -> None:
        """Stop taking ``shard``'s messages, drain them for up to ``timeout``."""

    def fence(self, reason: str) -> None:
        """Stop handling at once, until :meth:`unfence`."""

    def unfence(self) -> None:
        """Resume handling after :meth:`fence`."""

    def set_lease(self, until: float | None) -> None:
        """Handle only until ``until`` (loop time), or always (``None``)."""

    def handoff_state(self, shard: int) -> bytes | None:
        """What the next owner of ``shard`` needs (its recent replies), or ``None``."""

    def restore_handoff(self, shard: int, data: bytes) -> int:
        """Take over what :meth:`handoff_state` exported; return how many replies."""


@dataclass(frozen=True, slots=True)
class MemberInfo:
    """What a live node announces about itself."""

    node_id: str
    weight: float = 1.0
    started_at: float = 0.0
    host: str = ""
    pid: int = 0
    cordoned: bool = False
    incarnation: str = ""


@dataclass(frozen=True, slots=True)
class ClusterState:
    """A snapshot of the cluster as one node sees it.

    ``owners`` maps each shard to the node that holds it now (absent: nobody);
    ``desired`` to the node HRW places it on given the live, uncordoned members.
    """

    members: dict[str, MemberInfo]
    owners: dict[int, str]
    desired: dict[int, str]
    num_shards: int

    def shards_of(self, node_id: str) -> list[int]:
        """The shards ``node_id`` holds now, sorted."""
        return sorted(s for s, n in self.owners.items() if n == node_id)

    @property
    def unowned(self) -> list[int]:
        """Shards nobody holds right now."""
        return [s for s in range(self.num_shards) if s not in self.owners]

    @property
    def balanced(self) -> bool:
        """Whether every shard is held by its desired owner."""
        return self.owners == self.desired and len(self.owners) == self.num_shards


class MembershipEventKind(enum.Enum):
    """What a :class:`MembershipEvent` reports."""

    NODE_JOINED = "node_joined"
    NODE_LEFT = "node_left"
    SHARD_ACQUIRED = "shard_acquired"
    SHARD_RELEASED = "shard_released"


@dataclass(frozen=True, slots=True)
class MembershipEvent:
    """A node joined or left, or a shard changed hands."""

    kind: MembershipEventKind
    node_id: str
    shard: int | None = None


#: Called synchronously for each event; must not block.
MembershipListener = Callable[[MembershipEvent], None]


class Membership(abc.ABC):
    """Decides which shards a node serves, and tells the node.

    The node calls :meth:`join` from ``Node.start`` and :meth:`leave` from
    ``Node.stop``; the membership calls ``node.acquire(shard)`` and
    ``node.release(shard)``.
    """

    def __init__(self) -> None:
        self._listeners: list[MembershipListener] = []

    @abc.abstractmethod
    async def join(self, node: ShardHost) -> None:
        """Start serving the shards this node should own; return once they are served."""

    @abc.abstractmethod
    async def leave(self) -> None:
        """Hand every shard back (draining in-flight messages first) and leave."""

    @abc.abstractmethod
    def cluster_state(self) -> ClusterState:
        """The cluster as this node sees it now."""

    async def close(self) -> None:  # noqa: B027 - optional hook, nothing to release by default
        """Release what the membership runs (tasks, watchers), also when
        :meth:`leave` was cut short by the node's stop bound. Idempotent."""

    def add_listener(self, listener: MembershipListener) -> None:
        """Call ``listener`` for every :class:`MembershipEvent`."""
        self._listeners.append(listener)

    def remove_listener(self, listener: MembershipListener) -> None:
        """Stop calling ``listener``."""
        if listener in self._listeners:
            self._listeners.remove(listener)

    def _emit(self, kind: MembershipEventKind, node_id: str, shard: int | None = None) -> None:
        event = MembershipEvent(kind, node_id, shard)
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:
                _log.exception("membership listener failed", kind=kind.value)


class _LocalMembership(Membership):
    """Base of the memberships whose shard set is known up front."""

    def __init__(self) -> None:
        super().__init__()
        self._node: ShardHost | None = None

    def wanted(self, node: ShardHost) -> list[int]:
        raise NotImplementedError

    def _members(self) -> dict[str, MemberInfo]:
        raise NotImplementedError

    async def join(self, node: ShardHost) -> None:
        self._node = node
        wanted = self.wanted(node)
        for shard in wanted:
            if not 0 <= shard < node.num_shards:
                raise ShardOutOfRangeError(
                    f"shard {shard} is out of range 0..{node.num_shards - 1}"
                )
        await asyncio.gather(*(node.acquire(s) for s in wanted))
        self._emit(MembershipEventKind.NODE_JOINED, node.node_id)
        for shard in wanted:
            self._emit(MembershipEventKind.SHARD_ACQUIRED, node.node_id, shard)

    async def leave(self) -> None:
        node = self._node
        if node is None:
            return
        held = node.shards
        await asyncio.gather(*(node.release(s) for s in held))
        for shard in held:
            self._emit(MembershipEventKind.SHARD_RELEASED, node.node_id, shard)
        self._emit(MembershipEventKind.NODE_LEFT, node.node_id)

    def cluster_state(self) -> ClusterState:
        node = self._node
        if node is None:
            raise LifecycleError("membership has not joined a node yet")
        members = self._members()
        desired = self._desired(node)
        owners = dict.fromkeys(node.shards, node.node_id)
        # Other static members are assumed to serve what HRW gives them.
        owners.update({s: n for s, n in desired.items() if n != node.node_id})
        return ClusterState(members, owners, desired, node.num_shards)

    def _desired(self, node: ShardHost) -> dict[int, str]:
        return dict.fromkeys(self.wanted(node), node.node_id)


class FixedShards(_LocalMembership):
    """Serve exactly these shards (all of them when ``shards`` is ``None``)."""

    def __init__(self, shards: Iterable[int] | None = None) -> None:
        super().__init__()
        self._shards = None if shards is None else sorted(set(shards))

    def wanted(self, node: ShardHost) -> list[int]:
        return list(range(node.num_shards)) if self._shards is None else list(self._shards)

    def _members(self) -> dict[str, MemberInfo]:
        assert self._node is not None
        return {self._node.node_id: MemberInfo(self._node.node_id)}


class StaticMembership(_LocalMembership):
    """A fixed list of node ids (this one included); shards placed by HRW."""

    def __init__(
        self, node_ids: Collection[str], *, weights: Mapping[str, float] | None = None
    ) -> None:
        super().__init__()
        if isinstance(node_ids, str):
            raise ConfigurationError("node_ids must be a collection of ids, not one string")
        self.node_ids = sorted(set(node_ids))
        self.weights = dict(weights) if weights else None

    def wanted(self, node: ShardHost) -> list[int]:
        if node.node_id not in self.node_ids:
            raise ConfigurationError(
                f"node id {node.node_id!r} is not in the node list {self.node_ids}; "
                "a static cluster lists every member, this one included"
            )
        return shards_for_node(
            node.node_id, self.node_ids, node.num_shards, node.seed, weights=self.weights
        )

    def _desired(self, node: ShardHost) -> dict[int, str]:
        return assign_shards(self.node_ids, node.num_shards, node.seed, weights=self.weights)

    def _members(self) -> dict[str, MemberInfo]:
        return {n: MemberInfo(n, weight=(self.weights or {}).get(n, 1.0)) for n in self.node_ids}
