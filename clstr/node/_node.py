"""The node: owns shards, runs their handler, stops gracefully.

:class:`Node` holds the settings, the lifecycle and the ownership surface a
membership uses (:class:`~clstr.node.ShardHost`: acquire, release, fence,
lease, handoff); the message path itself (intake, per-key lanes, workers,
replies) is its :class:`~clstr.node._intake.Intake` (arrival) and
:class:`~clstr.node._dispatch.Dispatcher` (queue, workers, replies).
"""

from __future__ import annotations

import asyncio
import functools
import time
import uuid
from collections.abc import Callable, Collection, Iterable, Mapping
from types import TracebackType
from typing import Final, Self

import structlog

from .._clock import monotonic
from ..codec import DEFAULT_LIMITS, Limits
from ..envelope import Envelope
from ..errors import ConfigurationError, LifecycleError, ShardOutOfRangeError
from ..handlers import Handler, shard_released, start_handler, stop_handler
from ..hashing import validate_num_shards
from ..metrics import NOOP_METRICS, Metrics
from ..protocol import DEFAULT_PREFIX, shard_subject
from ..tracing import NOOP_TRACING, NodeTracing, NoopTracing, Tracing
from ..transports.base import Subscription, Transport
from ._bound import BoundTasks, ShardContext, ShardTask
from ._dispatch import Dispatcher
from ._intake import Intake
from ._ownership import FixedShards, Membership, StaticMembership
from ._replies import ReplyCache, pack_handoff, unpack_handoff
from ._state import NodeEvent, NodeEventKind, NodeListener, NodeState, NodeStats
from ._watchdog import DEFAULT_STALL_THRESHOLD as DEFAULT_LOOP_STALL_THRESHOLD
from ._watchdog import LoopWatchdog

__all__ = ["Node"]

# Read per message: a module global is cheaper than the enum's class attribute.
_STOPPED: Final = NodeState.STOPPED


