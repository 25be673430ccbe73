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
import contextlib
import enum
import time
import uuid
from collections import deque
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import ClassVar, Final, Self

import structlog

from .codec import (
    DEFAULT_LIMITS,
    Limits,
    decode_request,
    encode_error_reply,
    encode_payload,
    encode_reply,
    error_reply_for,
)
from .envelope import Envelope
from .errors import (
    BadRequestError,
    ConfigurationError,
    EnvelopeExpiredError,
    HandlerTimeoutError,
    LifecycleError,
    NotOwnerError,
    OverloadedError,
    RemoteHandlerError,
    RequestError,
    ShardOutOfRangeError,
)
from .handlers import Handler, start_handler, stop_handler
from .hashing import shards_for_node, validate_num_shards
from .metrics import NOOP_METRICS, Metrics
from .transports.base import Subscription, Transport

__all__ = [
    "NODE_INFO_TYPE",
    "NodeInfo",
    "Node",
    "NodeState",
    "NodeStats",
    "shard_subject",
    "DEFAULT_PREFIX",
]

#: The message type of the built-in node-info request (same as the Go original).
NODE_INFO_TYPE: Final = "clstr.node.info"

#: The default subject prefix: shard ``s`` is served on ``clstr.shard.<s>``.
DEFAULT_PREFIX: Final = "clstr"


def shard_subject(prefix: str, shard: int) -> str:
    """The NATS subject of ``shard`` under ``prefix``."""
    return f"{prefix}.shard.{shard}"


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """What a node says about itself (reply to :data:`NODE_INFO_TYPE`)."""

    message_type: ClassVar[str] = NODE_INFO_TYPE

    node_id: str
    shards: list[int] = field(default_factory=list)


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


_Work = tuple[Envelope, "str | None"]


class _Lane:
    __slots__ = ("items", "key")

    def __init__(self, key: str | None) -> None:
        self.key = key
        self.items: deque[_Work] = deque()


