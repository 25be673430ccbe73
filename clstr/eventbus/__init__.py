"""The event bus: sharded non-blocking ingestion, bounded rings with backpressure,
batched dispatch to an adapter (JetStream, NATS subjects, memory, no-op), merged
polling with cursors, distributed consumption on clstr nodes, and scaling.

See docs/eventbus.md.
"""

from __future__ import annotations

from ._adapter import Adapter, NatsSubjectsAdapter, NoopAdapter, bus_subject
from ._bus import MAX_KEY_LENGTH, MAX_TYPE_LENGTH, BusState, EventBus
from ._checkpoints import (
    Checkpoint,
    CheckpointConflictError,
    CheckpointStore,
    KvCheckpoints,
    MemoryCheckpoints,
    checkpoints_bucket,
)
from ._config import Backpressure, BatchConfig, BusConfig, DispatchRetry
from ._consumer import BusConsumer, ConsumerSettings, ConsumerStats, EventHandler, cluster_shard_of
from ._errors import (
    AdapterBackpressureError,
    AdapterConnectionError,
    AdapterError,
    AdapterSerializationError,
    AdapterShutdownError,
    BackpressureError,
    ConsumeError,
    ConsumerAdapterError,
    EventBusError,
    EventSerializationError,
    FatalAdapterError,
    IngestError,
    InvalidCursorError,
    InvalidFilterError,
    SampledError,
    ShuttingDownError,
    TransientAdapterError,
    UnroutedError,
)
from ._event import Event, Frame, Position, StoredEvent, decode_frame, encode_frames
from ._jetstream import JetStreamAdapter, JetStreamLog, stream_name
from ._log import EventLog, FrameBatch, StoredFrame
from ._memory import MemoryAdapter, MemoryLog
from ._poll import BusReader
from ._query import EventFilter, Ordering, PollRequest, PollResponse
from ._routing import MAX_BUS_SHARDS
from ._scaling import ScalingAction, ScalingPolicy, ScalingSignals, ScalingSuggestion
from ._stats import BusStats, ShardStats

__all__ = [
    # the bus
    "EventBus",
    "BusState",
    "BusConfig",
    "BatchConfig",
    "Backpressure",
    "DispatchRetry",
    "MAX_BUS_SHARDS",
    "MAX_KEY_LENGTH",
    "MAX_TYPE_LENGTH",
    # events
    "Event",
    "StoredEvent",
    "Position",
    # polling
    "BusReader",
    "PollRequest",
    "PollResponse",
    "EventFilter",
    "Ordering",
    # stats and scaling
    "BusStats",
    "ShardStats",
    "ScalingPolicy",
    "ScalingSuggestion",
    "ScalingSignals",
    "ScalingAction",
    # distributed consumption
    "BusConsumer",
    "ConsumerSettings",
    "ConsumerStats",
    "EventHandler",
    "cluster_shard_of",
    "Checkpoint",
    "CheckpointStore",
    "KvCheckpoints",
    "MemoryCheckpoints",
    "CheckpointConflictError",
    "checkpoints_bucket",
    # adapters and logs
    "Adapter",
    "NoopAdapter",
    "NatsSubjectsAdapter",
    "JetStreamAdapter",
    "JetStreamLog",
    "stream_name",
    "MemoryAdapter",
    "MemoryLog",
    "EventLog",
    "StoredFrame",
    "FrameBatch",
    "Frame",
    "bus_subject",
    "encode_frames",
    "decode_frame",
    # errors
    "EventBusError",
    "IngestError",
    "BackpressureError",
    "SampledError",
    "UnroutedError",
    "ShuttingDownError",
    "EventSerializationError",
    "ConsumeError",
    "ConsumerAdapterError",
    "InvalidCursorError",
    "InvalidFilterError",
    "AdapterError",
    "TransientAdapterError",
    "AdapterBackpressureError",
    "FatalAdapterError",
    "AdapterConnectionError",
    "AdapterShutdownError",
    "AdapterSerializationError",
]
