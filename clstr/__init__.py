"""clstr: route keyed requests to the node that owns the key, over NATS.

The public API is what this module exports (``__all__``); every other name
is private and may change.
"""

from __future__ import annotations

from ._version import __version__ as __version__
from .client import (
    DEFAULT_RETRY,
    DEFAULT_TIMEOUT,
    Client,
    ClientState,
    EdgeClient,
    EdgeHealth,
    EdgeSettings,
    EdgeStatus,
    Endpoint,
    RetryPolicy,
    ScopedClient,
)
from .codec import DEFAULT_LIMITS, Limits, decode_payload, encode_payload, message_type
from .counters import Counter, LaxCounter, StrictCounter, serve_counters
from .entities import (
    Entity,
    EntityContext,
    KvStateStore,
    MemoryStateStore,
    ShardId,
    Sharding,
    StateStore,
    handles,
)
from .envelope import RESERVED_HEADER_PREFIX, Envelope, EnvelopeOption, with_header, with_ttl
from .errors import (
    BadRequestError,
    ClstrError,
    ConfigurationError,
    ConnectionFailedError,
    CounterFlushError,
    CounterFullError,
    CounterRangeError,
    CounterSessionLostError,
    DeadlineExceededError,
    EnvelopeExpiredError,
    HandlerTimeoutError,
    IdempotencyKeyReusedError,
    IdUnavailableError,
    InvalidCounterKeyError,
    InvalidIdError,
    KeyRequiredError,
    LifecycleError,
    LimitExceededError,
    MachineIdUnavailableError,
    MissingKeyError,
    NoHandlerError,
    NoShardOwnerError,
    NotOwnerError,
    OverloadedError,
    PayloadError,
    RemoteHandlerError,
    ReplyTooLargeError,
    RequestError,
    RequestInterruptedError,
    RequestTimeoutError,
    ReservedHeaderError,
    ShardOutOfRangeError,
    TransportClosedError,
    TransportError,
    WrongShardError,
)
from .handlers import Handler, KeyHandler, Router, current_stream
from .hashing import ShardMapper, assign_shards, owner_of, shard_for_key, shards_for_node
from .ids import (
    LocalMachineIds,
    MachineIdLease,
    Snowflake,
    SnowflakeParts,
    StaticMachineId,
    parse_snowflake,
)
from .metrics import Metrics, NoopMetrics, PrometheusMetrics
from .node import Node, NodeState, NodeStats
from .protocol import DEFAULT_PREFIX, NODE_INFO_TYPE, NodeInfo, shard_subject
from .tracing import NoopTracing, OpenTelemetryTracing, Tracing
from .transports import MemoryNetwork, MemoryTransport, Transport

__all__ = [
    # client side
    "Client",
    "ClientState",
    "ScopedClient",
    "DEFAULT_TIMEOUT",
    "RetryPolicy",
    "DEFAULT_RETRY",
    # one client over several clusters
    "EdgeClient",
    "EdgeSettings",
    "EdgeStatus",
    "EdgeHealth",
    "Endpoint",
    # server side
    "Node",
    "NodeInfo",
    "NodeState",
    "NodeStats",
    "NODE_INFO_TYPE",
    "DEFAULT_PREFIX",
    "shard_subject",
    "Handler",
    "Router",
    "KeyHandler",
    "current_stream",
    # entities, singletons, the sharding runner
    "Sharding",
    "ShardId",
    "Entity",
    "EntityContext",
    "handles",
    "StateStore",
    "KvStateStore",
    "MemoryStateStore",
    # counters
    "Counter",
    "StrictCounter",
    "LaxCounter",
    "serve_counters",
    # ids
    "Snowflake",
    "SnowflakeParts",
    "parse_snowflake",
    "MachineIdLease",
    "StaticMachineId",
    "LocalMachineIds",
    # envelopes and payloads
    "Envelope",
    "EnvelopeOption",
    "with_header",
    "with_ttl",
    "RESERVED_HEADER_PREFIX",
    "Limits",
    "DEFAULT_LIMITS",
    "message_type",
    "encode_payload",
    "decode_payload",
    # hashing
    "shard_for_key",
    "shards_for_node",
    "owner_of",
    "assign_shards",
    "ShardMapper",
    # transports
    "Transport",
    "MemoryTransport",
    "MemoryNetwork",
    # metrics
    "Metrics",
    "NoopMetrics",
    "PrometheusMetrics",
    # tracing
    "Tracing",
    "NoopTracing",
    "OpenTelemetryTracing",
    # errors
    "ClstrError",
    "ConfigurationError",
    "ShardOutOfRangeError",
    "ReservedHeaderError",
    "MissingKeyError",
    "LimitExceededError",
    "PayloadError",
    "LifecycleError",
    "InvalidIdError",
    "IdUnavailableError",
    "MachineIdUnavailableError",
    "InvalidCounterKeyError",
    "CounterRangeError",
    "CounterFullError",
    "CounterSessionLostError",
    "CounterFlushError",
    "TransportError",
    "TransportClosedError",
    "ConnectionFailedError",
    "RequestError",
    "NoShardOwnerError",
    "NotOwnerError",
    "EnvelopeExpiredError",
    "DeadlineExceededError",
    "HandlerTimeoutError",
    "RequestTimeoutError",
    "OverloadedError",
    "BadRequestError",
    "WrongShardError",
    "IdempotencyKeyReusedError",
    "ReplyTooLargeError",
    "RequestInterruptedError",
    "KeyRequiredError",
    "NoHandlerError",
    "RemoteHandlerError",
]