class Node:
    """A cluster member that serves a set of shards with one handler.

    Shards: pass ``shards`` explicitly, or ``nodes`` (the static member list,
    this node included) to compute this node's shards by HRW, or neither to
    serve every shard. ``max_concurrency`` bounds handlers running at once;
    ``max_pending`` bounds messages waiting for a worker (past it the node
    answers ``overloaded``). ``stop_timeout`` bounds how long :meth:`stop`
    lets in-flight messages finish before it cancels them.
    ``clock_skew`` is how far the sender's clock may be off before a message
    whose age exceeds its TTL by more than that is dropped as stale.
    """

    def __init__(
        self,
        transport: Transport,
        handler: Handler,
        *,
        num_shards: int,
        node_id: str | None = None,
        shards: Iterable[int] | None = None,
        nodes: Collection[str] | None = None,
        weights: Mapping[str, float] | None = None,
        seed: str = "",
        prefix: str = DEFAULT_PREFIX,
        max_concurrency: int = 100,
        max_pending: int = 10_000,
        stop_timeout: float = 10.0,
        clock_skew: float = 30.0,
        limits: Limits = DEFAULT_LIMITS,
        metrics: Metrics = NOOP_METRICS,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.num_shards = validate_num_shards(num_shards)
        self.node_id = node_id or f"node-{uuid.uuid4().hex[:8]}"
        if max_concurrency < 1:
            raise ConfigurationError(f"max_concurrency must be >= 1, got {max_concurrency}")
        if max_pending < 0:
            raise ConfigurationError(f"max_pending must be >= 0, got {max_pending}")
        if shards is not None and nodes is not None:
            raise ConfigurationError("pass either shards or nodes, not both")
        if shards is not None:
            wanted = sorted(set(shards))
            for s in wanted:
                if not 0 <= s < self.num_shards:
                    raise ShardOutOfRangeError(
                        f"shard {s} is out of range 0..{self.num_shards - 1}"
                    )
        elif nodes is not None:
            if self.node_id not in nodes:
                raise ConfigurationError(
                    f"node id {self.node_id!r} is not in the node list {sorted(nodes)}; "
                    "a static cluster lists every member, this one included"
                )
            wanted = shards_for_node(self.node_id, nodes, self.num_shards, seed, weights=weights)
        else:
            wanted = list(range(self.num_shards))
        self._wanted = wanted
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
        self._log = structlog.get_logger("clstr.node").bind(node_id=self.node_id)
        self.state = NodeState.CREATED
        self.stats = NodeStats()

        self._subs: dict[int, Subscription] = {}
        self._lanes: dict[str, _Lane] = {}
        self._ready: deque[_Lane] = deque()
        self._workers: set[asyncio.Task[None]] = set()
        self._queued = 0
        self._running = 0
        self._quiet = asyncio.Event()
        self._quiet.set()
        self._replies: deque[tuple[str, bytes]] = deque()
        self._reply_wakeup = asyncio.Event()
        self._replier: asyncio.Task[None] | None = None

    # -- lifecycle ----------------------------------------------------------

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

    async def start(self) -> None:
        """Subscribe to the node's shards; return once the server routes them to us.

        Raises :class:`LifecycleError` when called twice or after stop.
        """
        if self.state is not NodeState.CREATED:
            raise LifecycleError(f"node {self.node_id} is {self.state.value}; it starts only once")
        self.state = NodeState.RUNNING
        self.stats.started_at = self._wall_clock()
        self._replier = asyncio.create_task(
            self._send_replies(), name=f"clstr-replier-{self.node_id}"
        )
        try:
            await start_handler(self.handler)
            await asyncio.gather(*(self.acquire(s) for s in self._wanted))
        except BaseException:
            await self.stop()
            raise
        self._log.info("node started", shards=len(self._subs), num_shards=self.num_shards)

    async def acquire(self, shard: int) -> None:
        """Start serving ``shard`` (subscribe with the cluster's queue group)."""
        if shard in self._subs:
            return

        def on_message(data: bytes, reply: str | None) -> None:
            self._on_message(shard, data, reply)

        sub = await self.transport.subscribe(
            shard_subject(self.prefix, shard), on_message, queue=self.prefix
        )
        self._subs[shard] = sub
        self.metrics.shards_owned(self.node_id, len(self._subs))

    async def release(self, shard: int) -> None:
        """Stop taking ``shard``'s messages; those already received still run."""
        sub = self._subs.pop(shard, None)
        if sub is not None:
            await sub.drain()
            self.metrics.shards_owned(self.node_id, len(self._subs))

    async def stop(self, timeout: float | None = None) -> None:
        """Stop gracefully: take no new messages, let queued and running ones
        finish for up to ``timeout`` seconds (default ``stop_timeout``), then
        cancel what is left (callers get ``not_owner``, which is retryable),
        and release every shard. Idempotent.
        """
        if self.state in (NodeState.STOPPING, NodeState.STOPPED):
            return
        self.state = NodeState.STOPPING
        bound = self.stop_timeout if timeout is None else timeout
        await asyncio.gather(*(self.release(s) for s in list(self._subs)))
        try:
            async with asyncio.timeout(bound):
                await self._quiet.wait()
        except TimeoutError:
            self._log.warning(
                "stop timeout: cancelling in-flight handlers",
                running=self._running,
                queued=self._queued,
            )
        await self._cancel_workers()
        await stop_handler(self.handler)
        if self._replier is not None:
            self._reply_wakeup.set()
            self._replier.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._replier
        self.state = NodeState.STOPPED
        self._log.info("node stopped")

    async def _cancel_workers(self) -> None:
        for task in self._workers:
            task.cancel()
        if self._workers:
            await asyncio.gather(*self._workers, return_exceptions=True)
        stopping = NotOwnerError(f"node {self.node_id} stopped before handling the message")
        for lane in [*self._ready, *self._lanes.values()]:
            while lane.items:
                _, reply = lane.items.popleft()
                self._queued -= 1
                self._reply(reply, error_reply_for(stopping))
        self._ready.clear()
        self._lanes.clear()
        await self._flush_replies()

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
        if env.ttl is not None and (
            env.expired() or self._wall_clock() - env.created_at > env.ttl + self.clock_skew
        ):
            self._reject_expired(env, reply)
            return
        if env.type == NODE_INFO_TYPE:
            info = NodeInfo(node_id=self.node_id, shards=self.shards)
            self._reply(reply, encode_reply(encode_payload(info)))
            return
        if self._queued >= self.max_pending:
            self._rejected("overloaded")
            self._reply(
                reply,
                error_reply_for(
                    OverloadedError(
                        f"node {self.node_id} has {self._queued} messages queued "
                        f"(max_pending={self.max_pending}); retry later"
                    )
                ),
            )
            return
        self._enqueue(env, reply)

    def _rejected(self, reason: str) -> None:
        self.stats.reject(reason)
        self.metrics.envelope_rejected(reason)

    def _reject_expired(self, env: Envelope, reply: str | None) -> None:
        self._rejected("expired")
        self._reply(
            reply,
            error_reply_for(
                EnvelopeExpiredError(
                    f"envelope {env.type!r} for shard {env.shard} expired before its handler ran"
                )
            ),
        )

    def _enqueue(self, env: Envelope, reply: str | None) -> None:
        self.stats.received += 1
        self._queued += 1
        self._quiet.clear()
        key = env.key
        if key is None:
            lane = _Lane(None)
        else:
            existing = self._lanes.get(key)
            if existing is not None:
                # Busy or already ready: its worker puts it back when done.
                existing.items.append((env, reply))
                return
            lane = self._lanes[key] = _Lane(key)
        lane.items.append((env, reply))
        self._ready.append(lane)
        if len(self._workers) < self.max_concurrency:
            task = asyncio.get_running_loop().create_task(self._work())
            self._workers.add(task)
            task.add_done_callback(self._workers.discard)

    # -- workers --------------------------------------------------------------

    async def _work(self) -> None:
        ready = self._ready
        while ready:
            lane = ready.popleft()
            env, reply = lane.items.popleft()
            self._queued -= 1
            try:
                await self._run(env, reply)
            finally:
                if lane.items:
                    ready.append(lane)
                elif lane.key is not None:
                    self._lanes.pop(lane.key, None)
                if not self._queued and not self._running:
                    self._quiet.set()

    async def _run(self, env: Envelope, reply: str | None) -> None:
        if env.expired():
            self._reject_expired(env, reply)
            return
        self._running += 1
        self.metrics.handlers_active(self.node_id, self._running)
        started = time.perf_counter()
        ok = False
        try:
            remaining = env.remaining()
            if remaining is None:
                result = await self.handler(env)
            else:
                timeout = asyncio.timeout(remaining)
                try:
                    async with timeout:
                        result = await self.handler(env)
                except TimeoutError:
                    if not timeout.expired():
                        raise
                    raise HandlerTimeoutError(
                        f"handler for {env.type!r} ran past the deadline "
                        f"({env.ttl:.3f}s TTL) and was cancelled"
                    ) from None
            if result is None:
                result = b""
            elif not isinstance(result, bytes | bytearray | memoryview):
                raise TypeError(
                    f"handler for {env.type!r} returned {type(result).__name__}; "
                    "a raw handler returns bytes (use a Router for typed replies)"
                )
            ok = True
            if reply is not None:
                await self._publish(reply, encode_reply(bytes(result)))
        except asyncio.CancelledError:
            self._reply(
                reply,
                error_reply_for(
                    NotOwnerError(f"node {self.node_id} stopped before the handler finished")
                ),
            )
            raise
        except RequestError as exc:
            # Raised on purpose by the handler (or the timeout): its code goes back.
            self.stats.last_error = f"{exc.code}: {exc}"
            self._log.debug("handler refused", type=env.type, code=exc.code, error=str(exc))
            self._reply(reply, error_reply_for(exc))
        except Exception as exc:
            self.stats.last_error = f"{type(exc).__name__}: {exc}"
            self._log.warning(
                "handler raised", type=env.type, shard=env.shard, error=repr(exc), exc_info=True
            )
            self._reply(
                reply, encode_error_reply(RemoteHandlerError.code, type(exc).__name__, str(exc))
            )
        finally:
            elapsed = time.perf_counter() - started
            self._running -= 1
            stats = self.stats
            stats.processing_time += elapsed
            if ok:
                stats.handled += 1
            else:
                stats.errors += 1
            self.metrics.handlers_active(self.node_id, self._running)
            self.metrics.handler_completed(env.type, ok, elapsed)

    # -- replies ------------------------------------------------------------

    def _reply(self, reply: str | None, body: bytes) -> None:
        """Queue a reply for the replier task (callable from synchronous code)."""
        if reply is None:
            return
        self._replies.append((reply, body))
        self._reply_wakeup.set()

    async def _publish(self, reply: str, body: bytes) -> None:
        try:
            await self.transport.publish(reply, body)
        except Exception as exc:
            self._log.warning("cannot send reply", error=repr(exc))

    async def _flush_replies(self) -> None:
        while self._replies:
            await self._publish(*self._replies.popleft())

    async def _send_replies(self) -> None:
        while True:
            await self._reply_wakeup.wait()
            self._reply_wakeup.clear()
            await self._flush_replies()
