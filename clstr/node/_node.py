"""The node: owns shards, takes their messages, runs the handler, replies.

Flow of one message: the transport hands bytes to :meth:`Node._on_message`
(synchronously, on its delivery path); the node decodes them, refuses what is
malformed, stale or over the queue bound, and files the rest into a lane. A
lane holds the queued messages of one key (a message without a key gets a
lane of its own); at most one worker serves a lane at a time, so one key's
messages run one at a time in arrival order, while up to
``max_concurrency`` workers serve different lanes at once. A worker takes
one message from a lane, runs the handler under the envelope's remaining
time, replies, and puts the lane back at the end of the ready queue if it
still has messages (fairness between keys). Workers exit as soon as no lane
is ready, so an idle node holds no worker task and no empty lane.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Final, Self

import msgpack
import structlog

from .._clock import Timeouts, monotonic
from .._tasks import cancel_and_wait
from ..codec import (
    DEFAULT_LIMITS,
    Limits,
    decode_request,
    encode_error_reply,
    encode_payload,
    encode_reply,
    error_reply_for,
)
from ..envelope import Envelope
from ..errors import (
    BadRequestError,
    ConfigurationError,
    EnvelopeExpiredError,
    HandlerTimeoutError,
    LifecycleError,
    NoHandlerError,
    NotOwnerError,
    OverloadedError,
    RemoteHandlerError,
    RequestError,
    ShardOutOfRangeError,
)
from ..handlers import Handler, shard_released, start_handler, stop_handler
from ..hashing import validate_num_shards
from ..metrics import NOOP_METRICS, Metrics
from ..protocol import DEFAULT_PREFIX, NODE_INFO_TYPE, NodeInfo
from ..protocol import shard_subject as shard_subject
from ..transports.base import Subscription, Transport
from ._ownership import FixedShards, Membership, StaticMembership
from ._watchdog import DEFAULT_STALL_THRESHOLD as DEFAULT_LOOP_STALL_THRESHOLD
from ._watchdog import LoopWatchdog

__all__ = ["Node", "NodeState", "NodeStats", "ReplyCache"]

# How long cancelled handlers get to end before stop (or a handoff) goes on
# without them: stop() returns within stop_timeout plus twice this.
_CANCEL_GRACE: Final = 1.0

# Message types are chosen by senders: past this many distinct ones, metrics
# label the rest "other", so that hostile senders cannot grow them without bound.
_MAX_TYPE_LABELS: Final = 256


@dataclass(slots=True)
class NodeStats:
    """Counters of one node since it started (for status and service discovery)."""

    started_at: float = 0.0
    received: int = 0
    handled: int = 0
    errors: int = 0
    processing_time: float = 0.0
    last_error: str = ""
    rejected: dict[str, int] = field(default_factory=dict)

    def reject(self, reason: str) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1


class NodeState(enum.Enum):
    """Lifecycle of a :class:`Node`."""

    CREATED = "created"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"


# A message, where to reply, and when it arrived (monotonic; 0.0 unmetered).
_Work = tuple[Envelope, "str | None", float]


class _Lane:
    __slots__ = ("items", "key", "shard")

    def __init__(self, shard: int, key: str | None) -> None:
        self.shard = shard
        self.key = key
        self.items: deque[_Work] = deque()


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
        self.metrics = metrics
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
        self._type_labels: set[str] = set()

        self._subs: dict[int, Subscription] = {}
        self._acquiring: set[int] = set()  # subscribed, not yet confirmed
        self._lanes: dict[tuple[int, str], _Lane] = {}
        self._ready: deque[_Lane] = deque()
        self._workers: set[asyncio.Task[None]] = set()
        self._spare: asyncio.Task[None] | None = None  # a worker that has not run yet
        self._current: dict[asyncio.Task[None], int] = {}  # worker -> shard it runs
        self._chores: set[asyncio.Task[None]] = set()  # evictions scheduled from callbacks
        self._evicting: list[Callable[[int], bool]] = []  # shards being evicted now
        self._load: dict[int, int] = {}  # shard -> messages queued or running
        self._idle_waiters: dict[int, list[asyncio.Future[None]]] = {}
        self._queued = 0
        self._running = 0
        # Since when messages are refused as overloaded (None: keeping up).
        self._behind_since: float | None = None
        # Set when nothing is queued or running, while stop() waits for that.
        self._quiet: asyncio.Future[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timeouts: Timeouts[asyncio.Task[None]] | None = None  # handler deadlines
        # Workers whose handler ran past its deadline and were cancelled for it.
        self._overdue: set[asyncio.Task[None]] = set()
        # Fencing: no handling while fenced, or past the lease (loop time).
        self._fenced: str | None = None
        self._lease_until: float | None = None
        self._lease_timer: asyncio.TimerHandle | None = None
        # Idempotency: replies by request id, and ids still in flight.
        self._reply_cache = ReplyCache(reply_cache_size, reply_cache_ttl)
        self._in_flight: dict[str, list[str]] = {}
        # Blocking handlers: the loop's stalls are reported, naming the handler
        # that started last before the stall (it has returned by the report,
        # and one more may have started since: the last two are kept).
        self._watchdog = (
            None
            if loop_stall_threshold is None
            else LoopWatchdog(self._stalled, threshold=loop_stall_threshold)
        )
        self._last_started: tuple[Envelope, float] | None = None
        self._before_last: tuple[Envelope, float] | None = None

    # -- lifecycle ----------------------------------------------------------

    @property
    def metrics(self) -> Metrics:
        """Where the node reports (the no-op default skips the calls altogether)."""
        return self._metrics

    @metrics.setter
    def metrics(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self._metered = metrics is not NOOP_METRICS

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
        return self._queued

    @property
    def running(self) -> int:
        """Handlers running now."""
        return self._running

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
        self._loop = asyncio.get_running_loop()
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

    async def acquire(self, shard: int) -> None:
        """Start serving ``shard`` (subscribe with the cluster's queue group).

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
                functools.partial(self._on_message, shard),
                queue=self.prefix,
            )
        finally:
            self._acquiring.discard(shard)
        self._subs[shard] = sub
        self.metrics.shards_owned(self.node_id, len(self._subs))

    async def release(self, shard: int, *, timeout: float | None = None) -> None:
        """Stop taking ``shard``'s messages, let those already taken finish for up to
        ``timeout`` seconds (default ``stop_timeout``; 0 = not at all), then cancel
        what is left (callers get ``not_owner``). Called by the membership.
        """
        sub = self._subs.get(shard)
        if sub is not None:
            # Served until drained: what the server sends meanwhile is handled.
            await sub.drain()
            self._subs.pop(shard, None)
            self.metrics.shards_owned(self.node_id, len(self._subs))
        bound = self.stop_timeout if timeout is None else timeout
        if self._load.get(shard):
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._idle_waiters.setdefault(shard, []).append(waiter)
            try:
                async with asyncio.timeout(bound):
                    await waiter
            except TimeoutError:
                self._log.warning("handoff timeout: cancelling", shard=shard)
                await self._evict(
                    lambda s: s == shard, f"shard {shard} moved away from {self.node_id}"
                )
        if sub is not None and self.state is NodeState.RUNNING:
            # A handoff (on stop, on_stop cleans up everything at once).
            await shard_released(self.handler, shard)

    def handoff_state(self, shard: int) -> bytes | None:
        """What the next owner of ``shard`` needs to answer retries as this node
        would: the recent replies of its requests (msgpack), or ``None`` when
        there are none. Memberships call it after :meth:`release` and pass the
        bytes to the next owner's :meth:`restore_handoff`, so that a request
        retried across a shard move gets its first reply instead of running
        again. At most about the transport's ``max_payload``: the newest
        replies go first.
        """
        budget = max(self.transport.max_payload - 4096, 0)
        replies = self._reply_cache.export(shard, budget)
        if not replies:
            return None
        packed: bytes = msgpack.packb(
            [[rid, max(1, int(left * 1000)), body] for rid, left, body in replies],
            use_bin_type=True,
        )
        return packed

    def restore_handoff(self, shard: int, data: bytes) -> int:
        """Take over the replies :meth:`handoff_state` exported for ``shard`` (call
        before serving it); return how many were taken. Malformed data is
        logged and ignored: a handoff never stops a node from serving."""
        try:
            items = msgpack.unpackb(data, raw=False, max_bin_len=len(data), max_str_len=1024)
            taken = 0
            for rid, ms_left, body in reversed(items):  # oldest first: newest end newest
                if not (
                    isinstance(rid, str) and isinstance(ms_left, int) and isinstance(body, bytes)
                ):
                    raise TypeError(f"bad entry types {type(rid)}, {type(ms_left)}, {type(body)}")
                if self._reply_cache.get(rid) is None:
                    self._reply_cache.put(rid, body, shard, ttl=ms_left / 1000)
                    taken += 1
        except Exception as exc:
            self._log.warning("ignoring malformed handoff state", shard=shard, error=repr(exc))
            return 0
        return taken

    def fence(self, reason: str) -> None:
        """Stop handling at once: cancel running handlers, refuse queued and new
        messages with ``not_owner`` until :meth:`unfence`. Used by memberships
        when the node may no longer own its shards (connection or heartbeat lost).
        """
        if self._fenced is None:
            self._log.warning("fenced", reason=reason)
        self._fenced = reason
        self._evict_soon(lambda s: True, f"node {self.node_id} is fenced: {reason}")

    def unfence(self) -> None:
        """Resume handling after :meth:`fence`."""
        if self._fenced is not None:
            self._log.info("unfenced")
        self._fenced = None

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

    def _lease_expired(self) -> None:
        self._lease_timer = None
        if self._lease_until is not None and monotonic() >= self._lease_until:
            self._log.warning("lease expired: not handling until renewed")
            self._evict_soon(lambda s: True, f"node {self.node_id}'s lease expired")

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
                if self._queued or self._running:
                    self._quiet = asyncio.get_running_loop().create_future()
                    await self._quiet
        except TimeoutError:
            self._log.warning(
                "stop timeout: cancelling in-flight handlers",
                running=self._running,
                queued=self._queued,
            )
        # Whatever membership did (its leave may have been cut short), none of
        # its tasks and no subscription may outlive the node.
        await self.membership.close()
        for shard in list(self._subs):
            await self.release(shard, timeout=0)
        await _cancel(list(self._chores))
        await self._evict(lambda s: True, f"node {self.node_id} stopped")
        await _cancel(list(self._workers))
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

    # -- intake (synchronous, on the transport's delivery path) ---------------

    def _on_message(self, shard: int, data: bytes, reply: str | None) -> None:
        try:
            env = decode_request(data, shard=shard, limits=self.limits)
        except BadRequestError as exc:
            self._rejected("bad_request")
            self._log.debug("bad request", shard=shard, error=str(exc))
            self._reply(reply, error_reply_for(exc))
            return
        # (Its deadline was just set from the TTL: only the sender's clock can
        # say that it is stale.)
        if env.ttl is not None and self._wall_clock() - env.created_at > env.ttl + self.clock_skew:
            # Only this copy's reply: a copy of the same id may be running.
            self._rejected("expired")
            self._reply(reply, self._expired_reply(env))
            return
        if env.type == NODE_INFO_TYPE:
            types = getattr(self.handler, "message_types", None)
            info = NodeInfo(
                node_id=self.node_id,
                shards=self.shards,
                message_types=list(types) if isinstance(types, list | tuple) else None,
            )
            self._reply(reply, encode_reply(encode_payload(info)))
            return
        if (
            self.fenced
            or (shard not in self._subs and shard not in self._acquiring)
            or self.state is NodeState.STOPPED
        ):
            # Fenced, or a late delivery for a shard it no longer serves.
            self._rejected("not_owner")
            self._reply(reply, error_reply_for(NotOwnerError(self._fence_reason(shard))))
            return
        request_id = env.id
        if request_id is not None:
            cached = self._reply_cache.get(request_id)
            if cached is not None:
                self.stats.reject("duplicate")
                self._reply(reply, cached)
                return
            waiting = self._in_flight.get(request_id)
            if waiting is not None:
                # A retry of a request still queued or running: answer both at once.
                if reply is not None:
                    waiting.append(reply)
                return
        if self._queued >= self.max_pending and self._full(env):
            self._overloaded(reply)
            return
        if request_id is not None:
            self._in_flight[request_id] = []
        self._enqueue(env, reply)

    def _full(self, env: Envelope) -> bool:
        """Whether taking ``env`` would leave more than ``max_pending`` messages
        waiting: queued ones that no idle worker is about to start (a queued
        message of a busy key waits; the first of a new key may start at once)."""
        ready = len(self._ready)
        if env.key is None or (env.shard, env.key) not in self._lanes:
            ready += 1  # it would start a lane of its own
        starting = min(self.max_concurrency - self._running, ready)
        return self._queued + 1 - starting > self.max_pending

    def _overloaded(self, reply: str | None) -> None:
        """Refuse a message for want of room; log when the node falls behind."""
        self._rejected("overloaded")
        if self._behind_since is None:
            self._behind_since = monotonic()
            self._log.warning(
                "node overloaded: refusing messages until the queue drains",
                queued=self._queued,
                running=self._running,
                max_pending=self.max_pending,
            )
        self._reply(
            reply,
            error_reply_for(
                OverloadedError(
                    f"node {self.node_id} has {self._queued} messages queued "
                    f"(max_pending={self.max_pending}); retry later"
                )
            ),
        )

    def _stalled(self, duration: float) -> None:
        """The event loop was blocked for ``duration`` seconds (see LoopWatchdog)."""
        began = time.perf_counter() - duration
        culprit: Envelope | None = None
        for entry in (self._last_started, self._before_last):
            if entry is not None and entry[1] <= began:
                culprit = entry[0]
                break
        self._log.warning(
            "event loop blocked: a handler did blocking work (run it with asyncio.to_thread)",
            blocked_for=round(duration, 3),
            last_handler=None if culprit is None else {"type": culprit.type, "key": culprit.key},
            running=self._running,
        )
        self.metrics.loop_stalled(self.node_id, duration)

    def _fence_reason(self, shard: int) -> str:
        if self._fenced is None and not self.fenced:
            return f"node {self.node_id} does not serve shard {shard} (any more); retry"
        reason = self._fenced or "its lease expired"
        return f"node {self.node_id} is not handling messages ({reason}); retry"

    def _rejected(self, reason: str) -> None:
        self.stats.reject(reason)
        self.metrics.envelope_rejected(reason)

    def _type_label(self, msg_type: str) -> str:
        """The metric label of ``msg_type``: itself, or "other" past _MAX_TYPE_LABELS."""
        labels = self._type_labels
        if msg_type in labels:
            return msg_type
        if len(labels) < _MAX_TYPE_LABELS:
            labels.add(msg_type)
            return msg_type
        return "other"

    def _expired_reply(self, env: Envelope) -> bytes:
        message = f"envelope {env.type!r} for shard {env.shard} expired before its handler ran"
        return error_reply_for(EnvelopeExpiredError(message))

    def _enqueue(self, env: Envelope, reply: str | None) -> None:
        self.stats.received += 1
        self._queued += 1
        received = 0.0
        if self._metered:
            received = monotonic()
            self.metrics.pending_messages(self.node_id, self._queued)
        shard = env.shard
        self._load[shard] = self._load.get(shard, 0) + 1
        key = env.key
        if key is None:
            lane = _Lane(shard, None)
        else:
            existing = self._lanes.get((shard, key))
            if existing is not None:
                # Busy or already ready: its worker puts it back when done.
                existing.items.append((env, reply, received))
                return
            lane = self._lanes[shard, key] = _Lane(shard, key)
        lane.items.append((env, reply, received))
        self._ready.append(lane)
        if self._spare is None:
            self._spawn_worker()

    def _spawn_worker(self) -> None:
        """Make sure a worker that has not started yet is there for the ready lanes.

        One such spare at a time: a worker runs ready lanes one after the other
        for as long as its handlers finish without waiting, and before each
        handler it calls this, so that the rest of the queue has a worker of
        its own should that handler wait. A burst delivered in one go thus
        starts one or two tasks, not one per message, and lanes still run
        concurrently (up to ``max_concurrency``) as soon as handlers wait.
        """
        if (
            self._spare is None
            and len(self._workers) < self.max_concurrency
            and self.state is not NodeState.STOPPED
        ):
            loop = self._loop or asyncio.get_running_loop()
            task = self._spare = loop.create_task(self._work())
            self._workers.add(task)
            task.add_done_callback(self._worker_done)

    def _worker_done(self, task: asyncio.Task[None]) -> None:
        self._workers.discard(task)
        if self._spare is task:  # cancelled before it started
            self._spare = None
        self._current.pop(task, None)
        # A worker cancelled for a shard's handoff may leave other lanes behind.
        if self._ready:
            self._spawn_worker()

    def _settled(self, shard: int) -> None:
        """One message of ``shard`` finished (or was dropped)."""
        left = self._load[shard] - 1
        if left:
            self._load[shard] = left
        else:
            del self._load[shard]
            for waiter in self._idle_waiters.pop(shard, ()):
                if not waiter.done():
                    waiter.set_result(None)
        if self._behind_since is not None and self._queued <= self.max_pending // 2:
            self._log.info(
                "node caught up",
                behind_for=round(monotonic() - self._behind_since, 3),
                refused_total=self.stats.rejected.get("overloaded", 0),
            )
            self._behind_since = None
        quiet = self._quiet
        if quiet is not None and not self._queued and not self._running and not quiet.done():
            quiet.set_result(None)

    # -- workers --------------------------------------------------------------

    async def _work(self) -> None:
        ready = self._ready
        me = asyncio.current_task()
        assert me is not None
        self._spare = None
        while ready:
            lane = ready.popleft()
            if ready and self._spare is None:
                self._spawn_worker()
            env, reply, received = lane.items.popleft()
            self._queued -= 1
            if self._metered:
                self.metrics.pending_messages(self.node_id, self._queued)
            self._current[me] = lane.shard
            try:
                await self._run(env, reply, me, received)
            finally:
                del self._current[me]
                if lane.items:
                    ready.append(lane)
                elif lane.key is not None:
                    self._lanes.pop((lane.shard, lane.key), None)
                self._settled(lane.shard)

    def _overrun(self, task: asyncio.Task[None]) -> None:
        """A handler's deadline passed: cancel its worker (see :meth:`_run`)."""
        self._overdue.add(task)
        task.cancel()

    async def _run(
        self, env: Envelope, reply: str | None, me: asyncio.Task[None], received: float
    ) -> None:
        if env.expired():
            self._rejected("expired")
            self._finish(env, reply, self._expired_reply(env), cache=False)
            return
        if self.fenced or (self._evicting and self._refusing(env.shard)):
            # Not cached: a retry after unfencing must run the handler.
            self._rejected("not_owner")
            refusal = error_reply_for(NotOwnerError(self._fence_reason(env.shard)))
            self._finish(env, reply, refusal, cache=False)
            return
        self._running += 1
        if self._metered:
            self.metrics.handlers_active(self.node_id, self._running)
        started = time.perf_counter()
        self._before_last, self._last_started = self._last_started, (env, started)
        ok = False
        failure: BaseException | None = None
        body: bytes | None = None
        try:
            deadline = env.deadline
            if deadline is None:
                result = await self.handler(env)
            else:
                # Not an asyncio.timeout (a context manager, a current_task(),
                # a timer handle and loop look-ups per message).
                timeouts = self._timeouts
                if timeouts is None:
                    timeouts = self._timeouts = Timeouts(asyncio.get_running_loop(), self._overrun)
                slot = timeouts.add(deadline, me)
                try:
                    result = await self.handler(env)
                except asyncio.CancelledError:
                    if me not in self._overdue:
                        raise
                    self._overdue.discard(me)
                    me.uncancel()
                    raise HandlerTimeoutError(
                        f"handler for {env.type!r} ran past the deadline "
                        f"({env.ttl:.3f}s TTL) and was cancelled"
                    ) from None
                finally:
                    timeouts.discard(slot, me)
                    if me in self._overdue:  # the handler swallowed the cancellation
                        self._overdue.discard(me)
                        me.uncancel()
            if result is None:
                result = b""
            elif not isinstance(result, bytes | bytearray | memoryview):
                raise TypeError(
                    f"handler for {env.type!r} returned {type(result).__name__}; "
                    "a raw handler returns bytes (use a Router for typed replies)"
                )
            ok = True
            if reply is not None or env.id is not None:
                body = encode_reply(bytes(result))
        except asyncio.CancelledError:
            self._finish(
                env,
                reply,
                error_reply_for(
                    NotOwnerError(f"node {self.node_id} stopped the handler before it finished")
                ),
                cache=False,
            )
            raise
        except RequestError as exc:
            # Raised on purpose by the handler (or the timeout): its code goes back.
            failure = exc
            self.stats.last_error = f"{exc.code}: {exc}"
            self._log.debug("handler refused", type=env.type, code=exc.code, error=str(exc))
            body = error_reply_for(exc)
        except Exception as exc:
            self.stats.last_error = f"{type(exc).__name__}: {exc}"
            self._log.warning(
                "handler raised", type=env.type, shard=env.shard, error=repr(exc), exc_info=True
            )
            body = encode_error_reply(RemoteHandlerError.code, type(exc).__name__, str(exc))
        finally:
            elapsed = time.perf_counter() - started
            self._running -= 1
            stats = self.stats
            stats.processing_time += elapsed
            if ok:
                stats.handled += 1
            else:
                stats.errors += 1
            if self._metered:
                self.metrics.handlers_active(self.node_id, self._running)
                # Types nobody handles do not take one of the few label slots.
                unknown = isinstance(failure, NoHandlerError)
                label = "_unknown" if unknown else self._type_label(env.type)
                self.metrics.handler_completed(label, ok, elapsed)
                self.metrics.request_served(label, ok, monotonic() - received)
        self._finish(env, reply, body)

    def _finish(
        self, env: Envelope, reply: str | None, body: bytes | None, *, cache: bool = True
    ) -> None:
        """Answer ``reply`` and every retry of the same id that waited, and remember
        the reply for later retries when the handler ran (``cache``)."""
        self._reply(reply, body)
        request_id = env.id
        if request_id is None:
            return
        for waiting in self._in_flight.pop(request_id, ()):
            self._reply(waiting, body)
        if cache and body is not None:
            self._reply_cache.put(request_id, body, env.shard)

    # -- eviction (stop, handoff timeout, fencing) ----------------------------

    def _evict_soon(self, which: Callable[[int], bool], reason: str) -> None:
        """Schedule :meth:`_evict` from synchronous code (callbacks)."""
        if not self._current and not any(which(lane.shard) for lane in self._ready):
            return
        task = asyncio.get_running_loop().create_task(self._evict(which, reason))
        self._chores.add(task)
        task.add_done_callback(self._chores.discard)

    async def _evict(self, which: Callable[[int], bool], reason: str) -> None:
        """Cancel running handlers and drop queued messages of the shards ``which``
        selects; their callers get ``not_owner``."""
        # Until the shards' lanes are emptied, a worker that picks one up (a
        # replacement for a cancelled one, say) refuses it rather than run it.
        self._evicting.append(which)
        try:
            await self._evict_now(which, reason)
        finally:
            self._evicting.remove(which)

    def _refusing(self, shard: int) -> bool:
        return any(which(shard) for which in self._evicting)

    async def _evict_now(self, which: Callable[[int], bool], reason: str) -> None:
        victims = [t for t, s in self._current.items() if which(s)]
        await _cancel(victims)
        error = error_reply_for(NotOwnerError(reason))
        keep: deque[_Lane] = deque()
        for lane in self._ready:
            if not which(lane.shard):
                keep.append(lane)
                continue
            while lane.items:
                env, reply, _ = lane.items.popleft()
                self._queued -= 1
                self._finish(env, reply, error, cache=False)
                self._settled(lane.shard)
            if lane.key is not None:
                self._lanes.pop((lane.shard, lane.key), None)
        # In place: workers hold a reference to this deque.
        self._ready.clear()
        self._ready.extend(keep)

    # -- replies ------------------------------------------------------------

    def _reply(self, reply: str | None, body: bytes | None) -> None:
        """Send a reply at once, without waiting (callable from synchronous code)."""
        if reply is None or body is None:
            return
        try:
            self.transport.publish_nowait(reply, body)
        except Exception as exc:
            self._log.warning("cannot send reply", error=repr(exc))