class Node:
    """A cluster member that serves a set of shards with one handler.

    Which shards: pass ``membership`` (e.g. :class:`~clstr.membership.KvMembership`
    for a dynamic cluster), or ``nodes`` (the static member list, this node
    included; shards by HRW), or ``shards`` (exactly these), or none of them to
    serve every shard. ``max_concurrency`` bounds handlers running at once;
    ``max_pending`` bounds messages waiting for a busy worker (past it the
    node answers ``overloaded``). ``stop_timeout`` bounds how long :meth:`stop`
    lets in-flight messages finish before it cancels them. ``clock_skew`` is
    how far the sender's clock may be off before a message whose age exceeds
    its TTL by more than that is dropped as stale. Replies to requests that
    carry an id are kept for ``reply_cache_ttl`` seconds (at most
    ``reply_cache_size`` of them), so a retried request gets the first reply
    and its effect is not applied twice. A handler that blocks the event
    loop for longer than ``loop_stall_threshold`` seconds is reported (a
    warning naming the handler, and a metric); ``None`` turns that off.
    With a ``tracing`` (:class:`~clstr.tracing.OpenTelemetryTracing`), each
    message gets spans that continue its sender's trace (docs/observability.md).
    """

    def __init__(
        self,
        transport: Transport,
        handler: Handler,
        *,
        num_shards: int,
        node_id: str | None = None,
        membership: Membership | None = None,
        nodes: Collection[str] | None = None,
        shards: Iterable[int] | None = None,
        weights: Mapping[str, float] | None = None,
        seed: str = "",
        prefix: str = DEFAULT_PREFIX,
        max_concurrency: int = 100,
        max_pending: int = 10_000,
        stop_timeout: float = 10.0,
        clock_skew: float = 30.0,
        reply_cache_size: int = 10_000,
        reply_cache_ttl: float = 60.0,
        limits: Limits = DEFAULT_LIMITS,
        metrics: Metrics = NOOP_METRICS,
        tracing: Tracing = NOOP_TRACING,
        wall_clock: Callable[[], float] = time.time,
        loop_stall_threshold: float | None = DEFAULT_LOOP_STALL_THRESHOLD,
    ) -> None:
        self.num_shards = validate_num_shards(num_shards)
        self.node_id = node_id or f"node-{uuid.uuid4().hex[:8]}"
        if max_concurrency < 1:
            raise ConfigurationError(f"max_concurrency must be >= 1, got {max_concurrency}")
        if max_pending < 0:
            raise ConfigurationError(f"max_pending must be >= 0, got {max_pending}")
        if reply_cache_size < 0 or not reply_cache_ttl > 0:
            raise ConfigurationError("reply_cache_size must be >= 0 and reply_cache_ttl > 0")
        if sum(x is not None for x in (membership, nodes, shards)) > 1:
            raise ConfigurationError("pass at most one of membership, nodes and shards")
        self.transport = transport
        self.handler = handler
        self.seed = seed
        self.prefix = prefix
        self.max_concurrency = max_concurrency
        self.max_pending = max_pending
        self.stop_timeout = stop_timeout
        self.clock_skew = clock_skew
        self.limits = limits
        self.traced = False
        self.metrics = metrics
        self.tracing = tracing
        self._wall_clock = wall_clock
        if membership is None:
            if nodes is not None:
                membership = StaticMembership(nodes, weights=weights)
                membership.wanted(self)  # fail now if this node is not in the list
            else:
                membership = FixedShards(shards)
                for s in membership.wanted(self):
                    if not 0 <= s < self.num_shards:
                        raise ShardOutOfRangeError(
                            f"shard {s} is out of range 0..{self.num_shards - 1}"
                        )
        self.membership = membership
        self._log = structlog.get_logger("clstr.node").bind(node_id=self.node_id)
        self.state = NodeState.CREATED
        self.stats = NodeStats()

        self._subs: dict[int, Subscription] = {}
        self._acquiring: set[int] = set()  # subscribed, not yet confirmed
        # Fencing: no handling while fenced, or past the lease (loop time).
        self._fenced: str | None = None
        self._lease_until: float | None = None
        self._lease_timer: asyncio.TimerHandle | None = None
        self._was_fenced = False
        self._listeners: list[NodeListener] = []
        self._bound = BoundTasks(self.node_id, self._emit)
        # Idempotency: replies by request id (they move with their shard).
        self._reply_cache = ReplyCache(reply_cache_size, reply_cache_ttl)
        self._dispatch = Dispatcher(self, self._reply_cache, log=self._log)
        self._intake = Intake(self, self._dispatch, wall_clock=wall_clock, log=self._log)
        # Blocking handlers: the loop's stalls are reported, naming the handler
        # that started last before the stall (it has returned by the report,
        # and one more may have started since: the last two are kept).
        self._watchdog = (
            None
            if loop_stall_threshold is None
            else LoopWatchdog(self._stalled, threshold=loop_stall_threshold)
        )

    # -- lifecycle ----------------------------------------------------------

    @property
    def metrics(self) -> Metrics:
        """Where the node reports (the no-op default skips the calls altogether)."""
        return self._metrics

    @metrics.setter
    def metrics(self, metrics: Metrics) -> None:
        self._metrics = metrics
        #: Whether :attr:`metrics` is a real sink (calls to the no-op one are skipped).
        self.metered = metrics is not NOOP_METRICS
        #: Whether messages get an arrival time (for metrics or spans).
        self.timed = self.metered or self.traced

    @property
    def tracing(self) -> Tracing:
        """Where the node reports spans (the no-op default is never called)."""
        return self._tracing

    @tracing.setter
    def tracing(self, tracing: Tracing) -> None:
        self._tracing = tracing
        #: Whether :attr:`tracing` is a real one (the no-op one is never called).
        self.traced = not isinstance(tracing, NoopTracing)
        #: This node's side of :attr:`tracing`.
        self.tracer: NodeTracing = tracing.for_node(self.node_id, self.prefix)
        self.timed = self.metered or self.traced

    @property
    def reply_cache_ttl(self) -> float:
        """Seconds a reply is kept for retries of its request id."""
        return self._reply_cache.ttl

    @property
    def shards(self) -> list[int]:
        """The shards this node serves now, sorted."""
        return sorted(self._subs)

    @property
    def queued(self) -> int:
        """Messages accepted and waiting for a worker."""
        return self._dispatch.queued

    @property
    def running(self) -> int:
        """Handlers running now."""
        return self._dispatch.running

    @property
    def fenced(self) -> bool:
        """Whether the node refuses to handle messages right now (see :meth:`fence`)."""
        return self._fenced is not None or (
            self._lease_until is not None and monotonic() >= self._lease_until
        )

    async def start(self) -> None:
        """Join the cluster and serve this node's shards; return once the server
        routes them to us.

        Raises :class:`LifecycleError` when called twice or after stop.
        """
        if self.state is not NodeState.CREATED:
            raise LifecycleError(f"node {self.node_id} is {self.state.value}; it starts only once")
        self.state = NodeState.RUNNING
        self._dispatch.loop = asyncio.get_running_loop()
        self.stats.started_at = self._wall_clock()
        if self._watchdog is not None:
            self._watchdog.start()
        try:
            await start_handler(self.handler)
            await self.membership.join(self)
        except BaseException:
            await self.stop()
            raise
        self._log.info("node started", shards=len(self._subs), num_shards=self.num_shards)

    async def acquire(self, shard: int, *, token: int = 0) -> None:
        """Start serving ``shard`` (subscribe with the cluster's queue group), under
        fencing ``token`` (given to its shard-bound tasks, see :meth:`bind`).

        Called by the membership; returns once the server routes the shard to us.
        """
        if shard in self._subs or shard in self._acquiring:
            return
        # The server may route messages before the subscription is confirmed:
        # they are ours already (the membership holds the shard).
        self._acquiring.add(shard)
        try:
            sub = await self.transport.subscribe(
                shard_subject(self.prefix, shard),
                functools.partial(self._intake.on_message, shard),
                queue=self.prefix,
            )
        finally:
            self._acquiring.discard(shard)
        self._subs[shard] = sub
        self.metrics.shards_owned(self.node_id, len(self._subs))
        if self.traced:
            self.tracer.event(NodeEventKind.SHARD_ACQUIRED.value, shard, {"clstr.token": token})
        self._emit(NodeEvent(NodeEventKind.SHARD_ACQUIRED, shard))
        self._bound.shard_up(shard, token)

    async def release(self, shard: int, *, timeout: float | None = None) -> None:
        """Stop taking ``shard``'s messages, let those already taken finish for up to
        ``timeout`` seconds (default ``stop_timeout``; 0 = not at all), then cancel
        what is left (callers get ``not_owner``). Called by the membership.
        """
        sub = self._subs.get(shard)
        if self.traced and sub is not None:
            in_flight = self._dispatch.load(shard)
            self.tracer.event("shard_releasing", shard, {"clstr.in_flight": in_flight})
        if sub is not None:
            # Served until drained: what the server sends meanwhile is handled.
            await sub.drain()
            self._subs.pop(shard, None)
            self.metrics.shards_owned(self.node_id, len(self._subs))
        bound = self.stop_timeout if timeout is None else timeout
        if self._dispatch.busy(shard):
            try:
                async with asyncio.timeout(bound):
                    await self._dispatch.wait_idle(shard)
            except TimeoutError:
                self._log.warning("handoff timeout: cancelling", shard=shard)
                await self._dispatch.evict(
                    lambda s: s == shard, f"shard {shard} moved away from {self.node_id}"
                )
        await self._bound.shard_down(shard)
        if sub is not None and self.state is NodeState.RUNNING:
            # A handoff (on stop, on_stop cleans up everything at once).
            await shard_released(self.handler, shard)
        if sub is not None:
            self._emit(NodeEvent(NodeEventKind.SHARD_RELEASED, shard))

    def handoff_state(self, shard: int) -> bytes | None:
        """What the next owner of ``shard`` needs to answer retries as this node
        would: the recent replies of its requests (msgpack), or ``None`` when
        there are none. Memberships call it after :meth:`release` and pass the
        bytes to the next owner's :meth:`restore_handoff`, so that a request
        retried across a shard move gets its first reply instead of running
        again. At most about the transport's ``max_payload``: the newest
        replies go first.
        """
        return pack_handoff(self._reply_cache, shard, max(self.transport.max_payload - 4096, 0))

    def restore_handoff(self, shard: int, data: bytes) -> int:
        """Take over the replies :meth:`handoff_state` exported for ``shard`` (call
        before serving it); return how many were taken. Malformed data is
        logged and ignored: a handoff never stops a node from serving."""
        try:
            return unpack_handoff(self._reply_cache, shard, data)
        except Exception as exc:
            self._log.warning("ignoring malformed handoff state", shard=shard, error=repr(exc))
            return 0

    def fence(self, reason: str) -> None:
        """Stop handling at once: cancel running handlers, refuse queued and new
        messages with ``not_owner`` until :meth:`unfence`. Used by memberships
        when the node may no longer own its shards (connection or heartbeat lost).
        """
        if self._fenced is None:
            self._log.warning("fenced", reason=reason)
        self._fenced = reason
        self._dispatch.evict_soon(lambda s: True, f"node {self.node_id} is fenced: {reason}")
        self._fence_changed()

    def unfence(self) -> None:
        """Resume handling after :meth:`fence`."""
        if self._fenced is not None:
            self._log.info("unfenced")
        self._fenced = None
        self._fence_changed()

    def set_lease(self, until: float | None) -> None:
        """Handle messages only until ``until`` (loop time), or always (``None``).

        A membership renews the lease with each heartbeat; when it runs out
        the node fences itself until the lease is renewed.
        """
        self._lease_until = until
        if self._lease_timer is not None:
            self._lease_timer.cancel()
            self._lease_timer = None
        if until is not None:
            self._lease_timer = asyncio.get_running_loop().call_at(until, self._lease_expired)
        self._fence_changed()

    def _lease_expired(self) -> None:
        self._lease_timer = None
        if self._lease_until is not None and monotonic() >= self._lease_until:
            self._log.warning("lease expired: not handling until renewed")
            self._dispatch.evict_soon(lambda s: True, f"node {self.node_id}'s lease expired")
        self._fence_changed()

    def _fence_changed(self) -> None:
        """Stop the shard-bound tasks when the node becomes fenced (explicitly or by
        its lease), start them again when it no longer is."""
        fenced = self.fenced
        if fenced == self._was_fenced or self.state is not NodeState.RUNNING:
            return
        self._was_fenced = fenced
        if fenced:
            self._bound.pause()
            self._emit(NodeEvent(NodeEventKind.FENCED, reason=self._fenced or "lease expired"))
        else:
            self._bound.resume()
            self._emit(NodeEvent(NodeEventKind.UNFENCED))

    # -- shard-bound tasks and events -----------------------------------------

    def bind(
        self,
        name: str,
        run: ShardTask,
        *,
        shards: Iterable[int] | None = None,
        grace: float = 5.0,
    ) -> None:
        """Run ``run(ctx)`` for each of ``shards`` (``None``: every shard) while this
        node serves it and is not fenced: at most one node runs a shard's task at
        a time, under the same ownership, lease and fencing as its messages (see
        :mod:`clstr.node._bound`). ``ctx.stopping`` is set when it must end; it is
        cancelled ``grace`` seconds later. A task that returns or fails while its
        shard is still served is started again after a pause.

        Raises :class:`~clstr.ConfigurationError` for a name already bound.
        """
        self._bound.bind(name, run, shards=shards, grace=grace)

    async def unbind(self, name: str) -> None:
        """Stop the tasks of binding ``name`` and forget it."""
        await self._bound.unbind(name)

    @property
    def bound_tasks(self) -> list[ShardContext]:
        """The shard-bound tasks running on this node now."""
        return self._bound.running()

    def add_listener(self, listener: NodeListener) -> None:
        """Call ``listener`` for every :class:`~clstr.node.NodeEvent` of this node."""
        self._listeners.append(listener)

    def remove_listener(self, listener: NodeListener) -> None:
        """Stop calling ``listener``."""
        if listener in self._listeners:
            self._listeners.remove(listener)

    def _emit(self, event: NodeEvent) -> None:
        if self.traced and event.kind is not NodeEventKind.SHARD_ACQUIRED:
            # (Acquired: reported by acquire, with its fencing token.)
            attributes = {"clstr.task": event.name} if event.name else {}
            if event.reason:
                attributes["clstr.reason"] = event.reason
            self.tracer.event(event.kind.value, event.shard, attributes)
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:
                self._log.exception("node listener failed", kind=event.kind.value)

    async def stop(self, timeout: float | None = None) -> None:
        """Stop gracefully: take no new messages, let queued and running ones
        finish for up to ``timeout`` seconds (default ``stop_timeout``), then
        cancel what is left (callers get ``not_owner``, which is retryable),
        and leave the cluster. Idempotent.
        """
        if self.state in (NodeState.STOPPING, NodeState.STOPPED):
            return
        self.state = NodeState.STOPPING
        bound = self.stop_timeout if timeout is None else timeout
        try:
            async with asyncio.timeout(bound):
                await self.membership.leave()
                await self._dispatch.wait_quiet()
        except TimeoutError:
            self._log.warning(
                "stop timeout: cancelling in-flight handlers",
                running=self.running,
                queued=self.queued,
            )
        # Whatever membership did (its leave may have been cut short), none of
        # its tasks and no subscription may outlive the node.
        await self.membership.close()
        for shard in list(self._subs):
            await self.release(shard, timeout=0)
        await self._dispatch.close(f"node {self.node_id} stopped")
        await self._bound.close()
        if self._lease_timer is not None:
            self._lease_timer.cancel()
        if self._watchdog is not None:
            self._watchdog.stop()
        await stop_handler(self.handler)
        self.state = NodeState.STOPPED
        self._log.info("node stopped")

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

    # -- reports ------------------------------------------------------------

    def _stalled(self, duration: float) -> None:
        """The event loop was blocked for ``duration`` seconds (see LoopWatchdog)."""
        began = time.perf_counter() - duration
        culprit: Envelope | None = None
        for entry in (self._dispatch.last_started, self._dispatch.before_last):
            if entry is not None and entry[1] <= began:
                culprit = entry[0]
                break
        self._log.warning(
            "event loop blocked: a handler did blocking work (run it with asyncio.to_thread)",
            blocked_for=round(duration, 3),
            last_handler=None if culprit is None else {"type": culprit.type, "key": culprit.key},
            running=self.running,
        )
        self.metrics.loop_stalled(self.node_id, duration)

    def serving(self, shard: int) -> bool:
        """Whether a message of ``shard`` may be taken now: the node runs, is not
        fenced, and serves the shard (or is subscribing to it)."""
        lease = self._lease_until
        return (
            (shard in self._subs or shard in self._acquiring)
            # (not self.fenced, inlined: this runs per message)
            and self._fenced is None
            and (lease is None or monotonic() < lease)
            and self.state is not _STOPPED
        )

    @property
    def accepting(self) -> bool:
        """Whether workers may still be started (not once stopped)."""
        return self.state is not _STOPPED

    def fence_reason(self, shard: int) -> str:
        """Why a message of ``shard`` is refused with ``not_owner`` (for its reply)."""
        if self._fenced is None and not self.fenced:
            return f"node {self.node_id} does not serve shard {shard} (any more); retry"
        reason = self._fenced or "its lease expired"
        return f"node {self.node_id} is not handling messages ({reason}); retry"
