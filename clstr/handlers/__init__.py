"""Handlers: what a node runs for each message.

* :data:`Handler` is the shape of every handler: ``async (Envelope) -> bytes | None``.
* :class:`Router` dispatches by message type, with typed (msgpack dataclass) payloads.
* :class:`KeyHandler` keeps one handler per key (an actor-like entity with
  its own state), bounded by an LRU and evicted when idle.

A handler object may also define ``async on_start()``, ``async on_stop()`` and
``async on_shard_released(shard)``; the node calls them when it starts, stops,
and hands a shard to another node.
"""

from __future__ import annotations

from ._keyed import EvictHook, KeyHandler
from ._router import (
    Handler,
    Router,
    decode_message,
    shard_released,
    start_handler,
    stop_handler,
)
from ._stream import ChunkSink, current_stream, stream_to, streaming

__all__ = [
    "Handler",
    "Router",
    "KeyHandler",
    "EvictHook",
    "decode_message",
    "ChunkSink",
    "current_stream",
    "stream_to",
    "streaming",
    "start_handler",
    "stop_handler",
    "shard_released",
]
