"""The node's lifecycle states and counters."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

__all__ = ["NodeState", "NodeStats"]


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
