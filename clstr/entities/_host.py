"""The entity host: the handler a node runs for its entities.

A message for entity ``Cart/cart-42`` (its key) reaches the node that owns the
key's shard; the host finds the entity type by the key's first part and hands
the message to the type's :class:`~clstr.KeyHandler`, which keeps one
:class:`_Instance` per entity: created (state loaded) on first use,
passivated (state saved) when idle, over the type's bound, when its shard
moves, and when the node stops. Entities are thus the typed, stateful case of
``KeyHandler``, not a second mechanism beside it.
"""

from __future__ import annotations

import asyncio
import inspect
from typing import Any

import structlog

from ..codec import decode_payload, encode_payload
from ..envelope import Envelope
from ..errors import (
    ConfigurationError,
    IdempotencyKeyReusedError,
    KeyRequiredError,
    NoHandlerError,
    NotOwnerError,
)
from ..handlers import KeyHandler, decode_message, stream_to
from ..metrics import NOOP_METRICS, Metrics
from ..protocol import fingerprint, split_entity_key
from ._entity import Entity, EntityContext, EntitySpec, spec_of
from ._store import Record, StaleStateError, StateStore

__all__ = ["EntityHost"]

_log = structlog.get_logger("clstr.entities")


class _Encoded:
    """A reply already encoded (a streaming method's collected items)."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data


class _Instance:
    """One live entity: the user's object, the revision its state was loaded at,
    and what has not been saved yet."""

    __slots__ = ("entity", "pending", "replies", "revision", "saved", "spec", "store")

    def __init__(
        self, spec: EntitySpec, entity: Entity[Any], store: StateStore | None, record: Record | None
    ) -> None:
        self.spec = spec
        self.entity = entity
        self.store = store if spec.state_type is not None else None
        self.revision = 0
        self.saved = b"" if record is None else record.state  # the state as last stored
        self.replies: list[tuple[str, bytes, bytes]] = [] if record is None else record.replies
        self.pending = 0  # handled messages whose effect is not saved yet

    async def __call__(self, env: Envelope) -> bytes:
        request_id = env.id
        if request_id is not None and self.replies:
            stored = self._stored_reply(request_id, env)
            if stored is not None:
                return stored
        route = self.spec.routes.get(env.type)
        if route is None:
            raise NoHandlerError(
                f"entity type {self.spec.type_name} has no handler for {env.type!r}; "
                f"known types: {self.spec.message_types}"
            )
        message_cls, method = route
        msg = decode_message(env, message_cls)
        try:
            if inspect.isasyncgenfunction(method):
                # A streaming method: its items go to the caller's stream (or,
                # without one, make up a list as the reply).
                streamed = await stream_to(method(self.entity, msg), encode_payload)
                result = _Encoded(streamed) if streamed is not None else None
            else:
                result = await method(self.entity, msg)
        except BaseException:
            if self.store is not None:
                self._roll_back()
            raise
        if result is None:
            payload = b""
        elif isinstance(result, _Encoded):
            payload = result.data
        else:
            payload = encode_payload(result)
        if self.store is not None:
            encoded = None
            if self.spec.save_every == 1 and not self.pending:
                # Write-through: a message that leaves the state as stored (a read)
                # writes nothing, neither state nor reply; its retry runs again.
                encoded = encode_payload(self.entity.state)
                if encoded == self.saved:
                    return payload
            self.pending += 1
            if request_id is not None and self.spec.stored_replies:
                self.replies.append((request_id, fingerprint(env), payload))
                del self.replies[: -self.spec.stored_replies]
            if self.spec.save_every and self.pending >= self.spec.save_every:
                await self.save(encoded)
        return payload

    def _roll_back(self) -> None:
        """A failed (or cancelled) message leaves the state as stored before it."""
        state_type = self.spec.state_type
        assert state_type is not None
        self.entity.state = decode_payload(self.saved, state_type) if self.saved else state_type()

    def _stored_reply(self, request_id: str, env: Envelope) -> bytes | None:
        """The reply a request with this id got before (kept with the state), or
        ``None``; ``id_reused`` when the id named another request."""
        for rid, print_, payload in reversed(self.replies):
            if rid == request_id:
                if print_ != fingerprint(env):
                    raise IdempotencyKeyReusedError(
                        f"request id {request_id!r} was used before for another request to "
                        f"{self.spec.type_name}/{self.entity.id}; give each new request a new id"
                    )
                return payload
        return None

    async def load(self) -> None:
        """Read the state from the store (or start from the initial state)."""
        if self.store is None:
            return
        found = await self.store.load(self.spec.type_name, self.entity.id)
        if found is None:
            self.revision, self.saved, self.replies = 0, b"", []
            return
        record, self.revision = found
        self.saved, self.replies = record.state, record.replies
        self.entity.state = decode_payload(record.state, self.spec.state_type or object)

    async def save(self, encoded: bytes | None = None) -> None:
        """Write the state (``encoded`` when the caller has it already) and the
        replies that produced it, conditional on the revision loaded. On
        :class:`StaleStateError` the state is read again and the message refused
        with ``not_owner`` (retryable: it runs again on the current state, never
        on top of a stale one)."""
        assert self.store is not None
        state = encode_payload(self.entity.state) if encoded is None else encoded
        try:
            self.revision = await self.store.save(
                self.spec.type_name, self.entity.id, Record(state, self.replies), self.revision
            )
        except StaleStateError as exc:
            _log.warning("entity state written elsewhere; reloading", error=str(exc))
            self.pending = 0
            await self.load()
            raise NotOwnerError(f"{exc}; retry (this node now has the current state)") from exc
        self.saved, self.pending = state, 0

    async def passivate(self) -> None:
        """``on_stop``, then save what is not saved yet."""
        try:
            await self.entity.on_stop()
        finally:
            if self.store is not None and self.pending:
                await self.save()


class _TypeRuntime:
    """The live instances of one entity type on this node."""

    def __init__(self, spec: EntitySpec, host: EntityHost) -> None:
        self.spec = spec
        self._host = host
        self.instances = KeyHandler(
            self._activate,
            max_keys=spec.max_instances,
            idle_timeout=spec.idle_timeout,
            on_evict=self._passivate,
        )

    async def _activate(self, key: str, env: Envelope) -> _Instance:
        spec, host = self.spec, self._host
        parts = split_entity_key(key)
        assert parts is not None
        context = EntityContext(spec.type_name, parts[1], env.shard, host.node_id)
        state = spec.state_type() if spec.state_type is not None else None
        entity = spec.cls(context, state)
        instance = _Instance(spec, entity, host.store, None)
        await instance.load()
        await entity.on_start()
        host.counted(spec.type_name, len(self.instances) + 1)
        return instance

    async def _passivate(self, key: str, handler: Any) -> None:
        try:
            await handler.passivate()
        except Exception:
            _log.exception("entity passivation failed", key=key)
        finally:
            self._host.counted(self.spec.type_name, len(self.instances))


class EntityHost:
    """The handler of a node's entities (see the module docstring).

    ``store`` keeps the state of entity types that declare a ``state_type``
    (without one, state lives only as long as the instance). Register entity
    classes with :meth:`register`, before or after the node starts.
    """

    def __init__(
        self,
        *,
        store: StateStore | None = None,
        node_id: str = "",
        metrics: Metrics = NOOP_METRICS,
    ) -> None:
        self.store = store
        self.node_id = node_id
        self.metrics = metrics
        self._types: dict[str, _TypeRuntime] = {}
        self._started = False

    def register(self, entity_cls: type[Entity[Any]]) -> EntitySpec:
        """Serve ``entity_cls``; return its spec. Raises :class:`ConfigurationError`
        for a type name already registered or a class that is not an entity."""
        spec = spec_of(entity_cls)
        if spec.type_name in self._types:
            raise ConfigurationError(f"entity type {spec.type_name!r} is already registered")
        runtime = self._types[spec.type_name] = _TypeRuntime(spec, self)
        if self._started:
            runtime.instances.start_sweeper()
        return spec

    @property
    def entity_types(self) -> list[str]:
        """The registered entity type names."""
        return sorted(self._types)

    @property
    def message_types(self) -> list[str]:
        """Every message type some entity type handles (for node info)."""
        return sorted({t for r in self._types.values() for t in r.spec.routes})

    @property
    def entity_counts(self) -> dict[str, int]:
        """Live instances per entity type on this node."""
        return {name: len(r.instances) for name, r in self._types.items()}

    def active_count(self, entity_type: str | None = None) -> int:
        """Live instances of ``entity_type`` (``None``: of every type) on this node."""
        if entity_type is None:
            return sum(len(r.instances) for r in self._types.values())
        runtime = self._types.get(entity_type)
        return 0 if runtime is None else len(runtime.instances)

    def counted(self, entity_type: str, count: int) -> None:
        self.metrics.entities_active(self.node_id, entity_type, count)

    async def __call__(self, env: Envelope) -> bytes | None:
        key = env.key
        parts = None if key is None else split_entity_key(key)
        if parts is None:
            raise KeyRequiredError(
                f"message {env.type!r} is for an entity: send it with the key <type>/<id> "
                "(client.entity(EntityClass, id))"
            )
        runtime = self._types.get(parts[0])
        if runtime is None:
            raise NoHandlerError(
                f"no entity type {parts[0]!r} on this node; registered: {self.entity_types}"
            )
        return await runtime.instances(env)

    async def on_start(self) -> None:
        """Start every type's idle sweeper."""
        self._started = True
        for runtime in self._types.values():
            runtime.instances.start_sweeper()

    async def on_stop(self) -> None:
        """Passivate every instance (saving its state); failures are logged."""
        await asyncio.gather(*(r.instances.on_stop() for r in self._types.values()))

    async def on_shard_released(self, shard: int) -> None:
        """Passivate the instances of ``shard`` before it moves to another node."""
        await asyncio.gather(*(r.instances.on_shard_released(shard) for r in self._types.values()))
