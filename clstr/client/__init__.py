"""The client layer: hashes keys to shards, builds envelopes, sends, maps errors;
and :class:`EdgeClient`, one client over several clusters (the closest healthy
one, with one failover)."""

from __future__ import annotations

from ._batch import BatchItem, BatchReply, send_batch
from ._client import DEFAULT_TIMEOUT, DEFAULT_WINDOW, Client, ClientState, ScopedClient
from ._edges import EdgeClient, EdgeHealth, EdgeSettings, EdgeStatus, Endpoint
from ._retry import DEFAULT_RETRY, RetryPolicy

__all__ = [
    "Client",
    "ClientState",
    "ScopedClient",
    "RetryPolicy",
    "DEFAULT_RETRY",
    "DEFAULT_TIMEOUT",
    "DEFAULT_WINDOW",
    # batches: keyed messages for many shards of one node in one message
    "BatchItem",
    "BatchReply",
    "send_batch",
    "EdgeClient",
    "EdgeSettings",
    "EdgeStatus",
    "EdgeHealth",
    "Endpoint",
]
