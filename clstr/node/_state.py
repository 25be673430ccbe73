"""The node's lifecycle states, its counters, and what its message path reads of it."""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from ..codec import Limits
from ..handlers import Handler
from ..metrics import Metrics
from ..tracing import NodeTracing
from ..transports.base import Transport

__all__ = ["NodeEvent", "NodeEventKind", "NodeListener", "NodeState", "NodeStats", "Owner"]


@dataclass(slots=True)
class NodeStats:
    """Counters of one node since it started (for status and service discovery)."""

    started_at: float = 0.0
    received: int = 0
    handled: int = 0
    errors: int = 0
    processing_time: float = 0.0
    last_error: str = ""
    rejected: dict[str, int] = field(default_factory=dict)

    def reject(self, reason: str) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1


class NodeState(enum.Enum):
    """Lifecycle of a :class:`Node`."""

    CREATED = "created"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"


class Owner(Protocol):
    """What the message path reads of its node (:class:`~clstr.Node` is one):
    settings, where to count, and whether a shard's messages may be taken."""

    node_id: str
    num_shards: int
    seed: str
    handler: Handler
    transport: Transport
    limits: Limits
    clock_skew: float
    max_pending: int
    max_concurrency: int
    stats: NodeStats
    #: Whether :attr:`tracer` is a real one (the no-op one is never called).
    traced: bool
    #: Whether messages get an arrival time (metered or traced).
    timed: bool
    tracer: NodeTracing

    @property
    def metrics(self) -> Metrics: ...

    @property
    def metered(self) -> bool:
        """Whether :attr:`metrics` is a real sink (the no-op one is skipped)."""
        ...

    @property
    def shards(self) -> list[int]: ...

    @property
    def fenced(self) -> bool: ...

    @property
    def accepting(self) -> bool:
        """Whether workers may still start (not once the node stopped)."""
        ...

    def serving(self, shard: int) -> bool:
        """Whether a message of ``shard`` may be taken now."""
        ...

    def fence_reason(self, shard: int) -> str:
        """Why a message of ``shard`` is refused with ``not_owner``."""
        ...


class NodeEventKind(enum.Enum):
    """What a :class:`NodeEvent` reports (all about this node)."""

    SHARD_ACQUIRED = "shard_acquired"
    SHARD_RELEASED = "shard_released"
    FENCED = "fenced"
    UNFENCED = "unfenced"
    TASK_STARTED = "task_started"
    TASK_STOPPED = "task_stopped"


@dataclass(frozen=True, slots=True)
class NodeEvent:
    """Something that happened on this node: a shard it took or gave up, a fence,
    a shard-bound task (``name``) that started or stopped."""

    kind: NodeEventKind
    shard: int | None = None
    name: str = ""
    reason: str = ""


#: Called synchronously for each :class:`NodeEvent`; must not block.
NodeListener = Callable[[NodeEvent], None]
