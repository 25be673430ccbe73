"""NATS service discovery (micro protocol v1), answered natively by a node.

Standard NATS tooling (``nats micro ls/info/stats``, nats-py's ``nats.micro``
and the other clients' service APIs) finds services by sending requests to
``$SRV.<VERB>``, ``$SRV.<VERB>.<name>`` and ``$SRV.<VERB>.<name>.<id>`` for
the verbs ``PING``, ``INFO`` and ``STATS``; every instance answers with a
JSON document of a published schema (``io.nats.micro.v1.*_response``).

clstr answers these itself instead of using ``nats.micro``, because a clstr
node's endpoints are its shards and they move: ``nats.micro`` cannot remove an
endpoint. Here every reply is computed from the node's state when the request
arrives, so INFO lists one endpoint per shard the node serves *now*
(``shard-<n>`` on ``<prefix>.shard.<n>``, queue group ``<prefix>``) and STATS
carries the node's live shard map in its ``data`` field.

Per-endpoint request counts come from :class:`ShardStats`, a wrapper around
the node's handler; without it the endpoints report zeros and only the
node-wide counters in ``data`` move::

    stats = ShardStats()
    node = Node(transport, stats.wrap(handler), num_shards=64, node_id="node-1")
    async with node, ServiceDiscovery(node, transport, shard_stats=stats):
        ...
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Final, Self

import nats.errors
import structlog
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription as NatsSubscription

from .._clock import monotonic
from ..envelope import Envelope
from ..errors import ConfigurationError, LifecycleError
from ..handlers import Handler, shard_released, start_handler, stop_handler
from ..node import Node
from ..protocol import shard_subject
from ..transports.nats import NatsTransport
from ._latency import LatencyHistogram

__all__ = [
    "DEFAULT_SERVICE_NAME",
    "VERBS",
    "INFO_RESPONSE_TYPE",
    "PING_RESPONSE_TYPE",
    "STATS_RESPONSE_TYPE",
    "ServiceDiscovery",
    "ShardStats",
    "EndpointCounters",
    "control_subject",
    "discover",
]

#: The service name clstr nodes announce unless told otherwise.
DEFAULT_SERVICE_NAME: Final = "clstr"
#: The discovery verbs, in the order the protocol lists them.
VERBS: Final = ("PING", "INFO", "STATS")
#: Subject root of the discovery protocol.
CONTROL_PREFIX: Final = "$SRV"

PING_RESPONSE_TYPE: Final = "io.nats.micro.v1.ping_response"
INFO_RESPONSE_TYPE: Final = "io.nats.micro.v1.info_response"
STATS_RESPONSE_TYPE: Final = "io.nats.micro.v1.stats_response"

# Service names, ids and endpoint names: what the micro schemas allow (and
# what keeps an id usable as one subject token).
_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
_SEMVER = re.compile(
    r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-((?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
    r"(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?$"
)

_log = structlog.get_logger("clstr.discovery")


def control_subject(verb: str, name: str | None = None, service_id: str | None = None) -> str:
    """The discovery subject of ``verb``: for all services, one name, or one instance."""
    if verb not in VERBS:
        raise ConfigurationError(f"unknown discovery verb {verb!r}; use one of {list(VERBS)}")
    if name is None:
        return f"{CONTROL_PREFIX}.{verb}"
    if service_id is None:
        return f"{CONTROL_PREFIX}.{verb}.{name}"
    return f"{CONTROL_PREFIX}.{verb}.{name}.{service_id}"


# -- per-shard counters --------------------------------------------------------


@dataclass(slots=True)
class EndpointCounters:
    """What one shard's handler did since the node started (times in nanoseconds)."""

    num_requests: int = 0
    num_errors: int = 0
    processing_time: int = 0
    last_error: str = ""

    @property
    def average_processing_time(self) -> int:
        """Mean handler time per request, in nanoseconds (0 before the first)."""
        return self.processing_time // self.num_requests if self.num_requests else 0


