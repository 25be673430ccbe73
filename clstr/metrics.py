"""Metrics: a small protocol, a no-op default and a Prometheus implementation.

Metric names and labels follow the Go original (``clstr_cluster_*``) so that
dashboards carry over; clstr adds ``clstr_cluster_request_retries_total``,
``clstr_cluster_envelopes_rejected_total``
(by reason: ``expired``, ``overloaded``, ``bad_request``, ``not_owner``),
``clstr_cluster_pending_messages``, the node's own view of requests
(``clstr_cluster_node_requests_total``,
``clstr_cluster_node_request_duration_seconds``: queue wait included) and
event-loop stalls (``clstr_cluster_event_loop_stalls_total``,
``clstr_cluster_event_loop_stalled_seconds_total``) and lax counters' flushes
(``clstr_counter_*``, docs/counters.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

__all__ = ["Metrics", "NoopMetrics", "PrometheusMetrics", "NOOP_METRICS"]


class Metrics(Protocol):
    """What clients and nodes report. Every method must be cheap and must not raise."""

    def request_completed(self, message_type: str, success: bool, duration: float) -> None:
        """A client request ended (``duration`` in seconds)."""

    def notify_completed(self, message_type: str, success: bool) -> None:
        """A client notify was sent (or failed to be)."""

    def request_retried(self, message_type: str, reason: str) -> None:
        """A client request is sent again after a retryable error (its wire code)."""

    def transport_error(self, error_type: str) -> None:
        """A client call failed in transport: ``no_subscriber``, ``timeout``, ``ttl_expired``..."""

    def handler_completed(self, message_type: str, success: bool, duration: float) -> None:
        """A node's handler finished (``duration`` in seconds)."""

    def handlers_active(self, node_id: str, count: int) -> None:
        """How many handlers a node runs right now."""

    def shards_owned(self, node_id: str, count: int) -> None:
        """How many shards a node serves."""

    def envelope_rejected(self, reason: str) -> None:
        """A node refused an envelope without running a handler."""

    def pending_messages(self, node_id: str, count: int) -> None:
        """How many messages wait in a node's queue."""

    def request_served(self, message_type: str, success: bool, duration: float) -> None:
        """A node answered a message its handler ran for; ``duration`` is the time
        from its arrival to the answer (queue wait plus handler), in seconds."""

    def loop_stalled(self, node_id: str, duration: float) -> None:
        """A node's event loop was blocked for ``duration`` seconds (a handler
        doing blocking work); see ``Node(loop_stall_threshold=...)``."""

    def entities_active(self, node_id: str, entity_type: str, count: int) -> None:
        """A node holds ``count`` live instances of ``entity_type`` now."""

    def counter_flushed(self, namespace: str, messages: int, keys: int) -> None:
        """A lax counter's flush sent ``messages`` batches carrying deltas of ``keys`` keys."""

    def counter_unflushed(self, namespace: str, keys: int) -> None:
        """A lax counter holds unflushed (or unacknowledged) deltas of ``keys`` keys now."""

    def counter_refused(self, namespace: str) -> None:
        """A lax counter refused an increment of a new key: it holds its maximum."""

    def counter_dropped(self, namespace: str, reason: str) -> None:
        """A lax counter gave up a delta the cluster will never take (``reason``:
        the error code, e.g. a total out of range)."""


class NoopMetrics:
    """Records nothing: every :class:`Metrics` method does nothing. The default
    (a node or client given it skips the calls altogether)."""

    def request_completed(self, message_type: str, success: bool, duration: float) -> None:
        pass

    def notify_completed(self, message_type: str, success: bool) -> None:
        pass

    def request_retried(self, message_type: str, reason: str) -> None:
        pass

    def transport_error(self, error_type: str) -> None:
        pass

    def handler_completed(self, message_type: str, success: bool, duration: float) -> None:
        pass

    def handlers_active(self, node_id: str, count: int) -> None:
        pass

    def shards_owned(self, node_id: str, count: int) -> None:
        pass

    def envelope_rejected(self, reason: str) -> None:
        pass

    def pending_messages(self, node_id: str, count: int) -> None:
        pass

    def request_served(self, message_type: str, success: bool, duration: float) -> None:
        pass

    def loop_stalled(self, node_id: str, duration: float) -> None:
        pass

    def entities_active(self, node_id: str, entity_type: str, count: int) -> None:
        pass

    def counter_flushed(self, namespace: str, messages: int, keys: int) -> None:
        pass

    def counter_unflushed(self, namespace: str, keys: int) -> None:
        pass

    def counter_refused(self, namespace: str) -> None:
        pass

    def counter_dropped(self, namespace: str, reason: str) -> None:
        pass


NOOP_METRICS = NoopMetrics()

