"""The node side of persisted messages: one consumer per served shard.

Each consumer is a shard-bound task of the node (``Node.bind``), so it runs
on the one node that serves its shard, is stopped before the shard is
released and when the node is fenced, and starts on the next owner. It reads
the shard's messages through the shard's durable pull consumer and, for each,
in stream order per key:

1. skips it when the reply store holds a reply for its id already (a
   duplicate: redelivered after a crash, or published again after the
   stream's duplicate window);
2. sends its body, unchanged, as a request to the shard's subject, so the
   node's own message path handles it (intake checks, the reply cache,
   per-key order, deadlines, interrupts) — the consumer adds no second path;
3. stores the reply (a success or a kept error) under the request id;
4. acknowledges it (the work-queue stream then drops it).

A crash between 2 and 4 delivers the message again to the next owner: at
least once; the reply store (step 1) and the application's conditional
writes make it once in effect. Retryable refusals (``not_owner``,
``overloaded``, no owner, no reply in time) are asked again under the same id
(the node answers a retry from its reply cache, or joins the running one).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections import defaultdict
from collections.abc import Sequence
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
    msg: Any  # nats-py's JetStream Msg
    request_id: str
    key: str | None
    body: bytes
    fingerprint: bytes
    outcome: bytes | None  # a reply to store without asking the node (a malformed body)


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
        try:
            await self._ensure_stream()
            # Replies are stored while the next batch is fetched and handled.
            async with asyncio.TaskGroup() as stores:
                while not ctx.stopping.is_set():
                    if sub is None or poke.pending:
                        poke.pending = False
                        await _unsubscribe(sub)
                        sub = await self._subscribe(ctx.shard)
                    msgs = await self._fetch(sub, ctx, poke)
                    if msgs:
                        await self._handle(ctx, poke, msgs, stores)
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

    async def _fetch(self, sub: Any, ctx: ShardContext, poke: _Poke) -> list[Any]:
        """The next messages (a long poll), or none when told to stop or poked.

        A fetch cut short may leave messages delivered to it unacknowledged:
        the consumer is made anew after a poke, and by the next owner after a
        stop, so they are delivered again at once."""
        fetch = asyncio.ensure_future(
            sub.fetch(self.settings.batch, timeout=self.settings.fetch_wait)
        )
        stop = asyncio.ensure_future(ctx.stopping.wait())
        poked = asyncio.ensure_future(poke.event.wait())
        try:
            await asyncio.wait({fetch, stop, poked}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            await cancel_and_wait([stop, poked, fetch], insist=True)
        if fetch.cancelled():
            return []
        try:
            msgs: list[Any] = fetch.result()
        except TimeoutError:  # nats-py raises its own subclass, or asyncio's
            return []
        return msgs

    async def _handle(
        self, ctx: ShardContext, poke: _Poke, msgs: Sequence[Any], stores: asyncio.TaskGroup
    ) -> None:
        """Have a batch handled: one key's messages one after the other, in stream
        order; different keys at once; their replies stored by tasks of ``stores``."""
        items: list[_Item] = []
        for msg in msgs:
            item = self._item(ctx.shard, msg)
            if item is None:
                await msg.ack()  # no reply can ever be stored for it
            else:
                items.append(item)
        stored = await self.replies.get_many([item.request_id for item in items])
        chains: dict[object, list[_Item]] = defaultdict(list)
        for n, item in enumerate(items):
            found = stored.get(item.request_id)
            if found is None:
                chains[("key", item.key) if item.key is not None else n].append(item)
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
        async with asyncio.TaskGroup() as group:
            for chain in chains.values():
                group.create_task(self._chain(ctx, poke, chain, stores))

    def _item(self, shard: int, msg: Any) -> _Item | None:
        """What to do with ``msg``; ``None``: drop it (it has no request id)."""
        header_id = (msg.headers or {}).get(MSG_ID_HEADER)
        try:
            env = decode_request(msg.data, shard=shard, limits=self.node.limits)
        except BadRequestError as exc:
            if header_id is None:
                self._drop(shard, "a malformed body without a request id")
                return None
            return _Item(msg, header_id, None, msg.data, _NO_FINGERPRINT, error_reply_for(exc))
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
        return _Item(msg, request_id, env.key, body, fingerprint(env), outcome)

    def _drop(self, shard: int, why: str) -> None:
        self.stats.dropped += 1
        self._log.warning("persisted message dropped", reason=why, shard=shard)

    async def _chain(
        self, ctx: ShardContext, poke: _Poke, chain: list[_Item], stores: asyncio.TaskGroup
    ) -> None:
        """Have one key's messages handled in order; each reply is stored (and its
        message acknowledged) while the next message is already being handled."""
        for item in chain:
            reply = None if ctx.stopping.is_set() else await self._ask(ctx, poke, item)
            if reply is None:
                return  # the rest stays unacknowledged, in order, for the next owner
            stores.create_task(self._store(ctx, poke, item, reply))

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
            if not await self._pause(ctx, poke, item):
                return None

    async def _store(self, ctx: ShardContext, poke: _Poke, item: _Item, reply: bytes) -> None:
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
            if not await self._pause(ctx, poke, item):
                return
        await item.msg.ack()

    async def _pause(self, ctx: ShardContext, poke: _Poke, item: _Item) -> bool:
        """Wait ``retry_pause`` (cut short by a poke); ``False`` when told to stop."""
        # Still being worked on: not to be delivered again meanwhile.
        try:
            await item.msg.in_progress()
        except Exception as exc:
            if not _is_nats_error(exc):
                raise
        stop = asyncio.ensure_future(ctx.stopping.wait())
        poked = asyncio.ensure_future(poke.event.wait())
        try:
            await asyncio.wait(
                {stop, poked},
                timeout=self.settings.retry_pause,
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            await cancel_and_wait([stop, poked], insist=True)
        return not ctx.stopping.is_set()


def serve_persisted(node: Node, settings: PersistSettings | None = None) -> PersistedConsumers:
    """Consume the persisted messages of every shard ``node`` serves, from now on
    (before or after the node starts): one shard-bound task per shard, named
    ``persist``. Needs a NATS transport with JetStream."""
    consumers = PersistedConsumers(node, settings)
    node.bind(BINDING, consumers.run, grace=consumers.settings.grace)
    return consumers


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