class ReplyCache:
    """Recent replies by request id: bounded in count, each kept for ``ttl`` seconds,
    each tagged with its shard so that a handoff can carry a shard's replies to
    its next owner."""

    def __init__(self, size: int, ttl: float) -> None:
        self.size = size
        self.ttl = ttl
        self._items: OrderedDict[str, tuple[float, bytes, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, request_id: str) -> bytes | None:
        item = self._items.get(request_id)
        if item is None:
            return None
        if item[0] <= monotonic():
            del self._items[request_id]
            return None
        return item[1]

    def put(self, request_id: str, body: bytes, shard: int, ttl: float | None = None) -> None:
        if not self.size:
            return
        items = self._items
        items[request_id] = (monotonic() + (self.ttl if ttl is None else ttl), body, shard)
        items.move_to_end(request_id)
        while len(items) > self.size:
            items.popitem(last=False)
        # Drop expired entries from the old end, a few per call.
        now = monotonic()
        for _ in range(2):
            oldest = next(iter(items.values()), None)
            if oldest is None or oldest[0] > now:
                break
            items.popitem(last=False)

    def export(self, shard: int, budget: int) -> list[tuple[str, float, bytes]]:
        """``shard``'s live replies as (id, seconds left, body), newest first,
        as many as fit in about ``budget`` bytes."""
        now = monotonic()
        out: list[tuple[str, float, bytes]] = []
        for request_id, (until, body, owner) in reversed(self._items.items()):
            if owner != shard or until <= now:
                continue
            budget -= len(request_id) + len(body) + 16
            if budget < 0:
                break
            out.append((request_id, until - now, body))
        return out


async def _cancel(tasks: list[asyncio.Task[None]], grace: float = _CANCEL_GRACE) -> None:
    """Cancel ``tasks`` and wait up to ``grace`` seconds for them to end, without
    swallowing our own cancellation. A task still running then (a handler that
    catches CancelledError and goes on) is logged and left to finish on its own:
    asyncio cannot force it, and waiting for it would hang ``stop`` forever."""
    stuck = await cancel_and_wait(tasks, grace)
    if stuck:
        structlog.get_logger("clstr.node").error(
            "tasks ignored cancellation; left running (a handler catches CancelledError?)",
            tasks=sorted(t.get_name() for t in stuck),
            grace=grace,
        )
