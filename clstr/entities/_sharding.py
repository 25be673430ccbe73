"""The runner facade: one object with the sharding API of an actor-style cluster.

A :class:`Sharding` holds, over one transport, a :class:`~clstr.Node` per shard
group (serving the group's shards with an :class:`EntityHost`) and a
:class:`~clstr.Client` per group. docs/entities.md maps each method of the
reference ``Sharding`` trait to its name here.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass, replace
from types import TracebackType
from typing import Any, Final, Literal, Self, overload

from ..client import Client, RetryPolicy, ScopedClient
from ..envelope import Envelope, EnvelopeOption
from ..errors import ConfigurationError, LifecycleError
from ..hashing import ShardMapper, validate_num_shards
from ..ids import Snowflake, node_snowflake
from ..metrics import NOOP_METRICS, Metrics
from ..node import Membership, Node, NodeEvent, NodeEventKind, ShardContext
from ..persist import PersistedClient, PersistedConsumers, PersistSettings, serve_persisted
from ..protocol import DEFAULT_PREFIX, entity_key, entity_type_name
from ..tracing import NOOP_TRACING, Tracing
from ..transports.base import Transport
from ._entity import Entity, spec_of
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
from ._store import StateStore

__all__ = ["DEFAULT_GROUP", "EntityClient", "Sharding", "ShardId", "Singleton"]

#: The shard group of entities and singletons that name none.
DEFAULT_GROUP: Final = "default"

# Singletons are placed like the entity of this type with their name as id.
_SINGLETON_TYPE: Final = "clstr.singleton"

#: The shape of a singleton: runs until ``ctx.stopping`` is set (its shard moves,
#: the node is fenced or stops), then returns; cancelled after its grace.
Singleton = Callable[[ShardContext], Awaitable[None]]


@dataclass(frozen=True, slots=True, order=True)
class ShardId:
    """A shard of a shard group."""

    group: str
    shard: int


class _State(enum.Enum):
    CREATED = "created"
    RUNNING = "running"
    STOPPED = "stopped"


class EntityClient:
    """Calls to the entities of one type (``make_client``): ``client("cart-42")``
    is a :class:`~clstr.ScopedClient` bound to that entity."""

    def __init__(self, client: Client, entity_type: str) -> None:
        self._client = client
        self.entity_type = entity_type

    def __call__(self, entity_id: str, *options: EnvelopeOption) -> ScopedClient:
        return self._client.key(entity_key(self.entity_type, entity_id), *options)


class Sharding:
    """The sharding API (see docs/entities.md for the trait-to-Python table).

    ``groups`` maps shard-group names to their shard counts (the default group
    has ``num_shards``); each group is a clstr cluster of its own on subject
    prefix ``<prefix>`` (default group) or ``<prefix>-<group>``, and this runner
    serves every group it is given. Which shards this node serves: pass a
    ``membership`` factory (group name -> a new :class:`~clstr.node.Membership`,
    e.g. ``lambda g: KvMembership()``), or ``nodes`` (a static member list), or
    neither (this node serves every shard). ``store`` keeps entity state;
    ``metrics`` and ``tracing`` go to every node and client of the runner;
    ``node_options`` go to each :class:`~clstr.Node`. With ``persist``
    settings, each group's node consumes the persisted messages of the shards
    it serves (docs/streams.md); sending persisted messages and reading
    stored replies works with or without them (on NATS with JetStream).
    """

    def __init__(
        self,
        transport: Transport,
        *,
        num_shards: int,
        node_id: str | None = None,
        prefix: str = DEFAULT_PREFIX,
        seed: str = "",
        groups: Mapping[str, int] | None = None,
        membership: Callable[[str], Membership] | None = None,
        nodes: Collection[str] | None = None,
        store: StateStore | None = None,
        timeout: float = 5.0,
        retry: RetryPolicy | None = None,
        metrics: Metrics = NOOP_METRICS,
        tracing: Tracing = NOOP_TRACING,
        node_options: Mapping[str, Any] | None = None,
        persist: PersistSettings | None = None,
    ) -> None:
        if membership is not None and nodes is not None:
            raise ConfigurationError("pass membership or nodes, not both")
        self.transport = transport
        self.seed = seed
        shard_counts = {DEFAULT_GROUP: num_shards, **(groups or {})}
        self._mappers = {
            g: ShardMapper(validate_num_shards(n), seed) for g, n in shard_counts.items()
        }
        self._events = EventStream()
        self._singletons: dict[str, tuple[str, int]] = {}  # name -> (group, shard)
        self._state = _State.CREATED
        self._resources = contextlib.AsyncExitStack()
        self._snowflake: Snowflake | None = None
        self.nodes: dict[str, Node] = {}
        self.clients: dict[str, Client] = {}
        self.hosts: dict[str, EntityHost] = {}
        self._persist = persist
        self._consumers: dict[str, PersistedConsumers] = {}
        self._persisted: dict[str, PersistedClient] = {}
        for group, count in shard_counts.items():
            group_prefix = prefix if group == DEFAULT_GROUP else f"{prefix}-{group}"
            host = EntityHost(store=store, node_id=node_id or "", metrics=metrics)
            kwargs: dict[str, Any] = dict(node_options or {})
            if membership is not None:
                kwargs["membership"] = membership(group)
            elif nodes is not None:
                kwargs["nodes"] = nodes
            node = Node(
                transport,
                host,
                num_shards=count,
                node_id=node_id,
                seed=seed,
                prefix=group_prefix,
                metrics=metrics,
                tracing=tracing,
                **kwargs,
            )
            node_id = node.node_id  # one id for every group's node
            host.node_id = node.node_id
            node.add_listener(self._forward(group))
            self.nodes[group], self.hosts[group] = node, host
            if persist is not None:
                self._consumers[group] = serve_persisted(node, persist)
            self.clients[group] = Client(
                transport,
                num_shards=count,
                seed=seed,
                prefix=group_prefix,
                timeout=timeout,
                retry=retry,
                metrics=metrics,
                tracing=tracing,
            )
        self.node_id: str = self.nodes[DEFAULT_GROUP].node_id

    # -- lifecycle ----------------------------------------------------------------

    async def start(self) -> None:
        """Start serving every group (return once the shards are served)."""
        if self._state is not _State.CREATED:
            raise LifecycleError(f"runner {self.node_id} is {self._state.value}; start it once")
        self._state = _State.RUNNING
        try:
            await asyncio.gather(*(node.start() for node in self.nodes.values()))
            ids = node_snowflake(self.nodes[DEFAULT_GROUP])
            self._snowflake = await self._resources.enter_async_context(ids)
        except BaseException:
            await self.shutdown()
            raise

    async def shutdown(self) -> None:
        """Stop every group's node (passivating entities, stopping singletons) and
        close the clients. Idempotent."""
        if self._state is _State.STOPPED:
            return
        self._state = _State.STOPPED
        self._snowflake = None
        await self._resources.aclose()
        await asyncio.gather(*(node.stop() for node in self.nodes.values()))
        for client in self.clients.values():
            await client.close()
        self._events.close()

    def snowflake(self) -> int:
        """A new 64-bit id, unique in the cluster and time-ordered (docs/ids.md).

        Raises :class:`~clstr.LifecycleError` before :meth:`start` and after
        :meth:`shutdown`, :class:`~clstr.IdUnavailableError` when none can be
        issued right now (the machine id's lease lapsed, say).
        """
        if self._snowflake is None:
            raise LifecycleError(f"runner {self.node_id} is not running; ids come after start()")
        return self._snowflake.next_id()

    def is_shutdown(self) -> bool:
        """Whether :meth:`shutdown` was called."""
        return self._state is _State.STOPPED

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.shutdown()

    # -- placement ----------------------------------------------------------------

    def get_shard_id(self, entity_type: type[Entity[Any]] | str, entity_id: str) -> ShardId:
        """The shard of an entity (its group's shard of the key ``<type>/<id>``)."""
        name, group = self._type_and_group(entity_type)
        return ShardId(group, self._mapper(group).shard(entity_key(name, entity_id)))

    def has_shard_id(self, shard_id: ShardId) -> bool:
        """Whether this node serves ``shard_id`` now."""
        node = self.nodes.get(shard_id.group)
        return node is not None and shard_id.shard in node.shards

    # -- entities -------------------------------------------------------------------

    def register_entity(self, entity_cls: type[Entity[Any]]) -> None:
        """Serve ``entity_cls`` on its shard group's node (before or after start).

        Raises :class:`~clstr.ConfigurationError` for a group this runner does not
        serve, a name registered twice, or a class that is not an entity.
        """
        spec = spec_of(entity_cls)
        host = self.hosts.get(spec.shard_group)
        if host is None:
            raise ConfigurationError(
                f"entity type {spec.type_name} is in shard group {spec.shard_group!r}, "
                f"which this runner does not serve (groups: {sorted(self.hosts)})"
            )
        host.register(entity_cls)
        self._events.publish(EntityRegistered(spec.type_name))

    def register_entity_family(
        self,
        prefix: str,
        factory: Callable[[str], type[Entity[Any]]],
        *,
        shard_group: str = DEFAULT_GROUP,
    ) -> None:
        """Serve every entity type whose name starts with ``prefix``, made by
        ``factory(type_name)`` on the first message for it (one counter type per
        namespace, say: clstr.counters). Each type made is announced as an
        :class:`EntityRegistered` event. Raises :class:`~clstr.ConfigurationError`
        for a group this runner does not serve or a prefix registered twice."""
        host = self.hosts.get(shard_group)
        if host is None:
            raise ConfigurationError(f"no shard group {shard_group!r} on this runner")

        def made(type_name: str) -> type[Entity[Any]]:
            cls = factory(type_name)
            self._events.publish(EntityRegistered(type_name))
            return cls

        host.register_family(prefix, made)

    def make_client(self, entity_type: type[Entity[Any]] | str) -> EntityClient:
        """A client for the entities of ``entity_type``: ``make_client(Cart)("cart-42")``."""
        name, group = self._type_and_group(entity_type)
        return EntityClient(self.clients[group], name)

    def entity(self, entity_type: type[Entity[Any]] | str, entity_id: str) -> ScopedClient:
        """A client bound to one entity (``make_client(entity_type)(entity_id)``)."""
        return self.make_client(entity_type)(entity_id)

    def active_entity_count(self, entity_type: type[Entity[Any]] | str | None = None) -> int:
        """Live entity instances on this node, of ``entity_type`` or of every type."""
        if entity_type is None:
            return sum(host.active_count() for host in self.hosts.values())
        name, group = self._type_and_group(entity_type)
        return self.hosts[group].active_count(name)

    # -- singletons -------------------------------------------------------------------

    def register_singleton(
        self,
        name: str,
        run: Singleton,
        *,
        shard_group: str | None = None,
        grace: float = 5.0,
    ) -> None:
        """Run ``run(ctx)`` on exactly one live node of the cluster: the one that
        serves the shard of the key ``clstr.singleton/<name>`` in ``shard_group``.
        It starts again on another node when this one dies or leaves; ``run`` is
        called anew each time; ``ctx.stopping`` is set when it must end (its shard
        moves, the node is fenced or stops) and it is cancelled ``grace`` seconds
        later. Every runner registers the same singletons.
        """
        group = shard_group or DEFAULT_GROUP
        node = self.nodes.get(group)
        if node is None:
            raise ConfigurationError(f"no shard group {group!r} on this runner")
        if name in self._singletons:
            raise ConfigurationError(f"singleton {name!r} is already registered")
        shard = self._mapper(group).shard(entity_key(_SINGLETON_TYPE, name))
        self._singletons[name] = (group, shard)
        node.bind(f"singleton:{name}", run, shards=[shard], grace=grace)
        self._events.publish(SingletonRegistered(name))

    def singleton_shard(self, name: str) -> ShardId:
        """The shard a registered singleton runs with."""
        group, shard = self._singletons[name]
        return ShardId(group, shard)

    # -- messages -------------------------------------------------------------------

    @overload
    async def send(
        self,
        envelope: Envelope,
        *,
        group: str = ...,
        timeout: float | None = ...,
        persisted: Literal[False] = ...,
    ) -> bytes: ...

    @overload
    async def send(
        self,
        envelope: Envelope,
        *,
        group: str = ...,
        timeout: float | None = ...,
        persisted: Literal[True],
    ) -> str: ...

    async def send(
        self,
        envelope: Envelope,
        *,
        group: str = DEFAULT_GROUP,
        timeout: float | None = None,
        persisted: bool = False,
    ) -> bytes | str:
        """Send ``envelope`` to its shard (its key's, when it has a key) and
        return the reply's payload; the :class:`~clstr.RequestError` of a refusal.

        ``persisted=True``: write it to the stream of persisted messages instead
        and return its request id (the envelope's ``id``, else a snowflake) once
        stored; its reply is stored when its shard's owner has handled it (read
        it with :meth:`replies_for` or :meth:`await_reply`, from any process).
        """
        client = self.clients[group]
        shard = envelope.shard if envelope.key is None else client.shard_for(envelope.key)
        if persisted:
            return await self.persisted(group).send_raw(
                envelope.type,
                envelope.data,
                key=envelope.key,
                shard=shard,
                request_id=envelope.id,
                options=_header_options(envelope),
            )
        return await client.request_shard(
            shard,
            envelope.type,
            envelope.data,
            key=envelope.key,
            timeout=timeout,
            request_id=envelope.id,
            options=_header_options(envelope),
        )

    async def notify(self, envelope: Envelope, *, group: str = DEFAULT_GROUP) -> None:
        """Publish ``envelope`` to its shard: fire and forget."""
        client = self.clients[group]
        shard = envelope.shard if envelope.key is None else client.shard_for(envelope.key)
        await client.notify_shard(
            shard, envelope.type, envelope.data, key=envelope.key, options=_header_options(envelope)
        )

    async def interrupt(
        self,
        request_id: str,
        *,
        key: str | None = None,
        shard: int | None = None,
        group: str = DEFAULT_GROUP,
        timeout: float | None = None,
    ) -> int:
        """Interrupt the request sent with ``request_id`` to ``key``'s (or ``shard``'s)
        owner: see :meth:`clstr.Client.interrupt`. Returns how many were interrupted."""
        return await self.clients[group].interrupt(
            request_id, key=key, shard=shard, timeout=timeout
        )

    # -- persisted messages -------------------------------------------------------

    def persisted(self, group: str = DEFAULT_GROUP) -> PersistedClient:
        """The persisted-message client of ``group`` (typed ``send``, ``await_reply``
        with a reply type); its request ids are this runner's snowflakes."""
        found = self._persisted.get(group)
        if found is None:
            settings = self._persist or PersistSettings()
            found = PersistedClient(
                self.clients[group], settings=settings, ids=lambda: str(self.snowflake())
            )
            self._persisted[group] = found
        return found

    async def replies_for(self, request_id: str, *, group: str = DEFAULT_GROUP) -> list[bytes]:
        """The stored replies of a persisted message: ``[]`` while none is stored,
        else its reply's payload. Raises the :class:`~clstr.RequestError` of a
        stored error."""
        return await self.persisted(group).replies_for(request_id)

    async def await_reply(
        self, request_id: str, *, group: str = DEFAULT_GROUP, timeout: float | None = None
    ) -> bytes:
        """The reply payload of a persisted message: at once when it is stored, else
        when it is (a watch, no polling). Raises the :class:`~clstr.RequestError`
        of a stored error, :class:`~clstr.RequestTimeoutError` past ``timeout``."""
        return await self.persisted(group).await_reply(request_id, timeout=timeout)

    def poll_storage(self) -> None:
        """Have this runner's consumers read their shards' pending persisted
        messages now (see :meth:`clstr.persist.PersistedConsumers.poll`)."""
        for consumers in self._consumers.values():
            consumers.poll()

    # -- events -----------------------------------------------------------------------

    def registration_events(self) -> AsyncIterator[ShardingEvent]:
        """Registrations (replayed first), then shards acquired and released and
        singletons started and stopped on this node, until shutdown."""
        return self._events.subscribe()

    # -- internals ------------------------------------------------------------------

    def _mapper(self, group: str) -> ShardMapper:
        mapper = self._mappers.get(group)
        if mapper is None:
            raise ConfigurationError(f"no shard group {group!r} (groups: {sorted(self._mappers)})")
        return mapper

    def _type_and_group(self, entity_type: type[Entity[Any]] | str) -> tuple[str, str]:
        if isinstance(entity_type, str):
            for group, host in self.hosts.items():
                if entity_type in host.entity_types:
                    return entity_type, group
            return entity_type, DEFAULT_GROUP
        return entity_type_name(entity_type), spec_of(entity_type).shard_group

    def _forward(self, group: str) -> Callable[[NodeEvent], None]:
        def forward(event: NodeEvent) -> None:
            kind, shard = event.kind, event.shard
            if kind is NodeEventKind.SHARD_ACQUIRED and shard is not None:
                self._events.publish(ShardAcquired(group, shard))
            elif kind is NodeEventKind.SHARD_RELEASED and shard is not None:
                self._events.publish(ShardReleased(group, shard))
            elif event.name.startswith("singleton:"):
                name = event.name.removeprefix("singleton:")
                if kind is NodeEventKind.TASK_STARTED:
                    self._events.publish(SingletonStarted(name))
                elif kind is NodeEventKind.TASK_STOPPED:
                    self._events.publish(SingletonStopped(name))

        return forward


def _header_options(envelope: Envelope) -> tuple[EnvelopeOption, ...]:
    """Options that carry ``envelope``'s headers and time left over to the
    client's envelope."""
    options: list[EnvelopeOption] = []
    if envelope.headers:
        headers = dict(envelope.headers)
        options.append(lambda env: replace(env, headers=headers))
    remaining = envelope.remaining()
    if remaining is not None and remaining > 0:
        options.append(lambda env: env.with_ttl(remaining))
    return tuple(options)
