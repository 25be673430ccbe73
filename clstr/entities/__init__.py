"""Entities, singletons and the sharding runner: the actor-style API on clstr.

* :class:`Entity` — a typed, stateful instance per id, living on its shard's
  owner, passivated when idle, its state kept in a :class:`StateStore`
  (:class:`KvStateStore` on JetStream KV, :class:`MemoryStateStore` in tests).
* :class:`EntityHost` — the handler a node runs for its entities.
* :class:`Sharding` — the runner facade: nodes per shard group, clients,
  entities, singletons, registration events (docs/entities.md).
"""

from __future__ import annotations

from ._entity import Entity, EntityContext, EntitySpec, handles, spec_of
from ._events import (
    EntityRegistered,
    EventStream,
    ShardAcquired,
    ShardingEvent,
    ShardReleased,
    SingletonRegistered,
    SingletonStarted,
    SingletonStopped,
)
from ._host import EntityHost
from ._sharding import DEFAULT_GROUP, EntityClient, ShardId, Sharding, Singleton
from ._store import KvStateStore, MemoryStateStore, Record, StaleStateError, StateStore

__all__ = [
    "Entity",
    "EntityContext",
    "EntitySpec",
    "handles",
    "spec_of",
    "EntityHost",
    "StateStore",
    "KvStateStore",
    "MemoryStateStore",
    "Record",
    "StaleStateError",
    "Sharding",
    "ShardId",
    "EntityClient",
    "Singleton",
    "DEFAULT_GROUP",
    "ShardingEvent",
    "EventStream",
    "EntityRegistered",
    "SingletonRegistered",
    "ShardAcquired",
    "ShardReleased",
    "SingletonStarted",
    "SingletonStopped",
]
