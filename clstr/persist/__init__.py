"""Persisted messages and stored replies: requests that outlive their caller and
their owner's crashes (docs/streams.md, the wire names in docs/protocol.md).

* :class:`PersistedClient` — ``send`` writes a v1 request to the JetStream
  stream ``<prefix>_persist`` (subject ``<prefix>.persist.<shard>``, header
  ``Nats-Msg-Id``) and returns its request id; ``replies_for`` and
  ``await_reply`` read its stored reply, from any process.
* :func:`serve_persisted` — a node consumes the persisted messages of the shards
  it serves (one shard-bound task per shard, through the shard's durable
  consumer) and has each handled by its own message path, at least once,
  deduplicated by request id; :class:`PersistedConsumers` is what it returns
  (``poll`` reads pending messages now).
* :class:`ReplyStore` — the replies, in the KV bucket ``<prefix>_replies``.
"""

from __future__ import annotations

from ._client import PersistedClient
from ._consumer import PersistedConsumers, PersistStats, serve_persisted
from ._ids import new_request_id
from ._names import (
    MSG_ID_HEADER,
    PersistSettings,
    consumer_name,
    persist_subject,
    reply_bucket,
    stream_name,
)
from ._replies import ReplyStore, StoredReply

__all__ = [
    "PersistedClient",
    "PersistSettings",
    "serve_persisted",
    "PersistedConsumers",
    "PersistStats",
    "ReplyStore",
    "StoredReply",
    "new_request_id",
    "MSG_ID_HEADER",
    "stream_name",
    "persist_subject",
    "consumer_name",
    "reply_bucket",
]
