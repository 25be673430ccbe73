"""Where consumers keep their place: one checkpoint per (bus, shard), written with
compare-and-set.

A checkpoint holds the position of the shard's next unhandled event, the
fencing token of the consumer that wrote it (its cluster shard's ownership
token, see :class:`~clstr.node.ShardContext`) and the node's id. Every write
names the revision it read: a write over a newer revision fails
(:class:`CheckpointConflictError`), and the consumer then re-reads; if the
stored token is greater than its own, a newer owner has taken over and the
stale consumer stops; it never moves the newer one's checkpoint.

:class:`KvCheckpoints` keeps them in the JetStream KV bucket
``<prefix>_bus_checkpoints`` under ``<bus>.<shard>`` (msgpack ``{f, o, t, n,
at}``); :class:`MemoryCheckpoints` in a dict, with the same semantics.
"""

from __future__ import annotations

import abc
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgpack

from ..protocol import DEFAULT_PREFIX
from ..transports.jetstream import bucket_name, is_cas_failure, open_bucket, settling
from ._errors import ConsumeError, ConsumerAdapterError
from ._event import Position

if TYPE_CHECKING:
    from ..transports.nats import NatsTransport

__all__ = [
    "Checkpoint",
    "CheckpointConflictError",
    "CheckpointStore",
    "KvCheckpoints",
    "MemoryCheckpoints",
    "checkpoints_bucket",
]


def checkpoints_bucket(prefix: str) -> str:
    """The KV bucket of the consumers' checkpoints under ``prefix``."""
    return bucket_name(prefix, "bus_checkpoints")


class CheckpointConflictError(ConsumeError):
    """The checkpoint changed since it was read (another consumer wrote it): read it
    again before writing."""


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A stored checkpoint and the store's ``revision`` of it (for the next write)."""

    position: Position
    token: int
    node: str
    saved_at: float
    revision: int


class CheckpointStore(abc.ABC):
    """Keeps checkpoints (see the module docstring)."""

    @abc.abstractmethod
    async def load(self, bus: str, shard: int) -> Checkpoint | None:
        """The checkpoint of ``shard``, or ``None`` when none was written."""

    @abc.abstractmethod
    async def save(
        self, bus: str, shard: int, position: Position, *, token: int, node: str, revision: int
    ) -> int:
        """Write a checkpoint over ``revision`` (0: none yet); return the new revision.

        Raises :class:`CheckpointConflictError` when the stored revision is another.
        """


class MemoryCheckpoints(CheckpointStore):
    """Checkpoints in a dict (one process: tests and memory clusters)."""

    def __init__(self) -> None:
        self._entries: dict[tuple[str, int], Checkpoint] = {}
        self._revision = 0

    async def load(self, bus: str, shard: int) -> Checkpoint | None:
        return self._entries.get((bus, shard))

    async def save(
        self, bus: str, shard: int, position: Position, *, token: int, node: str, revision: int
    ) -> int:
        current = self._entries.get((bus, shard))
        if (current.revision if current else 0) != revision:
            raise CheckpointConflictError(f"checkpoint of {bus}/{shard} moved past {revision}")
        self._revision += 1
        self._entries[(bus, shard)] = Checkpoint(position, token, node, time.time(), self._revision)
        return self._revision


class KvCheckpoints(CheckpointStore):
    """Checkpoints in a JetStream KV bucket (see the module docstring)."""

    def __init__(self, kv: Any) -> None:
        self._kv = kv

    @classmethod
    async def open(
        cls, transport: NatsTransport, *, prefix: str = DEFAULT_PREFIX, replicas: int = 1
    ) -> KvCheckpoints:
        """The store of the bucket under ``prefix`` (created when missing)."""
        js = transport.nc.jetstream()
        name = checkpoints_bucket(prefix)
        kv = await settling(lambda: open_bucket(js, name, replicas=replicas))
        return cls(kv)

    async def load(self, bus: str, shard: int) -> Checkpoint | None:
        import nats.js.errors

        try:
            entry = await self._kv.get(f"{bus}.{shard}")
        except nats.js.errors.KeyNotFoundError:
            return None
        except Exception as exc:
            raise ConsumerAdapterError(
                f"cannot read the checkpoint of {bus}/{shard}: {exc}"
            ) from exc
        try:
            body = msgpack.unpackb(entry.value, raw=False)
            position = Position(int(body["f"]), int(body["o"]))
            return Checkpoint(
                position, int(body["t"]), str(body["n"]), float(body["at"]), int(entry.revision)
            )
        except Exception as exc:
            raise ConsumerAdapterError(
                f"the checkpoint of {bus}/{shard} is malformed ({exc}); delete key "
                f"{bus}.{shard} of the checkpoints bucket to start the shard over"
            ) from exc

    async def save(
        self, bus: str, shard: int, position: Position, *, token: int, node: str, revision: int
    ) -> int:
        key = f"{bus}.{shard}"
        body = msgpack.packb(
            {"f": position.frame, "o": position.offset, "t": token, "n": node, "at": time.time()}
        )
        try:
            if revision:
                return int(await self._kv.update(key, body, last=revision))
            return int(await self._kv.create(key, body))
        except Exception as exc:
            if is_cas_failure(exc):
                raise CheckpointConflictError(f"checkpoint of {bus}/{shard} moved") from exc
            raise ConsumerAdapterError(
                f"cannot write the checkpoint of {bus}/{shard}: {exc}"
            ) from exc
