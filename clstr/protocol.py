"""Names every implementation of the wire protocol shares: subjects and node info.

These belong to the protocol (docs/protocol.md), not to the node or the
client: both sides, and peers in other languages, derive them the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Final

__all__ = ["DEFAULT_PREFIX", "NODE_INFO_TYPE", "NodeInfo", "shard_subject"]

#: The message type of the built-in node-info request (same as the Go original).
NODE_INFO_TYPE: Final = "clstr.node.info"

#: The default subject prefix: shard ``s`` is served on ``clstr.shard.<s>``.
DEFAULT_PREFIX: Final = "clstr"


def shard_subject(prefix: str, shard: int) -> str:
    """The NATS subject of ``shard`` under ``prefix``."""
    return f"{prefix}.shard.{shard}"


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """What a node says about itself (reply to :data:`NODE_INFO_TYPE`)."""

    message_type: ClassVar[str] = NODE_INFO_TYPE

    node_id: str
    shards: list[int] = field(default_factory=list)
    #: The message types the node's handler accepts (a :class:`Router`'s
    #: routes), or ``None`` when the handler does not say (any type may do).
    message_types: list[str] | None = None
