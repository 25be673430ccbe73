"""The intake of a node: what happens to a message as it arrives.

Synchronous, on the transport's delivery path: decode, then the checks of
docs/protocol.md in their order (staleness, node info, the key's shard,
ownership, the request id, room in the queue); a message that passes them
all goes to the :class:`~clstr.node._dispatch.Dispatcher`'s queue, every
other one is answered at once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgpack
import structlog

from .._clock import monotonic
from ..codec import decode_request, encode_payload, encode_reply, error_reply_for
from ..envelope import Envelope
from ..errors import (
    BadRequestError,
    IdempotencyKeyReusedError,
    NotOwnerError,
    ReplyTooLargeError,
    WrongShardError,
)
from ..hashing import ShardCache, ShardMapper
from ..protocol import BATCH_TYPE, INTERRUPT_TYPE, NODE_INFO_TYPE, NodeInfo, fingerprint
from ._batch import BatchReplies, decode_batch, encode_batch_reply
from ._dispatch import Dispatcher
from ._lanes import ReplyTo
from ._state import Owner

__all__ = ["Intake"]


class Intake:
    """Takes a node's messages as they arrive (see the module docstring)."""

    def __init__(
        self,
        node: Owner,
        dispatch: Dispatcher,
        *,
        wall_clock: Callable[[], float],
        log: structlog.typing.FilteringBoundLogger,
    ) -> None:
        self._node = node
        self._dispatch = dispatch
        self._wall_clock = wall_clock
        self._log = log
        self._shard_of = ShardCache(ShardMapper(node.num_shards, node.seed))

    def on_message(self, shard: int, data: bytes, reply: str | None) -> None:
        """Take one message of ``shard`` (the transport's callback)."""
        node = self._node
        dispatch = self._dispatch
        try:
            env = decode_request(data, shard=shard, limits=node.limits)
        except BadRequestError as exc:
            dispatch.rejected("bad_request")
            self._log.debug("bad request", shard=shard, error=str(exc))
            dispatch.reply(reply, error_reply_for(exc))
            return
        # (Its deadline was just set from the TTL: only the sender's clock can
        # say that it is stale.)
        if env.ttl is not None and self._wall_clock() - env.created_at > env.ttl + node.clock_skew:
            # Only this copy's reply: a copy of the same id may be running.
            dispatch.rejected("expired")
            if node.traced:
                node.tracer.message_refused(env, monotonic(), "expired")
            dispatch.reply(reply, dispatch.expired_reply(env))
            return
        if env.type == BATCH_TYPE:
            self._batch(env, reply)
            return
        if env.type == NODE_INFO_TYPE:
            handler = node.handler
            types = getattr(handler, "message_types", None)
            entities = getattr(handler, "entity_counts", None)
            info = NodeInfo(
                node_id=node.node_id,
                shards=node.shards,
                message_types=list(types) if isinstance(types, list | tuple) else None,
                entities=dict(entities) if isinstance(entities, dict) else None,
            )
            dispatch.reply(reply, encode_reply(encode_payload(info)))
            return
        self._take(env, reply)

    def _take(self, env: Envelope, reply: ReplyTo) -> None:
        """The checks after decoding (the key's shard, interrupts, ownership, the
        request id, room in the queue), then the queue: for a message, and for
        each item of a batch."""
        node = self._node
        dispatch = self._dispatch
        shard = env.shard
        key = env.key
        if key is not None and self._shard_of[key] != shard:
            dispatch.rejected("wrong_shard")
            if node.traced:
                node.tracer.message_refused(env, monotonic(), "wrong_shard")
            dispatch.reply(reply, error_reply_for(self._wrong_shard(key, shard)))
            return
        if env.type == INTERRUPT_TYPE:
            dispatch.reply(reply, self._interrupt(env))
            return
        if not node.serving(shard):
            # Fenced, or a late delivery for a shard it no longer serves.
            dispatch.rejected("not_owner")
            if node.traced:
                node.tracer.message_refused(env, monotonic(), "not_owner")
            dispatch.reply(reply, error_reply_for(NotOwnerError(node.fence_reason(shard))))
            return
        request_id = env.id
        if request_id is not None:
            print_ = fingerprint(env)
            cached = dispatch.reply_cache.get(request_id)
            if cached is not None:
                if cached[1] != print_:
                    self._reused(env, reply)
                    return
                node.stats.reject("duplicate")
                if node.traced:
                    node.tracer.message_refused(env, monotonic(), "cached")
                dispatch.reply(reply, cached[0])
                return
            running = dispatch.in_flight.get(request_id)
            if running is not None:
                if running[0] != print_:
                    self._reused(env, reply)
                    return
                # A retry of a request still queued or running: answer both at once.
                if node.traced:
                    node.tracer.message_refused(env, monotonic(), "joined")
                if reply is not None:
                    running[1].append(reply)
                return
            if dispatch.queued >= node.max_pending and dispatch.full(env):
                self._overloaded(env, reply)
                return
            dispatch.in_flight[request_id] = (print_, [])
        elif dispatch.queued >= node.max_pending and dispatch.full(env):
            self._overloaded(env, reply)
            return
        dispatch.enqueue(env, reply)

    def _batch(self, env: Envelope, reply: str | None) -> None:
        """Take a batch (node/_batch.py): each item as a message of its own; one
        reply once every item has its own."""
        node = self._node
        dispatch = self._dispatch
        try:
            items = decode_batch(env, node.limits)
        except BadRequestError as exc:
            dispatch.rejected("bad_request")
            dispatch.reply(reply, error_reply_for(exc))
            return

        def answer(replies: list[bytes]) -> None:
            body = encode_reply(encode_batch_reply(node.node_id, node.shards, replies))
            if len(body) > node.transport.max_payload:
                dispatch.rejected("reply_too_large")
                body = error_reply_for(
                    ReplyTooLargeError(
                        f"the replies to a batch of {len(replies)} items make {len(body)} bytes, "
                        f"over the max_payload of {node.transport.max_payload}: the items ran; "
                        "send smaller batches"
                    )
                )
            dispatch.reply(reply, body)

        collect = BatchReplies(len(items), answer)
        for i, item in enumerate(items):
            self._take(item, collect.target(i))

    def _wrong_shard(self, key: str, shard: int) -> WrongShardError:
        node = self._node
        return WrongShardError(
            f"key {key[:64]!r} belongs to shard {self._shard_of[key]}, not {shard} "
            f"({node.num_shards} shards, seed {node.seed!r}); the sender's num_shards or "
            "seed differs from the node's: fix its settings"
        )

    def _overloaded(self, env: Envelope, reply: ReplyTo) -> None:
        if self._node.traced:
            self._node.tracer.message_refused(env, monotonic(), "overloaded")
        self._dispatch.overloaded(reply)

    def _reused(self, env: Envelope, reply: ReplyTo) -> None:
        """Refuse a request whose id names another request."""
        self._dispatch.rejected("id_reused")
        if self._node.traced:
            self._node.tracer.message_refused(env, monotonic(), "id_reused")
        message = (
            f"request id {env.id!r} was used before for another request (type, key, shard "
            "or payload differ); give each new request a new id"
        )
        self._dispatch.reply(reply, error_reply_for(IdempotencyKeyReusedError(message)))

    def _interrupt(self, env: Envelope) -> bytes:
        """Carry out an interrupt (docs/protocol.md): its payload names the target
        by request id (``id``), by fingerprint and ``ts`` (``fp``, ``ts``: a request
        without id), or as the key's current message (``current``). Replies with
        how many messages it interrupted."""
        try:
            target = msgpack.unpackb(env.data, raw=False, max_str_len=1024, max_bin_len=64)
            if not isinstance(target, dict):
                raise TypeError("the payload must be a map")
            match = _target(target)
        except Exception as exc:
            self._dispatch.rejected("bad_request")
            return error_reply_for(BadRequestError(f"bad interrupt: {exc}"))
        # An id or a fingerprint names one request whatever its key; `current`
        # means the key's own messages.
        any_key = target.get("current") is not True
        count = self._dispatch.interrupt(env.shard, env.key, match, any_key=any_key)
        return encode_reply(encode_payload(count))


def _target(target: dict[str, Any]) -> Callable[[Envelope], bool]:
    """The matcher of an interrupt's target map."""
    if isinstance(target.get("id"), str):
        request_id = target["id"]
        return lambda env: env.id == request_id
    if isinstance(target.get("fp"), bytes) and isinstance(target.get("ts"), int):
        print_, ts = target["fp"], target["ts"]
        return lambda env: int(env.created_at * 1000) == ts and fingerprint(env) == print_
    if target.get("current") is True:
        return lambda env: True
    raise ValueError("name the target: {id}, {fp, ts} or {current: true}")