class ShardStats:
    """Per-shard handler counters, filled by the handler :meth:`wrap` returns.

    A request counts once its handler ends; an error is a handler that raised
    (an error reply on purpose, such as ``no_handler``, included). Messages
    the node refuses before any handler runs (expired, overloaded, malformed)
    are counted by the node itself (:class:`~clstr.NodeStats`), not here.

    :attr:`time_in_node` counts, for every message whose handler ran, the
    time from its arrival at the node (its TTL's start, so queue wait
    included) to the end of its handler; for a message without a TTL, whose
    arrival time the handler cannot know, the handler's own time.
    """

    def __init__(self) -> None:
        self._by_shard: dict[int, EndpointCounters] = {}
        #: Time in node of every handled message, in nanoseconds (published in
        #: STATS ``data.time_in_node``).
        self.time_in_node = LatencyHistogram()

    def counters(self, shard: int) -> EndpointCounters:
        """The counters of ``shard`` (zeros when it saw no request)."""
        return self._by_shard.get(shard) or EndpointCounters()

    def record(self, shard: int, elapsed_ns: int, error: str | None = None) -> None:
        """Count one handled request of ``shard``."""
        counters = self._by_shard.get(shard)
        if counters is None:
            counters = self._by_shard[shard] = EndpointCounters()
        counters.num_requests += 1
        counters.processing_time += elapsed_ns
        if error is not None:
            counters.num_errors += 1
            counters.last_error = error

    def wrap(self, handler: Handler) -> Handler:
        """``handler``, counted per shard. Its hooks (``on_start``, ``on_stop``,
        ``on_shard_released``) still run, and its ``message_types`` still show."""
        return _CountingHandler(handler, self)


class _CountingHandler:
    __slots__ = ("_handler", "_stats")

    def __init__(self, handler: Handler, stats: ShardStats) -> None:
        self._handler = handler
        self._stats = stats

    async def __call__(self, env: Envelope) -> bytes | None:
        started = time.perf_counter_ns()
        error: str | None = None
        try:
            return await self._handler(env)
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            elapsed = time.perf_counter_ns() - started
            stats = self._stats
            stats.record(env.shard, elapsed, error)
            # The node set the deadline to arrival + TTL, on this clock.
            ttl = env.ttl
            if ttl is not None and env.deadline is not None:
                elapsed = int((monotonic() - env.deadline + ttl) * 1e9)
            stats.time_in_node.record(elapsed)

    @property
    def message_types(self) -> list[str] | None:
        """The wrapped handler's message types when it lists them (a Router does),
        so that node info still names them."""
        types = getattr(self._handler, "message_types", None)
        return list(types) if isinstance(types, list | tuple) else None

    @property
    def entity_counts(self) -> dict[str, int] | None:
        """The wrapped handler's live entities per type, when it hosts entities."""
        counts = getattr(self._handler, "entity_counts", None)
        return dict(counts) if isinstance(counts, dict) else None

    async def on_start(self) -> None:
        await start_handler(self._handler)

    async def on_stop(self) -> None:
        await stop_handler(self._handler)

    async def on_shard_released(self, shard: int) -> None:
        await shard_released(self._handler, shard)


# -- the responder ---------------------------------------------------------------


