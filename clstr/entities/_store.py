"""Where entity state lives between activations: JetStream KV, or memory for tests.

Every write is conditional on the revision the writer loaded (compare-and-set),
so a node that lost an entity's shard (and does not know it yet) can never
overwrite the state its next owner wrote: its save fails with
:class:`StaleStateError` and the instance is dropped.

A record holds the state and the replies of the last requests that changed
it (request id, fingerprint, reply payload): saved in one write with the state
they produced, they let the next owner, after a crash, answer a retried
request with its first reply instead of applying it twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final, Protocol

import msgpack

from ..errors import ClstrError, PayloadError
from ..transports.base import Transport
from ..transports.jetstream import (
    bucket_name,
    is_cas_failure,
    kv_key,
    kv_key_text,
    open_bucket,
    settling,
)

__all__ = [
    "KvStateStore",
    "MemoryStateStore",
    "Record",
    "StaleStateError",
    "StateStore",
]

#: Replies kept in a record (the newest): how far back a retry after a crash
#: still finds its first reply.
RECORD_REPLIES: Final = 64


class StaleStateError(ClstrError):
    """An entity's state was written by another owner since this one loaded it."""


@dataclass(slots=True)
class Record:
    """An entity's durable record: its encoded state and recent replies."""

    state: bytes
    #: (request id, fingerprint, reply payload), oldest first.
    replies: list[tuple[str, bytes, bytes]] = field(default_factory=list)

    def encode(self) -> bytes:
        packed: bytes = msgpack.packb(
            {"v": 1, "s": self.state, "r": [list(r) for r in self.replies[-RECORD_REPLIES:]]},
            use_bin_type=True,
        )
        return packed

    @classmethod
    def decode(cls, data: bytes) -> Record:
        """Raises :class:`PayloadError` when ``data`` is not a record."""
        try:
            body = msgpack.unpackb(data, raw=False)
            replies = [(str(i), bytes(f), bytes(p)) for i, f, p in body.get("r", [])]
            return cls(bytes(body["s"]), replies)
        except Exception as exc:
            raise PayloadError(f"not an entity record: {exc}") from exc


class StateStore(Protocol):
    """Durable entity records with conditional writes (see the module docstring)."""

    async def load(self, entity_type: str, entity_id: str) -> tuple[Record, int] | None:
        """The record and its revision, or ``None`` when there is none."""
        ...

    async def save(self, entity_type: str, entity_id: str, record: Record, revision: int) -> int:
        """Write ``record`` if the stored revision is still ``revision`` (0: none
        stored yet); return the new revision. Raises :class:`StaleStateError`
        when another writer was first."""
        ...

    async def ids(self, entity_type: str) -> list[str]:
        """The ids of the entities of ``entity_type`` that have a record, sorted."""
        ...


class MemoryStateStore:
    """A :class:`StateStore` in this process (shared by the nodes of a test cluster)."""

    def __init__(self) -> None:
        self._records: dict[tuple[str, str], tuple[bytes, int]] = {}
        self._revision = 0

    async def load(self, entity_type: str, entity_id: str) -> tuple[Record, int] | None:
        found = self._records.get((entity_type, entity_id))
        return None if found is None else (Record.decode(found[0]), found[1])

    async def save(self, entity_type: str, entity_id: str, record: Record, revision: int) -> int:
        found = self._records.get((entity_type, entity_id))
        if (found[1] if found else 0) != revision:
            raise StaleStateError(
                f"{entity_type}/{entity_id} was written by another owner since revision {revision}"
            )
        self._revision += 1
        self._records[entity_type, entity_id] = (record.encode(), self._revision)
        return self._revision

    async def ids(self, entity_type: str) -> list[str]:
        return sorted(i for t, i in self._records if t == entity_type)


class KvStateStore:
    """A :class:`StateStore` on JetStream KV: one bucket per entity type,
    ``<prefix>_entity_<type>``, one key per entity (ids that are not valid KV
    keys are base64url-encoded behind ``b64.``). Needs a NATS transport with
    JetStream."""

    def __init__(self, transport: Transport, *, prefix: str = "clstr", replicas: int = 1) -> None:
        nc = getattr(transport, "nc", None)
        if nc is None:
            raise ClstrError(
                "KvStateStore needs a NatsTransport with JetStream; "
                "use MemoryStateStore on the memory transport"
            )
        self._js = nc.jetstream()
        self._prefix = prefix
        self._replicas = replicas
        self._buckets: dict[str, Any] = {}

    @staticmethod
    def kv_key(entity_id: str) -> str:
        """The KV key of ``entity_id`` (see :func:`~clstr.transports.jetstream.kv_key`)."""
        return kv_key(entity_id)

    @staticmethod
    def entity_id(kv_key: str) -> str:
        """The entity id of KV key ``kv_key`` (the inverse of :meth:`kv_key`)."""
        return kv_key_text(kv_key)

    async def bucket(self, entity_type: str) -> Any:
        """The KV bucket (nats-py ``KeyValue``) of ``entity_type``'s records,
        created when missing: to read them all, say (see :meth:`Record.decode`)."""
        bucket = self._buckets.get(entity_type)
        if bucket is None:
            name = bucket_name(self._prefix, f"entity_{entity_type}")
            bucket = await settling(lambda: open_bucket(self._js, name, replicas=self._replicas))
            self._buckets[entity_type] = bucket
        return bucket

    async def load(self, entity_type: str, entity_id: str) -> tuple[Record, int] | None:
        import nats.js.errors

        bucket = await self.bucket(entity_type)
        try:
            entry = await bucket.get(self.kv_key(entity_id))
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
            return None
        if not entry.value:
            return None
        return Record.decode(entry.value), int(entry.revision)

    async def save(self, entity_type: str, entity_id: str, record: Record, revision: int) -> int:
        bucket = await self.bucket(entity_type)
        key, value = self.kv_key(entity_id), record.encode()
        try:
            if revision == 0:
                return int(await bucket.create(key, value))
            return int(await bucket.update(key, value, last=revision))
        except Exception as exc:
            if is_cas_failure(exc):
                raise StaleStateError(
                    f"{entity_type}/{entity_id} was written by another owner since "
                    f"revision {revision}"
                ) from exc
            raise

    async def ids(self, entity_type: str) -> list[str]:
        import nats.js.errors

        bucket = await self.bucket(entity_type)
        try:
            keys = await bucket.keys()
        except nats.js.errors.NoKeysError:
            return []
        return sorted(self.entity_id(k) for k in keys)
