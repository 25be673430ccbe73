"""Edges: one client over several clusters (regions), the closest healthy one first.

An *endpoint* is one cluster the client can reach: the NATS URLs of its
servers. Clusters that serve the same application (their nodes sharing one
durable store, say: docs/ledger.md) all answer the same requests; what differs
is how far away each is and whether it is up. :class:`EdgeClient`:

* on first use connects to every endpoint at once and probes each with a round
  trip to a node (``clstr.node.info`` on a random shard), waiting at most
  ``probe_timeout`` for the answers, and sends to the healthy one with the
  lowest latency (the median of its last probes);
* sticks to it: another endpoint takes over only when it is faster by more than
  ``switch_margin`` (and 0.5 ms), or when this one stops being healthy;
* probes every endpoint again every ``probe_interval`` in the background, and
  at once one whose connection drops or whose request failed;
* on a transient failure (no owner, overloaded, expired before it ran, no reply
  in time, the connection lost mid-request) fails over **once** to the next
  best healthy endpoint, with the **same request id**: the request is the same
  request there, so a first attempt that partly landed (its effect stored, its
  reply lost) collapses into one outcome wherever the id is checked against
  shared state (the node's reply cache does not travel between clusters; an
  entity's stored replies and an application's own nonces do).

The first attempt gets ``attempt_timeout`` (default half the call's timeout) so
that the failover has time left; within an endpoint, the ``retry`` policy
applies as in :class:`~clstr.Client`. An ``EdgeClient`` is a sender like a
``Client``: ``edge.key(k).call(...)``, ``edge.entity(Cart, "c1").call(...)``.
It does not interrupt a handler when the caller's task is cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
from collections.abc import AsyncGenerator, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Final, Self

import structlog

from .._clock import monotonic
from .._tasks import cancel_and_wait
from ..codec import DEFAULT_LIMITS, Limits
from ..envelope import EnvelopeOption
from ..errors import (
    ConfigurationError,
    EnvelopeExpiredError,
    LifecycleError,
    MissingKeyError,
    NoShardOwnerError,
    OverloadedError,
    RequestError,
    RequestTimeoutError,
    TransportClosedError,
    TransportError,
)
from ..hashing import ShardMapper
from ..metrics import NOOP_METRICS, Metrics
from ..protocol import DEFAULT_PREFIX, entity_key, entity_type_name
from ._client import DEFAULT_TIMEOUT, DEFAULT_WINDOW
from ._endpoints import EdgeHealth, EdgeSettings, EdgeStatus, Endpoint, EndpointLink, Routing
from ._retry import RetryPolicy
from ._scoped import ScopedClient

if TYPE_CHECKING:
    from ..transports.nats import NatsOptions

__all__ = ["EdgeClient", "EdgeHealth", "EdgeSettings", "EdgeStatus", "Endpoint"]

_log = structlog.get_logger("clstr.edges")

# A new endpoint must also be this much faster (seconds) to take over: local
# round trips differ by noise of this size.
_SWITCH_SLACK: Final = 0.0005
# A failover needs at least this long to have a chance.
_MIN_FAILOVER: Final = 0.01


class EdgeClient:
    """A client over several clusters that prefers the closest healthy one and
    fails over once (see the module docstring).

    ``endpoints``: each an :class:`Endpoint`, a URL, a comma-separated URL list
    or a list of URLs. ``num_shards``, ``seed`` and ``prefix`` must be the same
    in every cluster. ``timeout`` is a call's default deadline; ``retry`` the
    policy within one endpoint; ``nats_options`` the connection settings
    (credentials, TLS) of every endpoint. Start it with ``async with`` or
    :meth:`start` (the first call starts it otherwise); :meth:`close` ends the
    probes and the connections.
    """

    def __init__(
        self,
        endpoints: Sequence[Endpoint | str | Sequence[str]],
        *,
        num_shards: int,
        seed: str = "",
        prefix: str = DEFAULT_PREFIX,
        timeout: float = DEFAULT_TIMEOUT,
        retry: RetryPolicy | None = None,
        settings: EdgeSettings | None = None,
        nats_options: NatsOptions | None = None,
        limits: Limits = DEFAULT_LIMITS,
        metrics: Metrics = NOOP_METRICS,
    ) -> None:
        if not endpoints:
            raise ConfigurationError("an EdgeClient needs at least one endpoint")
        if not timeout > 0:
            raise ConfigurationError(f"timeout must be > 0 seconds, got {timeout!r}")
        self.settings = settings or EdgeSettings()
        given = [Endpoint.of(spec, i) for i, spec in enumerate(endpoints)]
        names = [e.name for e in given]
        if len(set(names)) != len(names):
            raise ConfigurationError(f"endpoint names must differ, got {names}")
        routing = Routing(
            num_shards, seed, prefix, timeout, retry, limits, metrics, nats_options, self.settings
        )
        self._edges = [EndpointLink(e, routing, self._choose) for e in given]
        self._mapper = ShardMapper(num_shards, seed)
        self.num_shards = num_shards
        self.seed = seed
        self.prefix = prefix
        self.timeout = timeout
        self.retry = retry
        self._active: EndpointLink | None = None
        self._changed = asyncio.Event()
        self._started = False
        self._closed = False
        self._id_prefix = os.urandom(12).hex() + "."
        self._ids = itertools.count(1)

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        """Connect to and probe every endpoint at once; return when all have
        answered or failed, or after ``probe_timeout`` (probes go on in the
        background). Starting twice does nothing."""
        if self._closed:
            raise LifecycleError("the EdgeClient is closed; create a new one")
        if self._started:
            return
        self._started = True
        for edge in self._edges:
            edge.task = asyncio.create_task(edge.run(), name=f"clstr-edge-{edge.name}")
        waits = [asyncio.ensure_future(edge.checked.wait()) for edge in self._edges]
        try:
            await asyncio.wait(waits, timeout=self.settings.probe_timeout)
        finally:
            await cancel_and_wait(waits)

    async def close(self) -> None:
        """Stop probing and close every connection. Idempotent."""
        if self._closed:
            return
        self._closed = True
        await cancel_and_wait([e.task for e in self._edges if e.task is not None], insist=True)
        for edge in self._edges:
            await edge.close()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- what the client sees ------------------------------------------------------------------

    @property
    def active(self) -> str | None:
        """The name of the endpoint requests go to now."""
        return self._active.name if self._active is not None else None

    def edges(self) -> list[EdgeStatus]:
        """Every endpoint's state, in the order given."""
        return [e.status(e is self._active) for e in self._edges]

    def health(self) -> EdgeHealth:
        """Whether requests have a healthy endpoint to go to, and the endpoints."""
        edges = self.edges()
        active = self._active
        return EdgeHealth(
            ok=active is not None and active.healthy,
            active=active.name if active is not None else None,
            healthy=sum(e.healthy for e in edges),
            total=len(edges),
            edges=edges,
        )

    async def probe(self) -> None:
        """Probe every connected endpoint now and wait for the answers."""
        await self._ensure_started()
        await asyncio.gather(*(e.probe() for e in self._edges if e.client is not None))
        self._choose()

    # -- sending -------------------------------------------------------------------------------

    def shard_for(self, key: str | bytes) -> int:
        """The shard ``key`` belongs to."""
        return self._mapper.shard(key)

    async def request_shard(
        self,
        shard: int,
        msg_type: str,
        data: bytes = b"",
        *,
        key: str | None = None,
        timeout: float | None = None,
        options: Sequence[EnvelopeOption] = (),
        request_id: str | None = None,
    ) -> bytes:
        """Send a request to ``shard`` on the active endpoint and return the reply's
        payload; on a transient failure, once more on the next best endpoint
        under the same request id (see the module docstring).

        Raises :class:`~clstr.NoShardOwnerError` when no endpoint is healthy
        within the deadline, and otherwise what :meth:`Client.request_shard` raises.
        """
        await self._ensure_started()
        if request_id is None:
            request_id = f"{self._id_prefix}{next(self._ids)}"
        budget = self.timeout if timeout is None else timeout
        if not budget > 0:
            raise ConfigurationError(f"timeout must be > 0 seconds, got {budget!r}")
        deadline = monotonic() + budget
        first = await self._pick(deadline)
        share = self.settings.attempt_timeout or budget / 2
        others = any(e.healthy and e is not first for e in self._edges)
        try:
            return await self._attempt(
                first,
                deadline,
                share if others else budget,
                shard,
                msg_type,
                data,
                key,
                options,
                request_id,
            )
        except (RequestError, TransportError) as exc:
            if not _transient(exc):
                raise
            first.suspect(exc)
            self._choose()
            second = self._best(exclude=first)
            if second is None or deadline - monotonic() < _MIN_FAILOVER:
                raise
            first.failovers += 1
            _log.warning(
                "request failed over",
                source=first.name,
                target=second.name,
                error=f"{type(exc).__name__}: {exc}",
                request_id=request_id,
            )
            return await self._attempt(
                second, deadline, budget, shard, msg_type, data, key, options, request_id
            )

    async def request_key(
        self,
        key: str,
        msg_type: str,
        data: bytes = b"",
        *,
        timeout: float | None = None,
        options: Sequence[EnvelopeOption] = (),
        request_id: str | None = None,
    ) -> bytes:
        """Send a request to the owner of ``key``; see :meth:`request_shard`."""
        return await self.request_shard(
            self._shard_of_key(key),
            msg_type,
            data,
            key=key,
            timeout=timeout,
            options=options,
            request_id=request_id,
        )

    async def notify_shard(
        self,
        shard: int,
        msg_type: str,
        data: bytes = b"",
        *,
        key: str | None = None,
        options: Sequence[EnvelopeOption] = (),
    ) -> None:
        """Publish to ``shard`` on the active endpoint: fire and forget."""
        await self._ensure_started()
        edge = await self._pick(monotonic() + self.timeout)
        assert edge.client is not None
        await edge.client.notify_shard(shard, msg_type, data, key=key, options=options)

    async def stream_shard(
        self,
        shard: int,
        msg_type: str,
        data: bytes = b"",
        *,
        key: str | None = None,
        window: int = DEFAULT_WINDOW,
        timeout: float | None = None,
        options: Sequence[EnvelopeOption] = (),
    ) -> AsyncGenerator[bytes, None]:
        """A streamed reply from the active endpoint (no failover mid-stream); see
        :meth:`Client.stream_shard`."""
        await self._ensure_started()
        edge = await self._pick(monotonic() + (timeout or self.timeout))
        assert edge.client is not None
        chunks = edge.client.stream_shard(
            shard, msg_type, data, key=key, window=window, timeout=timeout, options=options
        )
        async with contextlib.aclosing(chunks):
            async for chunk in chunks:
                yield chunk

    def key(self, key: str, *options: EnvelopeOption) -> ScopedClient:
        """A client bound to ``key``: every call goes to its owner, with the key."""
        return ScopedClient(self, self._shard_of_key(key), key, options)

    def entity(
        self, entity_type: type | str, entity_id: str, *options: EnvelopeOption
    ) -> ScopedClient:
        """A client bound to one entity (see :meth:`Client.entity`)."""
        name = entity_type if isinstance(entity_type, str) else entity_type_name(entity_type)
        return self.key(entity_key(name, entity_id), *options)

    def shard(self, shard: int, *options: EnvelopeOption) -> ScopedClient:
        """A client bound to ``shard`` (no key)."""
        return ScopedClient(self, shard, None, options)

    # -- internals -------------------------------------------------------------------------------

    def _shard_of_key(self, key: str) -> int:
        if not isinstance(key, str):
            raise TypeError(f"key must be str, got {type(key).__name__}")
        if not key:
            raise MissingKeyError("key must not be empty; every key-routed call needs a key")
        return self._mapper.shard(key)

    async def _ensure_started(self) -> None:
        if self._closed:
            raise TransportClosedError("the EdgeClient is closed; create a new one to send again")
        if not self._started:
            await self.start()

    async def _attempt(
        self,
        edge: EndpointLink,
        deadline: float,
        share: float,
        shard: int,
        msg_type: str,
        data: bytes,
        key: str | None,
        options: Sequence[EnvelopeOption],
        request_id: str,
    ) -> bytes:
        """One endpoint's try, given up early when its connection drops (the link
        cancels the tasks waiting on it: no task or waiter of its own per request)."""
        client = edge.client
        if client is None:
            raise TransportClosedError(f"endpoint {edge.name} is not connected")
        me = asyncio.current_task()
        assert me is not None
        edge.waiting.add(me)
        try:
            return await client.request_shard(
                shard,
                msg_type,
                data,
                key=key,
                timeout=max(min(share, deadline - monotonic()), 0.001),
                options=options,
                request_id=request_id,
            )
        except asyncio.CancelledError:
            # Cancelled by the link (and by nobody else): its connection dropped.
            if me in edge.dropped and me.uncancel() == 0:
                raise TransportError(
                    f"endpoint {edge.name} lost its connection during the request"
                ) from None
            raise
        finally:
            edge.waiting.discard(me)
            edge.dropped.discard(me)

    async def _pick(self, deadline: float) -> EndpointLink:
        """The active endpoint, waiting for one to be healthy until ``deadline``."""
        while True:
            active = self._active
            if active is not None and active.healthy:
                return active
            left = deadline - monotonic()
            if left <= 0:
                problems = "; ".join(f"{e.name}: {e.error}" for e in self._edges)
                raise NoShardOwnerError(f"no endpoint is healthy ({problems})")
            changed = self._changed
            try:
                async with asyncio.timeout(left):
                    await changed.wait()
            except TimeoutError:
                continue

    def _best(self, exclude: EndpointLink | None = None) -> EndpointLink | None:
        healthy = [e for e in self._edges if e.healthy and e is not exclude and e.client]
        return min(healthy, key=lambda e: e.latency, default=None)

    def _choose(self) -> None:
        """Keep the active endpoint unless it is unhealthy or clearly slower."""
        best = self._best()
        current = self._active
        if current is None or not current.healthy:
            self._active = best
        elif best is not None and best is not current:
            margin = current.latency * self.settings.switch_margin
            if best.latency < current.latency - max(margin, _SWITCH_SLACK):
                self._active = best
        if self._active is not current:
            _log.info(
                "active endpoint",
                endpoint=self.active,
                previous=current.name if current is not None else None,
            )
        self._pulse()

    def _pulse(self) -> None:
        """Wake whoever waits for a change (a new event for the next waiters)."""
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()


def _transient(exc: BaseException) -> bool:
    """Whether another cluster may well succeed where this one failed."""
    return isinstance(
        exc,
        NoShardOwnerError  # no owner, not owner (moving)
        | OverloadedError
        | EnvelopeExpiredError  # it waited too long there: it never ran
        | RequestTimeoutError  # no reply: the node or its connection is gone
        | TransportError,  # the connection dropped
    )