def _rfc3339(timestamp: float) -> str:
    moment = datetime.fromtimestamp(timestamp, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%f") + "Z"


def _clstr_version() -> str:
    from .._version import __version__

    return __version__


def _check_name(what: str, value: str) -> str:
    if not isinstance(value, str) or not _NAME.match(value):
        raise ConfigurationError(
            f"{what} {value!r} is not valid for NATS service discovery: "
            "use letters, digits, '-' and '_' only"
        )
    return value


class ServiceDiscovery:
    """Answers ``$SRV.PING``, ``$SRV.INFO`` and ``$SRV.STATS`` for one node.

    ``name`` is the service name shared by the cluster's nodes (default
    ``"clstr"``); ``service_id`` identifies this instance and defaults to the
    node id; both must match ``^[A-Za-z0-9_-]+$`` (the id is one subject
    token). ``version`` defaults to clstr's version and must be semver.
    ``metadata`` is added to what clstr announces (``clstr.node_id``,
    ``clstr.prefix``, ``clstr.num_shards``). ``shard_stats`` gives the
    per-endpoint counters (see :class:`ShardStats`).

    Start it after the node (so the first INFO already lists the node's
    shards) and stop it before. Raises :class:`ConfigurationError` for a bad
    name, id, version or metadata.
    """

    def __init__(
        self,
        node: Node,
        transport: NatsTransport,
        *,
        name: str = DEFAULT_SERVICE_NAME,
        service_id: str | None = None,
        version: str | None = None,
        description: str = "",
        metadata: Mapping[str, str] | None = None,
        shard_stats: ShardStats | None = None,
    ) -> None:
        self.node = node
        self.transport = transport
        self.name = _check_name("service name", name)
        self.id = _check_name(
            "service id (the node id unless service_id is given)",
            node.node_id if service_id is None else service_id,
        )
        if version is None:
            version = _clstr_version()
        if not _SEMVER.match(version):
            raise ConfigurationError(f"service version {version!r} is not a semantic version")
        self.version = version
        self.description = description
        announced = {
            "clstr.node_id": node.node_id,
            "clstr.prefix": node.prefix,
            "clstr.num_shards": str(node.num_shards),
        }
        for key, value in (metadata or {}).items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise ConfigurationError("service metadata maps str to str")
            announced[key] = value
        self.metadata: dict[str, str] = announced
        self.shard_stats = shard_stats
        self._subs: list[NatsSubscription] = []
        self._started = False

    @property
    def subjects(self) -> list[str]:
        """The nine subjects this responder listens on."""
        return [
            control_subject(verb, name, service_id)
            for verb in VERBS
            for name, service_id in ((None, None), (self.name, None), (self.name, self.id))
        ]

    # -- replies (plain dicts, JSON-ready) ---------------------------------------

    def ping(self) -> dict[str, Any]:
        """The PING reply."""
        return {
            "type": PING_RESPONSE_TYPE,
            "name": self.name,
            "id": self.id,
            "version": self.version,
            "metadata": dict(self.metadata),
        }

    def info(self) -> dict[str, Any]:
        """The INFO reply: one endpoint per shard the node serves now."""
        prefix = self.node.prefix
        return {
            "type": INFO_RESPONSE_TYPE,
            "name": self.name,
            "id": self.id,
            "version": self.version,
            "description": self.description,
            "metadata": dict(self.metadata),
            "endpoints": [
                {
                    "name": f"shard-{shard}",
                    "subject": shard_subject(prefix, shard),
                    "queue_group": prefix,
                    "metadata": {"shard": str(shard)},
                }
                for shard in self.node.shards
            ],
        }

    def shard_map(self) -> dict[str, Any]:
        """The node's live view: its shards, queue and node-wide counters."""
        node = self.node
        stats = node.stats
        return {
            "node_id": node.node_id,
            "state": node.state.value,
            "prefix": node.prefix,
            "num_shards": node.num_shards,
            "shards": node.shards,
            "queued": node.queued,
            "running": node.running,
            "received": stats.received,
            "handled": stats.handled,
            "errors": stats.errors,
            "rejected": dict(stats.rejected),
            "uptime": round(time.time() - stats.started_at, 3) if stats.started_at else 0.0,
            **(
                {"time_in_node": self.shard_stats.time_in_node.to_json()}
                if self.shard_stats is not None
                else {}
            ),
            **_entities(node.handler),
        }

    def stats(self) -> dict[str, Any]:
        """The STATS reply: counters per shard endpoint, the shard map in ``data``.

        The schema puts ``data`` on endpoints; a node with no shard has no
        endpoint, so the map is also at the top level (the schema allows
        extra fields) where tools that read the whole document find it.
        """
        prefix = self.node.prefix
        shard_map = self.shard_map()
        endpoints = []
        for shard in self.node.shards:
            counters = (
                self.shard_stats.counters(shard)
                if self.shard_stats is not None
                else EndpointCounters()
            )
            endpoints.append(
                {
                    "name": f"shard-{shard}",
                    "subject": shard_subject(prefix, shard),
                    "queue_group": prefix,
                    "num_requests": counters.num_requests,
                    "num_errors": counters.num_errors,
                    "last_error": counters.last_error,
                    "processing_time": counters.processing_time,
                    "average_processing_time": counters.average_processing_time,
                    "data": {"shard": shard, "node_id": self.node.node_id},
                }
            )
        return {
            "type": STATS_RESPONSE_TYPE,
            "name": self.name,
            "id": self.id,
            "version": self.version,
            "metadata": dict(self.metadata),
            "started": _rfc3339(self.node.stats.started_at or time.time()),
            "endpoints": endpoints,
            "data": shard_map,
        }

    # -- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        """Subscribe to the discovery subjects; return once the server routes them.

        Raises :class:`LifecycleError` when already started.
        """
        if self._started:
            raise LifecycleError("service discovery is already started")
        self._started = True
        nc = self.transport.nc
        builders = {"PING": self.ping, "INFO": self.info, "STATS": self.stats}
        try:
            for verb in VERBS:
                callback = self._responder(builders[verb])
                for name, service_id in ((None, None), (self.name, None), (self.name, self.id)):
                    subject = control_subject(verb, name, service_id)
                    self._subs.append(await nc.subscribe(subject, cb=callback))
            await nc.flush()
        except BaseException:
            await self.stop()
            raise
        _log.debug("service discovery started", name=self.name, id=self.id)

    def _responder(self, build: Callable[[], dict[str, Any]]) -> Callable[[Msg], Awaitable[None]]:
        nc = self.transport.nc

        async def respond(msg: Msg) -> None:
            if not msg.reply:
                return
            try:
                await nc.publish(msg.reply, json.dumps(build()).encode())
            except nats.errors.Error as exc:
                _log.debug("cannot answer a discovery request", error=repr(exc))

        return respond

    async def stop(self) -> None:
        """Unsubscribe; idempotent. Returns once the server has taken the
        unsubscriptions in, so tools stop listing the node at once."""
        subs, self._subs = self._subs, []
        for sub in subs:
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()
        if subs and self.transport.nc.is_connected:
            with contextlib.suppress(nats.errors.Error):
                await self.transport.nc.flush()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()


# -- the asking side ---------------------------------------------------------------


async def discover(
    transport: NatsTransport,
    verb: str,
    name: str | None = DEFAULT_SERVICE_NAME,
    *,
    timeout: float = 1.0,
    quiet: float = 0.25,
    expected: int | None = None,
) -> list[dict[str, Any]]:
    """Ask every instance of service ``name`` (every service for ``None``) for ``verb``.

    Replies are gathered on an inbox until ``expected`` arrived, no reply came
    for ``quiet`` seconds after the last one, or ``timeout`` seconds passed.
    Replies that are not JSON objects are skipped. Returns them in arrival order.
    """
    nc = transport.nc
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    replies: list[dict[str, Any]] = []
    try:
        await nc.publish(control_subject(verb, name), b"", reply=inbox)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        wait = timeout
        while expected is None or len(replies) < expected:
            wait = min(wait, deadline - loop.time())
            if wait <= 0:
                break
            try:
                msg = await sub.next_msg(timeout=wait)
            except nats.errors.TimeoutError:
                break
            with contextlib.suppress(ValueError):
                body = json.loads(msg.data)
                if isinstance(body, dict):
                    replies.append(body)
            wait = quiet
    finally:
        with contextlib.suppress(nats.errors.Error):
            await sub.unsubscribe()
    return replies


def _entities(handler: object) -> dict[str, dict[str, int]]:
    """``{"entities": {type: live instances}}`` for a handler that hosts entities."""
    counts = getattr(handler, "entity_counts", None)
    return {"entities": dict(counts)} if isinstance(counts, dict) else {}