_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class PrometheusMetrics:
    """Prometheus metrics registered on the registry you give (never the global one
    unless you pass it). Each :class:`Metrics` method feeds the metric named in
    docs/operations.md."""

    def __init__(self, registry: CollectorRegistry) -> None:
        # Imported here: a process with the no-op metrics does not pay for
        # prometheus_client (about 30 ms of start-up and 2 MiB).
        from prometheus_client import Counter, Gauge, Histogram

        self.registry = registry
        self._request_duration = Histogram(
            "clstr_cluster_request_duration_seconds",
            "Client request latency in seconds",
            ["message_type"],
            registry=registry,
            buckets=_BUCKETS,
        )
        self._requests = Counter(
            "clstr_cluster_requests",
            "Total number of client requests",
            ["message_type", "success"],
            registry=registry,
        )
        self._notifies = Counter(
            "clstr_cluster_notifies",
            "Total number of client notifications",
            ["message_type", "success"],
            registry=registry,
        )
        self._retries = Counter(
            "clstr_cluster_request_retries",
            "Client requests sent again after a retryable error, by reason",
            ["message_type", "reason"],
            registry=registry,
        )
        self._transport_errors = Counter(
            "clstr_cluster_transport_errors",
            "Transport errors by type",
            ["error_type"],
            registry=registry,
        )
        self._handler_duration = Histogram(
            "clstr_cluster_handler_duration_seconds",
            "Handler execution time in seconds",
            ["message_type"],
            registry=registry,
            buckets=_BUCKETS,
        )
        self._handlers = Counter(
            "clstr_cluster_handlers",
            "Handlers executed",
            ["message_type", "success"],
            registry=registry,
        )
        self._handlers_active = Gauge(
            "clstr_cluster_handlers_active",
            "Handlers running now",
            ["node_id"],
            registry=registry,
        )
        self._shards_owned = Gauge(
            "clstr_cluster_shards_owned",
            "Shards served by the node",
            ["node_id"],
            registry=registry,
        )
        self._rejected = Counter(
            "clstr_cluster_envelopes_rejected",
            "Envelopes refused before a handler ran, by reason",
            ["reason"],
            registry=registry,
        )
        self._pending = Gauge(
            "clstr_cluster_pending_messages",
            "Messages waiting in the node's queue",
            ["node_id"],
            registry=registry,
        )
        self._served_duration = Histogram(
            "clstr_cluster_node_request_duration_seconds",
            "Time from a message's arrival at the node to its answer (queue wait and handler)",
            ["message_type"],
            registry=registry,
            buckets=_BUCKETS,
        )
        self._served = Counter(
            "clstr_cluster_node_requests",
            "Messages a node ran a handler for, by outcome",
            ["message_type", "success"],
            registry=registry,
        )
        self._stalls = Counter(
            "clstr_cluster_event_loop_stalls",
            "Times a node's event loop was blocked past the stall threshold",
            ["node_id"],
            registry=registry,
        )
        self._entities = Gauge(
            "clstr_cluster_entities_active",
            "Live entity instances on the node, by entity type",
            ["node_id", "entity_type"],
            registry=registry,
        )
        self._stalled = Counter(
            "clstr_cluster_event_loop_stalled_seconds",
            "Seconds a node's event loop spent blocked past the stall threshold",
            ["node_id"],
            registry=registry,
        )
        self._counter_messages = Counter(
            "clstr_counter_flush_messages",
            "Batch messages sent by lax counters' flushes",
            ["namespace"],
            registry=registry,
        )
        self._counter_keys = Counter(
            "clstr_counter_flushed_keys",
            "Keys whose deltas lax counters' flushes carried",
            ["namespace"],
            registry=registry,
        )
        self._counter_unflushed = Gauge(
            "clstr_counter_unflushed_keys",
            "Keys with deltas a lax counter has not had acknowledged yet",
            ["namespace"],
            registry=registry,
        )
        self._counter_refused = Counter(
            "clstr_counter_refused",
            "Increments of new keys a lax counter refused, holding its maximum of keys",
            ["namespace"],
            registry=registry,
        )
        self._counter_dropped = Counter(
            "clstr_counter_dropped",
            "Deltas a lax counter gave up because the cluster refuses them for good",
            ["namespace", "reason"],
            registry=registry,
        )

    def request_completed(self, message_type: str, success: bool, duration: float) -> None:
        self._request_duration.labels(message_type).observe(duration)
        self._requests.labels(message_type, _flag(success)).inc()

    def notify_completed(self, message_type: str, success: bool) -> None:
        self._notifies.labels(message_type, _flag(success)).inc()

    def request_retried(self, message_type: str, reason: str) -> None:
        self._retries.labels(message_type, reason).inc()

    def transport_error(self, error_type: str) -> None:
        self._transport_errors.labels(error_type).inc()

    def handler_completed(self, message_type: str, success: bool, duration: float) -> None:
        self._handler_duration.labels(message_type).observe(duration)
        self._handlers.labels(message_type, _flag(success)).inc()

    def handlers_active(self, node_id: str, count: int) -> None:
        self._handlers_active.labels(node_id).set(count)

    def shards_owned(self, node_id: str, count: int) -> None:
        self._shards_owned.labels(node_id).set(count)

    def envelope_rejected(self, reason: str) -> None:
        self._rejected.labels(reason).inc()

    def pending_messages(self, node_id: str, count: int) -> None:
        self._pending.labels(node_id).set(count)

    def request_served(self, message_type: str, success: bool, duration: float) -> None:
        self._served_duration.labels(message_type).observe(duration)
        self._served.labels(message_type, _flag(success)).inc()

    def loop_stalled(self, node_id: str, duration: float) -> None:
        self._stalls.labels(node_id).inc()
        self._stalled.labels(node_id).inc(duration)

    def entities_active(self, node_id: str, entity_type: str, count: int) -> None:
        self._entities.labels(node_id, entity_type).set(count)

    def counter_flushed(self, namespace: str, messages: int, keys: int) -> None:
        self._counter_messages.labels(namespace).inc(messages)
        self._counter_keys.labels(namespace).inc(keys)

    def counter_unflushed(self, namespace: str, keys: int) -> None:
        self._counter_unflushed.labels(namespace).set(keys)

    def counter_refused(self, namespace: str) -> None:
        self._counter_refused.labels(namespace).inc()

    def counter_dropped(self, namespace: str, reason: str) -> None:
        self._counter_dropped.labels(namespace, reason).inc()


def _flag(success: bool) -> str:
    return "true" if success else "false"
