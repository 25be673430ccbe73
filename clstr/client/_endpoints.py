"""One endpoint of an :class:`~clstr.client.EdgeClient`: its settings and
reports, and its life (connect, probe, notice a dropped connection)."""

from __future__ import annotations

import asyncio
import contextlib
import random
import statistics
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Final

from ..codec import Limits
from ..errors import ConfigurationError, NoShardOwnerError, RequestError, TransportError
from ..metrics import Metrics
from ..protocol import NODE_INFO_TYPE
from ..transports.base import ConnectionEvent
from ._client import Client
from ._retry import RetryPolicy

if TYPE_CHECKING:
    from ..transports.nats import NatsOptions, NatsTransport

__all__ = ["EdgeHealth", "EdgeSettings", "EdgeStatus", "Endpoint", "EndpointLink", "Routing"]

# Shards a probe tries when the first ones have no owner.
_PROBE_SHARDS: Final = 3


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One cluster: the URLs of its NATS servers, and a name for reports."""

    urls: tuple[str, ...]
    name: str = ""

    @classmethod
    def of(cls, spec: Endpoint | str | Sequence[str], index: int = 0) -> Endpoint:
        """An endpoint from a URL, a comma-separated list of URLs, or a list of
        URLs (named after its first URL's host and port unless given a name)."""
        if isinstance(spec, Endpoint):
            endpoint = spec
        else:
            parts = spec.split(",") if isinstance(spec, str) else list(spec)
            endpoint = cls(tuple(u.strip() for u in parts if u.strip()))
        if not endpoint.urls:
            raise ConfigurationError(f"endpoint {index} has no NATS URL")
        if not endpoint.name:
            endpoint = replace(endpoint, name=endpoint.urls[0].rpartition("/")[2] or str(index))
        return endpoint


@dataclass(frozen=True, slots=True, kw_only=True)
class EdgeSettings:
    """Timing of an :class:`~clstr.client.EdgeClient` (seconds).

    Raises :class:`~clstr.ConfigurationError` for values that cannot work.
    """

    probe_interval: float = 5.0
    probe_timeout: float = 1.0
    #: The first attempt's share of a call's time (default: half of it).
    attempt_timeout: float | None = None
    #: Another endpoint takes over when faster by more than this fraction.
    switch_margin: float = 0.3
    #: Probes whose median is an endpoint's latency.
    samples: int = 5
    #: How long a connection attempt may take before the endpoint counts as down.
    connect_timeout: float = 2.0

    def __post_init__(self) -> None:
        for name in ("probe_interval", "probe_timeout", "connect_timeout"):
            if not getattr(self, name) > 0:
                raise ConfigurationError(f"{name} must be > 0 seconds, got {getattr(self, name)}")
        if self.attempt_timeout is not None and not self.attempt_timeout > 0:
            raise ConfigurationError(f"attempt_timeout must be > 0, got {self.attempt_timeout}")
        if not 0 <= self.switch_margin < 1 or self.samples < 1:
            raise ConfigurationError("switch_margin must be in [0, 1) and samples >= 1")


@dataclass(frozen=True, slots=True)
class EdgeStatus:
    """One endpoint as the client sees it now."""

    name: str
    urls: list[str]
    #: Connected, and its last probe (or request) succeeded.
    healthy: bool
    #: Requests go here now.
    active: bool
    connected: bool
    #: Median round trip of its recent probes, in ms (``None``: never answered).
    latency_ms: float | None
    #: What went wrong last ("" while healthy).
    error: str
    probes: int
    failures: int
    #: Requests that failed over from this endpoint to another.
    failovers: int


@dataclass(frozen=True, slots=True)
class EdgeHealth:
    """The client's endpoints at a glance: ``ok`` when one is healthy and active."""

    ok: bool
    active: str | None
    healthy: int
    total: int
    edges: list[EdgeStatus]


@dataclass(frozen=True, slots=True)
class Routing:
    """What every endpoint's clients are built with (the edge client's settings)."""

    num_shards: int
    seed: str
    prefix: str
    timeout: float
    retry: RetryPolicy | None
    limits: Limits
    metrics: Metrics
    nats_options: NatsOptions | None
    settings: EdgeSettings


class EndpointLink:
    """The edge client's side of one endpoint: its connection, its clients (one
    for requests, one without retries for probes), what its probes measured,
    and whether it is healthy. :meth:`run` is its life, owned by the client."""

    def __init__(self, endpoint: Endpoint, routing: Routing, changed: Callable[[], None]) -> None:
        self.endpoint = endpoint
        self._routing = routing
        self._changed = changed  # tell the client: health or latency moved
        self.transport: NatsTransport | None = None
        self.client: Client | None = None
        self._prober: Client | None = None
        self.samples: deque[float] = deque(maxlen=routing.settings.samples)
        self.healthy = False
        self.checked = asyncio.Event()  # its first connection attempt and probe are done
        self.waiting: set[asyncio.Task[object]] = set()  # tasks with a request here
        self.dropped: set[asyncio.Task[object]] = set()  # ... cancelled as it dropped
        self.wake = asyncio.Event()  # probe now
        self.error = "not probed yet"
        self.probes = self.failures = self.failovers = 0
        self.task: asyncio.Task[None] | None = None

    @property
    def name(self) -> str:
        return self.endpoint.name

    @property
    def latency(self) -> float:
        """Median probe round trip in seconds (infinite before the first answer)."""
        return statistics.median(self.samples) if self.samples else float("inf")

    @property
    def connected(self) -> bool:
        return self.transport is not None and self.transport.nc.is_connected

    def status(self, active: bool) -> EdgeStatus:
        return EdgeStatus(
            name=self.name,
            urls=list(self.endpoint.urls),
            healthy=self.healthy,
            active=active,
            connected=self.connected,
            latency_ms=None if not self.samples else round(self.latency * 1000, 3),
            error=self.error,
            probes=self.probes,
            failures=self.failures,
            failovers=self.failovers,
        )

    def suspect(self, exc: BaseException) -> None:
        """A request failed here: unhealthy until a probe says otherwise."""
        self.healthy = False
        self.error = f"{type(exc).__name__}: {exc}"
        self.failures += 1
        self.wake.set()

    async def run(self) -> None:
        """Connect (again and again while it fails), then probe every
        ``probe_interval`` or when woken."""
        interval = self._routing.settings.probe_interval
        while True:
            if self.transport is not None and self.transport.nc.is_closed:
                await self.close()  # nats-py gave up: a new connection next
            if self.transport is None:
                await self._connect()
            if self.client is not None:
                await self.probe()
            self.checked.set()
            self._changed()
            self.wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await self.wake.wait()

    async def probe(self) -> None:
        """One round trip to a node of the endpoint (node info on a random shard)."""
        prober = self._prober
        if prober is None or not self.connected:
            self.healthy = False
            self.error = self.error if self.error.startswith("connection") else "not connected"
            return
        self.probes += 1
        error: BaseException | None = None
        shards = self._routing.num_shards
        for shard in random.sample(range(shards), min(_PROBE_SHARDS, shards)):
            started = time.perf_counter()
            try:
                await prober.request_shard(shard, NODE_INFO_TYPE, b"")
            except (RequestError, TransportError) as exc:
                error = exc
                if isinstance(exc, NoShardOwnerError):
                    continue  # that shard has no owner now: try another
                break
            self.samples.append(time.perf_counter() - started)
            self.healthy, self.error = True, ""
            return
        self.healthy = False
        self.error = f"probe failed: {type(error).__name__}: {error}"
        self.failures += 1

    async def close(self) -> None:
        """Close the connection (the link may connect again)."""
        transport, self.transport, self.client, self._prober = self.transport, None, None, None
        if transport is not None:
            with contextlib.suppress(Exception):
                await transport.close()

    async def _connect(self) -> None:
        from ..errors import ConnectionFailedError
        from ..transports.nats import NatsOptions, NatsTransport

        routing = self._routing
        base = routing.nats_options or NatsOptions()
        options = replace(
            base,
            name=base.name or f"clstr-edge-{self.name}",
            connect_deadline=routing.settings.connect_timeout,
        )
        try:
            transport = await NatsTransport.connect(list(self.endpoint.urls), options)
        except ConnectionFailedError as exc:
            self.healthy, self.error = False, f"cannot connect: {exc}"
            self.failures += 1
            return
        self.transport = transport
        self.client = Client(
            transport,
            num_shards=routing.num_shards,
            seed=routing.seed,
            prefix=routing.prefix,
            timeout=routing.timeout,
            retry=routing.retry,
            limits=routing.limits,
            metrics=routing.metrics,
            interrupt_on_cancel=False,
        )
        self._prober = Client(
            transport,
            num_shards=routing.num_shards,
            seed=routing.seed,
            prefix=routing.prefix,
            timeout=routing.settings.probe_timeout,
            limits=routing.limits,
            interrupt_on_cancel=False,
        )
        transport.add_listener(self._on_connection)

    def _on_connection(self, event: ConnectionEvent) -> None:
        if event is not ConnectionEvent.RECONNECTED:
            # Disconnected or closed: in-flight requests here give up now.
            self.healthy, self.error = False, f"connection {event.value}"
            for task in self.waiting - self.dropped:
                self.dropped.add(task)
                task.cancel()
            self._changed()
        self.wake.set()
