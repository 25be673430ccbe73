"""The node side of persisted messages: one consumer per served shard.

Each consumer is a shard-bound task of the node (``Node.bind``), so it runs
on the one node that serves its shard, is stopped before the shard is
released and when the node is fenced, and starts on the next owner. It reads
the shard's messages through the shard's durable pull consumer and, for each,
in stream order per key (one key's messages one at a time, other keys' at
once: see :class:`_InFlight`):

1. skips it when the reply store holds a reply for its id already (a
   duplicate: redelivered after a crash, or published again after the
   stream's duplicate window);
2. sends its body, unchanged, as a request to the shard's subject, so the
   node's own message path handles it (intake checks, the reply cache,
   per-key order, deadlines, interrupts) — the consumer adds no second path;
3. stores the reply (a success or a kept error) under the request id;
4. acknowledges it (the work-queue stream then drops it).

A message taken and not acknowledged yet gets an in-progress ack every
``ack_wait / 3``, so a job that outlasts ``ack_wait`` (or waits that long
behind its key) is not delivered again while it runs. A crash between 2 and 4
delivers the message again to the next owner: at least once; the reply store
(step 1) and the application's conditional writes make it once in effect.
Retryable refusals (``not_owner``, ``overloaded``, no owner, no reply in
time) are asked again under the same id (the node answers a retry from its
reply cache, or joins the running one).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections import deque
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import structlog

from .._tasks import cancel_and_wait
from ..codec import (
    decode_reply,
    decode_request,
    encode_error_reply,
    encode_request,
    error_reply_for,
)
from ..errors import BadRequestError, NoShardOwnerError, RequestError, RequestTimeoutError
from ..node import Node, ShardContext
from ..protocol import fingerprint, shard_subject
from ..transports.jetstream import jetstream_of
from ._names import (
    MSG_ID_HEADER,
    PersistSettings,
    consumer_name,
    ensure_stream,
    persist_subject,
    stream_name,
)
from ._replies import ReplyStore, StoredReply

__all__ = ["PersistStats", "PersistedConsumers", "serve_persisted"]

#: The name the consumers are bound under (``Node.bind``).
BINDING: Final = "persist"

_NO_FINGERPRINT: Final = bytes(16)


@dataclass(slots=True)
class PersistStats:
    """What the consumers of one node did (counts since they were bound)."""

    #: Replies stored (one per message answered by this node).
    stored: int = 0
    #: Messages skipped: a reply was stored for their id already.
    duplicates: int = 0
    #: Requests asked again after a retryable refusal or no reply in time.
    retries: int = 0
    #: Messages dropped: no request id, or an id answered for another request.
    dropped: int = 0
    #: Messages delivered again while still handled here (the consumer was made
    #: anew after a poll, or an in-progress ack was lost); not handled twice.
    redelivered: int = 0


class _Poke:
    """Wakes the consumers (``poll``): each waiter wakes on the pokes made while
    it waits; ``pending`` says a poke came since the consumer last started over."""

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.pending = False

    def poke(self) -> None:
        self.pending = True
        self.event.set()
        self.event = asyncio.Event()


@dataclass(slots=True)
class _Item:
    msg: Any  # nats-py's JetStream Msg: its newest delivery
    sequence: int  # in the stream
    request_id: str
    key: str | None
    body: bytes
    fingerprint: bytes
    outcome: bytes | None  # a reply to store without asking the node (a malformed body)


class _InFlight:
    """The messages one shard's consumer has taken and not acknowledged yet.

    Each key has a chain: a task that has its messages handled one after the
    other, in stream order, and takes on those of later fetches while it runs.
    More is fetched while fewer than ``batch`` messages are taken, so a long
    job holds back only its own key's later messages, never the next fetch
    (unless ``batch`` messages wait behind it).
    """

    def __init__(self) -> None:
        self.items: dict[int, _Item] = {}  # by stream sequence
        self.chains: dict[object, deque[_Item]] = {}
        self.freed = asyncio.Event()

    def done(self, item: _Item) -> None:
        del self.items[item.sequence]
        self.freed.set()


class PersistedConsumers:
    """The consumers of persisted messages on one node (see the module docstring):
    bound with :func:`serve_persisted`, they store each reply in :attr:`replies`."""

    def __init__(self, node: Node, settings: PersistSettings | None = None) -> None:
        self.node = node
        self.settings = settings or PersistSettings()
        self.replies = ReplyStore(node.transport, prefix=node.prefix, settings=self.settings)
        self.stats = PersistStats()
        self._js = jetstream_of(node.transport, "persisted messages")
        self._stream = stream_name(node.prefix)
        self._stream_ready = False
        self._pokes: dict[int, _Poke] = {}
        self._log = structlog.get_logger("clstr.persist").bind(node_id=node.node_id)

    def poll(self) -> None:
        """Have every local consumer read its shard's pending messages now: one
        waiting out a retry pause asks at once, and each starts again from the
        shard's unacknowledged messages (instead of waiting out ``ack_wait`` for
        those delivered and never acknowledged)."""
        for poke in self._pokes.values():
            poke.poke()

    @property
    def shards(self) -> list[int]:
        """The shards whose consumer runs on this node now."""
        return sorted(self._pokes)

    async def close(self) -> None:
        """Stop the consumers and unbind them (the node stopping does it too)."""
        await self.node.unbind(BINDING)

    # -- one shard --------------------------------------------------------------

    async def run(self, ctx: ShardContext) -> None:
        """The shard-bound task of ``ctx.shard``."""
        poke = self._pokes[ctx.shard] = _Poke()
        sub: Any = None
        flight = _InFlight()
        try:
            await self._ensure_stream()
            # Chains, stored replies and in-progress acks run while more is fetched.
            async with asyncio.TaskGroup() as work:
                work.create_task(self._keep_in_progress(ctx, flight))
                while not ctx.stopping.is_set():
                    if sub is None or poke.pending:
                        poke.pending = False
                        await _unsubscribe(sub)
                        sub = await self._subscribe(ctx.shard)
                    room = await self._room(ctx, poke, flight)
                    msgs = await self._fetch(sub, ctx, poke, room) if room else []
                    if msgs:
                        await self._take(ctx, poke, msgs, flight, work)
        finally:
            if self._pokes.get(ctx.shard) is poke:
                del self._pokes[ctx.shard]
            await _unsubscribe(sub)

    async def _ensure_stream(self) -> None:
        if not self._stream_ready:
            await ensure_stream(self._js, self.node.prefix, self.settings)
            self._stream_ready = True

    async def _subscribe(self, shard: int) -> Any:
        """The shard's durable consumer, made anew: the work-queue stream holds
        exactly the messages not acknowledged yet, so a new owner (or a restarted
        task) starts from all of them at once, also those delivered to an owner
        that died with them."""
        import nats.js.api as api
        import nats.js.errors

        durable = consumer_name(self.node.prefix, shard)
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await self._js.delete_consumer(self._stream, durable)
        config = api.ConsumerConfig(
            durable_name=durable,
            filter_subject=persist_subject(self.node.prefix, shard),
            deliver_policy=api.DeliverPolicy.ALL,
            ack_policy=api.AckPolicy.EXPLICIT,
            ack_wait=self.settings.ack_wait,
            max_deliver=-1,
        )
        await self._js.add_consumer(self._stream, config)
        return await self._js.pull_subscribe_bind(durable=durable, stream=self._stream)

    async def _room(self, ctx: ShardContext, poke: _Poke, flight: _InFlight) -> int:
        """How many messages to fetch: once fewer than ``batch`` are taken, what
        is left of it; 0 when told to stop or poked first."""
        while len(flight.items) >= self.settings.batch:
            if ctx.stopping.is_set() or poke.pending:
                return 0
            flight.freed.clear()
            await _first([flight.freed.wait(), ctx.stopping.wait(), poke.event.wait()])
        return self.settings.batch - len(flight.items)

    async def _fetch(self, sub: Any, ctx: ShardContext, poke: _Poke, count: int) -> list[Any]:
        """Up to ``count`` next messages (a long poll), or none when told to stop or
        poked.

        A fetch cut short may leave messages delivered to it unacknowledged:
        the consumer is made anew after a poke, and by the next owner after a
        stop, so they are delivered again at once."""
        fetch = asyncio.ensure_future(sub.fetch(count, timeout=self.settings.fetch_wait))
        await _first([fetch, ctx.stopping.wait(), poke.event.wait()])
        if fetch.cancelled():
            return []
        try:
            msgs: list[Any] = fetch.result()
        except TimeoutError:  # nats-py raises its own subclass, or asyncio's
            return []
        return msgs

    async def _take(
        self,
        ctx: ShardContext,
        poke: _Poke,
        msgs: Sequence[Any],
        flight: _InFlight,
        work: asyncio.TaskGroup,
    ) -> None:
        """Take fetched messages on: each new one to the end of its key's chain
        (started as a task of ``work`` when the key has none running)."""
        items: list[_Item] = []
        for msg in msgs:
            taken = flight.items.get(msg.metadata.sequence.stream)
            if taken is not None:
                # Delivered again while still handled here (the consumer made
                # anew after a poke, or an in-progress ack lost): not run again;
                # its acks go through the newest delivery from now on.
                taken.msg = msg
                self.stats.redelivered += 1
                continue
            item = self._item(ctx.shard, msg)
            if item is None:
                await msg.ack()  # no reply can ever be stored for it
            else:
                items.append(item)
        stored = await self.replies.get_many([item.request_id for item in items])
        for item in items:
            found = stored.get(item.request_id)
            if found is None:
                flight.items[item.sequence] = item
                chain_id = ("key", item.key) if item.key is not None else item.sequence
                chain = flight.chains.get(chain_id)
                if chain is not None:
                    chain.append(item)
                else:
                    flight.chains[chain_id] = deque([item])
                    work.create_task(self._chain(ctx, poke, flight, chain_id, work))
                continue
            if found.fingerprint != item.fingerprint and item.outcome is None:
                self.stats.dropped += 1
                self._log.warning(
                    "persisted message dropped: its request id was answered for another "
                    "request; send it under a new id",
                    request_id=item.request_id,
                    shard=ctx.shard,
                )
            else:
                self.stats.duplicates += 1
            await item.msg.ack()

    def _item(self, shard: int, msg: Any) -> _Item | None:
        """What to do with ``msg``; ``None``: drop it (it has no request id)."""
        header_id = (msg.headers or {}).get(MSG_ID_HEADER)
        sequence = msg.metadata.sequence.stream
        try:
            env = decode_request(msg.data, shard=shard, limits=self.node.limits)
        except BadRequestError as exc:
            if header_id is None:
                self._drop(shard, "a malformed body without a request id")
                return None
            return _Item(
                msg, sequence, header_id, None, msg.data, _NO_FINGERPRINT, error_reply_for(exc)
            )
        request_id = env.id or header_id
        if request_id is None:
            self._drop(shard, "no request id (neither the body's 'id' nor Nats-Msg-Id)")
            return None
        body = msg.data
        if env.id is None:
            body = encode_request(dataclasses.replace(env, id=request_id))
        outcome = None
        if env.stream:
            outcome = encode_error_reply(
                "bad_request",
                "BadRequestError",
                "a persisted message cannot ask for a streamed reply (field 's'); "
                "send it without a window",
            )
        return _Item(msg, sequence, request_id, env.key, body, fingerprint(env), outcome)

    def _drop(self, shard: int, why: str) -> None:
        self.stats.dropped += 1
        self._log.warning("persisted message dropped", reason=why, shard=shard)

    async def _chain(
        self,
        ctx: ShardContext,
        poke: _Poke,
        flight: _InFlight,
        chain_id: object,
        work: asyncio.TaskGroup,
    ) -> None:
        """Have one key's messages handled in order, those taken on meanwhile too;
        each reply is stored (and its message acknowledged) while the next message
        is already being handled."""
        chain = flight.chains[chain_id]
        try:
            while chain:
                reply = None if ctx.stopping.is_set() else await self._ask(ctx, poke, chain[0])
                if reply is None:
                    return  # the rest stays unacknowledged, in order, for the next owner
                work.create_task(self._store(ctx, poke, flight, chain.popleft(), reply))
        finally:
            del flight.chains[chain_id]

    async def _ask(self, ctx: ShardContext, poke: _Poke, item: _Item) -> bytes | None:
        """The outcome of ``item``: the node's reply, asked again under the same id
        after a retryable refusal; ``None`` when told to stop first."""
        if item.outcome is not None:
            return item.outcome
        subject = shard_subject(self.node.prefix, ctx.shard)
        while True:
            try:
                answer = await self.node.transport.request(
                    subject, item.body, self.settings.request_timeout
                )
            except (NoShardOwnerError, RequestTimeoutError):
                pass  # not served at the moment, or still running: ask again
            else:
                if not _retryable(answer):
                    return answer
            self.stats.retries += 1
            if not await self._pause(ctx, poke):
                return None

    async def _store(
        self, ctx: ShardContext, poke: _Poke, flight: _InFlight, item: _Item, reply: bytes
    ) -> None:
        """Store ``item``'s reply, then acknowledge it; left unacknowledged when told
        to stop first."""
        stored = StoredReply(item.request_id, item.fingerprint, reply)
        while True:
            try:
                if await self.replies.put(stored):
                    self.stats.stored += 1
                break
            except Exception as exc:
                if not _is_nats_error(exc):
                    raise
                self._log.warning(
                    "cannot store a reply yet; trying again",
                    request_id=item.request_id,
                    error=repr(exc),
                )
            if not await self._pause(ctx, poke):
                return
        await item.msg.ack()
        flight.done(item)

    async def _keep_in_progress(self, ctx: ShardContext, flight: _InFlight) -> None:
        """Every ``ack_wait / 3``, tell JetStream that each message taken is still
        being worked on: a job, or one waiting behind it on its key, may outlast
        ``ack_wait``, and must not be delivered again meanwhile."""
        while not ctx.stopping.is_set():
            await _first([ctx.stopping.wait()], timeout=self.settings.ack_wait / 3)
            for item in list(flight.items.values()):
                try:
                    await item.msg.in_progress()
                except Exception as exc:
                    if not _is_nats_error(exc):
                        raise

    async def _pause(self, ctx: ShardContext, poke: _Poke) -> bool:
        """Wait ``retry_pause`` (cut short by a poke); ``False`` when told to stop."""
        await _first([ctx.stopping.wait(), poke.event.wait()], timeout=self.settings.retry_pause)
        return not ctx.stopping.is_set()


def serve_persisted(node: Node, settings: PersistSettings | None = None) -> PersistedConsumers:
    """Consume the persisted messages of every shard ``node`` serves, from now on
    (before or after the node starts): one shard-bound task per shard, named
    ``persist``. Needs a NATS transport with JetStream."""
    consumers = PersistedConsumers(node, settings)
    node.bind(BINDING, consumers.run, grace=consumers.settings.grace)
    return consumers


async def _first(waits: Sequence[Awaitable[Any]], timeout: float | None = None) -> None:
    """Wait until the first of ``waits`` is done (or ``timeout`` seconds), then
    cancel the others and wait for them to end."""
    tasks = [asyncio.ensure_future(w) for w in waits]
    try:
        await asyncio.wait(tasks, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        await cancel_and_wait(tasks, insist=True)


def _retryable(reply: bytes) -> bool:
    """Whether ``reply`` is a refusal to ask again (it ran nothing: ``not_owner``,
    ``overloaded``); every other reply is the message's outcome."""
    try:
        decode_reply(reply)
    except RequestError as exc:
        return exc.retryable
    return False


def _is_nats_error(exc: BaseException) -> bool:
    import nats.errors

    return isinstance(exc, nats.errors.Error | TimeoutError)


async def _unsubscribe(sub: Any) -> None:
    if sub is not None:
        try:
            await sub.unsubscribe()
        except Exception as exc:  # the connection is closed, say
            structlog.get_logger("clstr.persist").debug("unsubscribe failed", error=repr(exc))
