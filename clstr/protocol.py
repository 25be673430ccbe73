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
from .errors import ConfigurationError

__all__ = [
    "BATCH_TYPE",
    "DEFAULT_PREFIX",
    "ENTITY_SEPARATOR",
    "INTERRUPT_TYPE",
    "NODE_INFO_TYPE",
    "NodeInfo",
    "entity_key",
    "entity_type_name",
    "fingerprint",
    "shard_subject",
    "split_entity_key",
]

#: The message type of the built-in node-info request (same as the Go original).
NODE_INFO_TYPE: Final = "clstr.node.info"

#: The message type of an interrupt (docs/protocol.md, Interrupts): sent to the
#: shard (and key) of the request it interrupts.
INTERRUPT_TYPE: Final = "clstr.interrupt"

#: The message type of a batch (docs/protocol.md, Batches): keyed messages for
#: many shards of one node in one NATS message, each handled as if sent alone.
BATCH_TYPE: Final = "clstr.batch"

#: The default subject prefix: shard ``s`` is served on ``clstr.shard.<s>``.
DEFAULT_PREFIX: Final = "clstr"


#: Between an entity's type and its id in the entity's routing key.
ENTITY_SEPARATOR: Final = "/"


def entity_key(entity_type: str, entity_id: str) -> str:
    """The routing key of entity ``entity_id`` of type ``entity_type``:
    ``<type>/<id>``. Its shard is that key's shard, so an entity's messages
    route, queue and hash like any keyed message (docs/entities.md).

    Raises :class:`~clstr.ConfigurationError` for an empty type or id, or a
    type holding the separator (ids may hold anything).
    """
    if not isinstance(entity_type, str) or not entity_type or ENTITY_SEPARATOR in entity_type:
        raise ConfigurationError(
            f"entity type must be a non-empty str without {ENTITY_SEPARATOR!r}, got {entity_type!r}"
        )
    if not isinstance(entity_id, str) or not entity_id:
        raise ConfigurationError(f"entity id must be a non-empty str, got {entity_id!r}")
    return f"{entity_type}{ENTITY_SEPARATOR}{entity_id}"


def entity_type_name(cls: type) -> str:
    """The type name of an entity class: its ``type_name`` attribute, else its name."""
    name = getattr(cls, "type_name", None)
    return name if isinstance(name, str) and name else cls.__name__


def split_entity_key(key: str) -> tuple[str, str] | None:
    """``(type, id)`` of an entity key, or ``None`` when ``key`` is not one."""
    entity_type, sep, entity_id = key.partition(ENTITY_SEPARATOR)
    if not sep or not entity_type or not entity_id:
        return None
    return entity_type, entity_id


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
    #: Live entity instances per entity type, when the node hosts entities.
    entities: dict[str, int] | None = None


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
