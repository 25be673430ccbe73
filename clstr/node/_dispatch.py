"""The message path of a node: intake, per-key lanes, workers, the handler run, replies.

Flow of one message: the transport hands bytes to :meth:`Dispatcher.on_message`
(synchronously, on its delivery path); it decodes them, refuses what is
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
import time
from collections import deque
from collections.abc import Callable
from functools import partial
from typing import Final

import structlog

from .._clock import Timeouts, monotonic
from ..codec import (
    encode_error_reply,
    encode_reply,
    error_reply_for,
)
from ..envelope import Envelope
from ..errors import (
    EnvelopeExpiredError,
    NoHandlerError,
    NotOwnerError,
    OverloadedError,
    RemoteHandlerError,
    ReplyTooLargeError,
    RequestError,
    RequestInterruptedError,
)
from ..handlers import streaming
from ..handlers._stream import reset as reset_stream
from ._calls import Calls, cancel_tasks
from ._lanes import Job, Lane, ReplyTo, Waiting
from ._replies import NOT_STORED, ReplyCache
from ._state import Owner
from ._stream import Streams, StreamWriter

__all__ = ["Dispatcher"]

# Live loop timers kept for queued messages' deadlines (see Timeouts).
_QUEUE_TIMERS: Final = 1024

# Message types are chosen by senders: past this many distinct ones, metrics
# label the rest "other", so that hostile senders cannot grow them without bound.
_MAX_TYPE_LABELS: Final = 256


class Dispatcher:
    """Takes a node's messages and runs its handler on them (see the module docstring).

    Reads the node's settings and ownership through ``node`` (an :class:`Owner`);
    holds everything of the message path after the intake.
    """

    def __init__(
        self,
        node: Owner,
        reply_cache: ReplyCache,
        *,
        log: structlog.typing.FilteringBoundLogger,
    ) -> None:
        self._node = node
        self._log = log
        #: The loop workers run on (set when the node starts).
        self.loop: asyncio.AbstractEventLoop | None = None
        self.reply_cache = reply_cache
        self._type_labels: set[str] = set()
        self._lanes: dict[tuple[int, str], Lane] = {}
        self._ready: deque[Lane] = deque()
        self.workers: set[asyncio.Task[None]] = set()
        self._spare: asyncio.Task[None] | None = None  # a worker that has not run yet
        self._current: dict[asyncio.Task[None], Job] = {}  # worker -> the job it runs
        self._chores: set[asyncio.Task[None]] = set()  # evictions scheduled from callbacks
        self._evicting: list[Callable[[int], bool]] = []  # shards being evicted now
        self._load: dict[int, int] = {}  # shard -> messages queued or running
        self._idle_waiters: dict[int, list[asyncio.Future[None]]] = {}
        self.queued = 0
        self.running = 0
        # Since when messages are refused as overloaded (None: keeping up).
        self._behind_since: float | None = None
        # Set when nothing is queued or running, while stop() waits for that.
        self._quiet: asyncio.Future[None] | None = None
        self._calls = Calls()  # handlers under their deadline, interruptible
        self._streams = Streams(node.transport)  # streamed replies under way
        #: Idempotency: ids still in flight: their request's fingerprint, and
        #: who else waits for their reply.
        self.in_flight: dict[str, tuple[bytes, list[ReplyTo]]] = {}
        # Queued messages answered at their deadline (see Waiting).
        self._queue_timeouts: Timeouts[Waiting] | None = None
        # The handlers that started last (for the loop-stall report).
        self.last_started: tuple[Envelope, float] | None = None
        self.before_last: tuple[Envelope, float] | None = None

    # -- waiting for the path to empty (handoff, stop) -------------------------

    def busy(self, shard: int) -> bool:
        """Whether ``shard`` has messages queued or running."""
        return bool(self._load.get(shard))

    def load(self, shard: int) -> int:
        """How many messages of ``shard`` are queued or running."""
        return self._load.get(shard, 0)

    async def wait_idle(self, shard: int) -> None:
        """Return once ``shard`` has no message queued or running."""
        if self._load.get(shard):
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._idle_waiters.setdefault(shard, []).append(waiter)
            await waiter

    async def wait_quiet(self) -> None:
        """Return once no message is queued or running."""
        if self.queued or self.running:
            self._quiet = asyncio.get_running_loop().create_future()
            await self._quiet

    async def close(self, reason: str) -> None:
        """Cancel the scheduled evictions, evict everything, end every worker."""
        await cancel_tasks(list(self._chores))
        await self.evict(lambda s: True, reason)
        await cancel_tasks(list(self.workers))
        self._calls.close()
        await self._streams.close()
        if self._queue_timeouts is not None:
            self._queue_timeouts.close()

    def full(self, env: Envelope) -> bool:
        """Whether taking ``env`` would leave more than ``max_pending`` messages
        waiting: queued ones that no idle worker is about to start (a queued
        message of a busy key waits; the first of a new key may start at once)."""
        ready = len(self._ready)
        if env.key is None or (env.shard, env.key) not in self._lanes:
            ready += 1  # it would start a lane of its own
        starting = min(self._node.max_concurrency - self.running, ready)
        return self.queued + 1 - starting > self._node.max_pending

    def overloaded(self, reply: ReplyTo) -> None:
        """Refuse a message for want of room; log when the node falls behind."""
        node = self._node
        self.rejected("overloaded")
        if self._behind_since is None:
            self._behind_since = monotonic()
            self._log.warning(
                "node overloaded: refusing messages until the queue drains",
                queued=self.queued,
                running=self.running,
                max_pending=node.max_pending,
            )
        self.reply(
            reply,
            error_reply_for(
                OverloadedError(
                    f"node {node.node_id} has {self.queued} messages queued "
                    f"(max_pending={node.max_pending}); retry later"
                )
            ),
        )

    def rejected(self, reason: str) -> None:
        self._node.stats.reject(reason)
        self._node.metrics.envelope_rejected(reason)

    def _type_label(self, msg_type: str) -> str:
        """The metric label of ``msg_type``: itself, or "other" past _MAX_TYPE_LABELS."""
        labels = self._type_labels
        if msg_type in labels:
            return msg_type
        if len(labels) < _MAX_TYPE_LABELS:
            labels.add(msg_type)
            return msg_type
        return "other"

    def expired_reply(self, env: Envelope) -> bytes:
        message = f"envelope {env.type!r} for shard {env.shard} expired before its handler ran"
        return error_reply_for(EnvelopeExpiredError(message))

    def enqueue(self, env: Envelope, reply: ReplyTo) -> None:
        node = self._node
        node.stats.received += 1
        self.queued += 1
        received = 0.0
        if node.timed:
            received = monotonic()
            if node.metered:
                node.metrics.pending_messages(node.node_id, self.queued)
        shard = env.shard
        self._load[shard] = self._load.get(shard, 0) + 1
        key = env.key
        job: Job = [env, reply, received, None]
        if key is not None:
            existing = self._lanes.get((shard, key))
            if existing is not None:
                # Busy or already ready: its worker puts it back when done.
                existing.append(job)
                if env.deadline is not None:
                    self._watch(job, env.deadline, shard)
                return
            lane = self._lanes[shard, key] = Lane()
        else:
            lane = Lane()
        lane.shard = shard
        lane.key = key
        lane.append(job)
        self._ready.append(lane)
        if self._spare is None:
            self._spawn_worker()
        if env.deadline is not None and len(self._ready) > node.max_concurrency - self.running:
            # More lanes ready than workers free to start them: it may wait.
            self._watch(job, env.deadline, shard)

    def _watch(self, job: Job, deadline: float, shard: int) -> None:
        """Answer ``job`` at ``deadline`` should it still wait then."""
        timeouts = self._queue_timeouts
        if timeouts is None:
            loop = self.loop or asyncio.get_running_loop()
            # Few live timers: most queued messages start long before their deadline,
            # and every emptied millisecond would otherwise keep its timer (and memory).
            timeouts = self._queue_timeouts = Timeouts(
                loop, self._expired_in_queue, max_timers=_QUEUE_TIMERS
            )
        waiting = job[3] = Waiting(job, shard)
        waiting.slot = timeouts.add(deadline, waiting)

    def _expired_in_queue(self, waiting: Waiting) -> None:
        """A queued message's deadline passed: answer it now and free its room in
        the queue; its worker will skip it."""
        if waiting.answered:
            return
        waiting.answered = True
        self.rejected("expired")
        self._drop(waiting.job, waiting.shard, self.expired_reply(waiting.job[0]), "expired")

    def _drop(self, job: Job, shard: int, body: bytes, reason: str) -> None:
        """Answer the queued ``job`` with ``body`` (refused for ``reason``): it never
        runs. Its worker skips it (the caller marked its ``Waiting`` answered)."""
        env, reply, received, _ = job
        self.queued -= 1
        node = self._node
        if node.metered:
            node.metrics.pending_messages(node.node_id, self.queued)
        if node.traced:
            node.tracer.message_refused(env, received, reason)
        self._finish(env, reply, body, cache=False)
        self._settled(shard)

    # -- workers --------------------------------------------------------------

    def _spawn_worker(self) -> None:
        """Make sure a worker that has not started yet is there for the ready lanes.

        One such spare at a time: a worker runs ready lanes one after the other
        for as long as its handlers finish without waiting, and before each
        handler it calls this, so that the rest of the queue has a worker of
        its own should that handler wait. A burst delivered in one go thus
        starts one or two tasks, not one per message, and lanes still run
        concurrently (up to ``max_concurrency``) as soon as handlers wait.
        """
        node = self._node
        if self._spare is None and len(self.workers) < node.max_concurrency and node.accepting:
            loop = self.loop or asyncio.get_running_loop()
            task = self._spare = loop.create_task(self._work())
            self.workers.add(task)
            task.add_done_callback(self._worker_done)

    def _worker_done(self, task: asyncio.Task[None]) -> None:
        self.workers.discard(task)
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
        if self._behind_since is not None and self.queued <= self._node.max_pending // 2:
            self._log.info(
                "node caught up",
                behind_for=round(monotonic() - self._behind_since, 3),
                refused_total=self._node.stats.rejected.get("overloaded", 0),
            )
            self._behind_since = None
        quiet = self._quiet
        if quiet is not None and not self.queued and not self.running and not quiet.done():
            quiet.set_result(None)

    async def _work(self) -> None:
        ready = self._ready
        me = asyncio.current_task()
        assert me is not None
        self._spare = None
        node = self._node
        while ready:
            lane = ready.popleft()
            if ready and self._spare is None:
                self._spawn_worker()
            job = lane.popleft()
            env, reply, received, waiting = job
            if waiting is not None:
                if waiting.answered:  # expired while it waited: answered then
                    self._lane_next(lane)
                    continue
                waiting.answered = True
                self._queue_timeouts.discard(waiting.slot, waiting)  # type: ignore[union-attr]
            self.queued -= 1
            if node.metered:
                node.metrics.pending_messages(node.node_id, self.queued)
            self._current[me] = job
            try:
                await self._run(env, reply, me, received)
            finally:
                del self._current[me]
                self._lane_next(lane)
                self._settled(lane.shard)

    def _lane_next(self, lane: Lane) -> None:
        """``lane``'s message is done: back in line if it holds more, else gone."""
        if lane:
            self._ready.append(lane)
        elif lane.key is not None:
            self._lanes.pop((lane.shard, lane.key), None)

    async def _run(
        self, env: Envelope, reply: ReplyTo, me: asyncio.Task[None], received: float
    ) -> None:
        node = self._node
        deadline = env.deadline
        if deadline is not None and monotonic() >= deadline:  # (env.expired(), inlined)
            self.rejected("expired")
            if node.traced:
                node.tracer.message_refused(env, received, "expired")
            self._finish(env, reply, self.expired_reply(env), cache=False)
            return
        if node.fenced or (self._evicting and self._refusing(env.shard)):
            # Not cached: a retry after unfencing must run the handler.
            self.rejected("not_owner")
            if node.traced:
                node.tracer.message_refused(env, received, "not_owner")
            refusal = error_reply_for(NotOwnerError(node.fence_reason(env.shard)))
            self._finish(env, reply, refusal, cache=False)
            return
        self.running += 1
        if node.metered:
            node.metrics.handlers_active(node.node_id, self.running)
        started = time.perf_counter()
        self.before_last, self.last_started = self.last_started, (env, started)
        ok = False
        failure: BaseException | None = None
        body: bytes | None = None
        store = True  # the outcome of a handler that ran is kept for retries
        stream: StreamWriter | None = None
        result: bytes | bytearray | memoryview | None = None
        span = (
            node.tracer.handler_started(env, received, reply is not None) if node.traced else None
        )
        try:
            if env.stream and isinstance(reply, str):
                stream = await self._streams.open(env, reply, partial(self._calls.interrupt, me))
            calls = self._calls
            slot = 0 if deadline is None else calls.begin(env, me)
            token = None if stream is None else streaming(stream)
            try:
                result = await node.handler(env)
            except asyncio.CancelledError:
                mapped = calls.outcome(env, me)
                if mapped is None:
                    raise
                raise mapped from None
            finally:
                if token is not None:
                    reset_stream(token)
                calls.end(slot, me)
            if result is None:
                result = b""
            elif result.__class__ is not bytes and not isinstance(
                result, bytes | bytearray | memoryview
            ):
                raise TypeError(
                    f"handler for {env.type!r} returned {type(result).__name__}; "
                    "a raw handler returns bytes (use a Router for typed replies)"
                )
            ok = True
            if (reply is not None or env.id is not None) and stream is None:
                body = encode_reply(bytes(result))
        except asyncio.CancelledError:
            stopped = NotOwnerError(f"node {node.node_id} stopped the handler before it finished")
            failure = stopped
            if stream is None:
                self._finish(env, reply, error_reply_for(stopped), cache=False)
            else:
                self._end_stream(env, stream, error_reply_for(stopped), b"")
            raise
        except RequestError as exc:
            # Raised on purpose by the handler (or the timeout): its code goes back.
            failure = exc
            store = exc.code not in NOT_STORED
            node.stats.last_error = f"{exc.code}: {exc}"
            self._log.debug("handler refused", type=env.type, code=exc.code, error=str(exc))
            body = error_reply_for(exc)
        except Exception as exc:
            failure = exc
            node.stats.last_error = f"{type(exc).__name__}: {exc}"
            self._log.warning(
                "handler raised", type=env.type, shard=env.shard, error=repr(exc), exc_info=True
            )
            body = encode_error_reply(RemoteHandlerError.code, type(exc).__name__, str(exc))
        finally:
            elapsed = time.perf_counter() - started
            self.running -= 1
            stats = node.stats
            stats.processing_time += elapsed
            if ok:
                stats.handled += 1
            else:
                stats.errors += 1
            if node.metered:
                node.metrics.handlers_active(node.node_id, self.running)
                # Types nobody handles do not take one of the few label slots.
                unknown = isinstance(failure, NoHandlerError)
                label = "_unknown" if unknown else self._type_label(env.type)
                node.metrics.handler_completed(label, ok, elapsed)
                node.metrics.request_served(label, ok, monotonic() - received)
            if span is not None:
                span.end(failure)
        if stream is not None:
            self._end_stream(env, stream, body, bytes(result) if ok and result else b"")
            return
        if body is not None and len(body) > node.transport.max_payload:
            body = self._too_large(env, len(body))
        if reply is not None or env.id is not None:  # (else nothing to answer or keep)
            self._finish(env, reply, body, cache=store)

    def _end_stream(
        self, env: Envelope, stream: StreamWriter, body: bytes | None, data: bytes
    ) -> None:
        """End ``env``'s stream with ``body`` (an error reply, or ``None``: done) and
        ``data`` (a raw handler's last chunk). Streams are not kept for retries: a
        retry would stream again."""
        self._streams.close_stream(stream)
        stream.finish(body, data)
        self._finish(env, None, None, cache=False)

    def _too_large(self, env: Envelope, size: int) -> bytes:
        """The reply that stands for one too large to send (the handler ran)."""
        limit = self._node.transport.max_payload
        self.rejected("reply_too_large")
        self._log.warning("reply too large", type=env.type, size=size, max_payload=limit)
        return error_reply_for(
            ReplyTooLargeError(
                f"the reply to {env.type!r} is {size} bytes, over the max_payload of {limit} "
                "bytes; return less per reply (page it, or stream it)"
            )
        )

    def _finish(
        self, env: Envelope, reply: ReplyTo, body: bytes | None, *, cache: bool = True
    ) -> None:
        """Answer ``reply`` and every retry of the same id that waited, and remember
        the reply for later retries when the handler ran (``cache``)."""
        self.reply(reply, body)
        request_id = env.id
        if request_id is None:
            return
        running = self.in_flight.pop(request_id, None)
        if running is None:
            return
        print_, waiting = running
        for other in waiting:
            self.reply(other, body)
        if cache and body is not None:
            self.reply_cache.put(request_id, body, env.shard, print_)

    # -- eviction (stop, handoff timeout, fencing) ----------------------------

    def evict_soon(self, which: Callable[[int], bool], reason: str) -> None:
        """Schedule :meth:`evict` from synchronous code (callbacks)."""
        if not self._current and not any(which(lane.shard) for lane in self._ready):
            return
        task = asyncio.get_running_loop().create_task(self.evict(which, reason))
        self._chores.add(task)
        task.add_done_callback(self._chores.discard)

    async def evict(self, which: Callable[[int], bool], reason: str) -> None:
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
        victims = [t for t, job in self._current.items() if which(job[0].shard)]
        await cancel_tasks(victims)
        error = error_reply_for(NotOwnerError(reason))
        keep: deque[Lane] = deque()
        for lane in self._ready:
            if not which(lane.shard):
                keep.append(lane)
                continue
            while lane:
                job = lane.popleft()
                waiting = job[3]
                if waiting is not None:
                    if waiting.answered:
                        continue
                    waiting.answered = True
                self._drop(job, lane.shard, error, "not_owner")
            if lane.key is not None:
                self._lanes.pop((lane.shard, lane.key), None)
        # In place: workers hold a reference to this deque.
        self._ready.clear()
        self._ready.extend(keep)

    # -- interrupts -------------------------------------------------------------

    def interrupt(
        self, shard: int, key: str | None, match: Callable[[Envelope], bool], *, any_key: bool
    ) -> int:
        """Interrupt the messages of ``shard`` and ``key`` (of any key of the shard
        when ``any_key``) that ``match`` selects: a running one's handler is
        cancelled (its caller gets ``interrupted``, kept for retries: it ran); a
        queued one is answered ``interrupted`` and never runs. Returns how many
        were interrupted."""
        count = 0
        for task, job in list(self._current.items()):
            env = job[0]
            if env.shard == shard and (any_key or env.key == key) and match(env):
                self._calls.interrupt(task)
                count += 1
        lanes = [lane for lane in self._ready if lane.key is None and lane.shard == shard]
        if any_key:
            lanes += [lane for lane in self._lanes.values() if lane.shard == shard]
        elif key is not None:
            lane = self._lanes.get((shard, key))
            lanes = [] if lane is None else [lane]
        for lane in lanes:
            for job in lane:
                env, waiting = job[0], job[3]
                if (waiting is not None and waiting.answered) or not match(env):
                    continue
                if waiting is None:
                    waiting = job[3] = Waiting(job, shard)
                elif self._queue_timeouts is not None:
                    self._queue_timeouts.discard(waiting.slot, waiting)
                waiting.answered = True  # its worker skips it
                message = f"the caller interrupted {env.type!r} before its handler ran"
                error = error_reply_for(RequestInterruptedError(message))
                self._drop(job, shard, error, "interrupted")
                count += 1
        return count

    # -- replies ------------------------------------------------------------

    def reply(self, reply: ReplyTo, body: bytes | None) -> None:
        """Send a reply at once, without waiting (callable from synchronous code)."""
        if reply is None or body is None:
            return
        if not isinstance(reply, str):
            reply(body)  # a batch item's (node/_batch.py)
            return
        try:
            self._node.transport.publish_nowait(reply, body)
        except Exception as exc:
            self._log.warning("cannot send reply", error=repr(exc))
