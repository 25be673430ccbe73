"""What every implementation of the wire protocol shares: subjects, node info, and
the fingerprint that ties a request id to one request.

These belong to the protocol (docs/protocol.md), not to the node or the
client: both sides, and peers in other languages, derive them the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Final

from blake3 import blake3

from .envelope import Envelope

__all__ = ["DEFAULT_PREFIX", "NODE_INFO_TYPE", "NodeInfo", "fingerprint", "shard_subject"]

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


def fingerprint(env: Envelope) -> bytes:
    """16 bytes that tell one request from another under the same id: BLAKE3 of
    ``len(type) ‖ type ‖ len(key)+1 (0: no key) ‖ key ‖ shard ‖ payload``
    (lengths and shard as u32 big-endian, strings as UTF-8). Headers and the
    deadline are left out: a retry may carry other ones."""
    t = env.type.encode()
    k = b"" if env.key is None else env.key.encode()
    head = b"%s%s%s%s%s" % (
        len(t).to_bytes(4, "big"),
        t,
        (0 if env.key is None else len(k) + 1).to_bytes(4, "big"),
        k,
        env.shard.to_bytes(4, "big"),
    )
    return blake3(head).update(env.data).digest(16)
