"""Tracing: a small protocol, a no-op default and an OpenTelemetry implementation.

A client given a :class:`Tracing` starts a span per request (its retries
included), notification and stream, and sends the span's W3C Trace Context in
reserved headers (``x-clstr-traceparent``, ``x-clstr-tracestate``, and
``x-clstr-attempt`` from the second attempt on; docs/protocol.md). A node
given one continues the trace: a ``clstr.queue`` span from a message's arrival
to its handler's start (or to its refusal) and a ``clstr.handle`` span for the
handler, both children of the sender's span, and a ``clstr.shard`` span for
each time it owns a shard, which carries the node's events (fenced, unfenced,
handoff, shard-bound tasks) and to which the message spans link.

The default, :data:`NOOP_TRACING`, is never called: clients and nodes check
for it once and keep their untraced path (docs/observability.md measures it).
:class:`OpenTelemetryTracing` imports ``opentelemetry`` (the ``tracing``
extra: ``pip install clstr[tracing]``) only when it is built.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Final, Protocol

from blake3 import blake3

from ._clock import monotonic
from ._version import __version__
from .envelope import ATTEMPT_HEADER, TRACEPARENT_HEADER, TRACESTATE_HEADER, Envelope
from .errors import RequestError

if TYPE_CHECKING:
    from opentelemetry.trace import Span, TracerProvider

__all__ = [
    "AttributeValue",
    "CallSpan",
    "HandlerSpan",
    "NodeTracing",
    "Tracing",
    "NoopTracing",
    "NOOP_TRACING",
    "OpenTelemetryTracing",
    "key_hash",
    "outcome",
]

#: What a span attribute may hold here.
AttributeValue = str | int | float | bool


def key_hash(key: str) -> str:
    """The ``clstr.key_hash`` attribute of ``key``: the first 8 bytes of BLAKE3 of
    its UTF-8 bytes, in hex (16 digits). The same on every host and in every
    language, so a reader who knows a key can find its spans; not anonymous
    (a short or guessable key can be found by trying)."""
    return blake3(key.encode()).digest(8).hex()


def outcome(error: BaseException | None, other: str = "error") -> str:
    """The ``clstr.outcome`` of a call or a handler that ended with ``error``:
    ``ok``, the wire code of a :class:`~clstr.RequestError`, ``cancelled``, or
    ``other`` for any other exception (its class is in ``clstr.error_type``): a
    client's ``error``, a handler's ``handler_error`` (what its caller gets)."""
    if error is None:
        return "ok"
    if isinstance(error, RequestError):
        return error.code
    if isinstance(error, asyncio.CancelledError):
        return "cancelled"
    return other


class CallSpan(Protocol):
    """The span of one client call: a request (with its retries), a notification
    or a stream. Every method must be cheap and must not raise."""

    def headers(self, attempt: int) -> Mapping[str, str]:
        """The reserved headers that carry this span's context on attempt
        ``attempt`` (1 for the first send): empty when there is nothing to send."""
        ...

    def retry(self, attempt: int, code: str, backoff: float) -> None:
        """Attempt ``attempt`` failed with the retryable ``code``; the next one is
        sent after ``backoff`` seconds."""

    def event(self, name: str, attributes: Mapping[str, AttributeValue] | None = None) -> None:
        """Something happened to the call (``clstr.interrupt``, say)."""

    def end(self, error: BaseException | None) -> None:
        """The call ended, with ``error`` or without (``None``)."""


class HandlerSpan(Protocol):
    """The span of one handler run on a node (current while the handler runs)."""

    def end(self, error: BaseException | None) -> None:
        """The handler ended, with ``error`` (what its caller is answered) or not."""


class NodeTracing(Protocol):
    """What one node reports (from :meth:`Tracing.for_node`). ``arrived`` is the
    message's arrival on clstr's monotonic clock (``clstr._clock.monotonic``)."""

    def handler_started(self, env: Envelope, arrived: float, answered: bool) -> HandlerSpan:
        """``env``'s handler starts now: its queue wait ends. ``answered``: the
        sender waits for a reply (a request or a stream, not a notification)."""
        ...

    def message_refused(self, env: Envelope, arrived: float, code: str) -> None:
        """``env`` was answered without a handler run: refused with ``code``
        (``expired``, ``not_owner``...), or ``cached`` (a kept reply) or
        ``joined`` (a retry of a request still running)."""

    def event(self, kind: str, shard: int | None, attributes: Mapping[str, AttributeValue]) -> None:
        """A node event (``kind`` is a :class:`~clstr.node.NodeEventKind` value, or
        ``shard_releasing`` when a release starts draining)."""


class Tracing(Protocol):
    """Where clients and nodes report their spans (see the module docstring)."""

    def start_call(self, kind: str, message_type: str, shard: int, key: str | None) -> CallSpan:
        """Start the span of a client call; ``kind`` is ``request``, ``notify``
        or ``stream``."""
        ...

    def for_node(self, node_id: str, prefix: str) -> NodeTracing:
        """What node ``node_id`` (serving subjects under ``prefix``) reports to."""
        ...


class _NoopSpan:
    def headers(self, attempt: int) -> Mapping[str, str]:
        return {}

    def retry(self, attempt: int, code: str, backoff: float) -> None:
        pass

    def event(self, name: str, attributes: Mapping[str, AttributeValue] | None = None) -> None:
        pass

    def end(self, error: BaseException | None) -> None:
        pass


_NOOP_SPAN: Final = _NoopSpan()


class _NoopNodeTracing:
    def handler_started(self, env: Envelope, arrived: float, answered: bool) -> HandlerSpan:
        return _NOOP_SPAN

    def message_refused(self, env: Envelope, arrived: float, code: str) -> None:
        pass

    def event(self, kind: str, shard: int | None, attributes: Mapping[str, AttributeValue]) -> None:
        pass


_NOOP_NODE: Final = _NoopNodeTracing()


class NoopTracing:
    """Traces nothing. The default: a client or node given it (or any instance of
    it) never calls it, and sends and reads no trace headers."""

    def start_call(self, kind: str, message_type: str, shard: int, key: str | None) -> CallSpan:
        return _NOOP_SPAN

    def for_node(self, node_id: str, prefix: str) -> NodeTracing:
        return _NOOP_NODE


NOOP_TRACING: Final = NoopTracing()


# -- OpenTelemetry ---------------------------------------------------------------

_CALL_NAMES: Final = {
    "request": "clstr.request",
    "notify": "clstr.notify",
    "stream": "clstr.stream",
}


def _wall_ns(arrived: float) -> tuple[int, int]:
    """(arrival, now) in epoch nanoseconds, from a monotonic arrival time."""
    now = time.time_ns()
    return now - int((monotonic() - arrived) * 1e9), now


class OpenTelemetryTracing:
    """Spans through the OpenTelemetry API (``pip install clstr[tracing]``): the
    tracer of ``tracer_provider``, or of the global provider when ``None`` (set
    it with the SDK's ``trace.set_tracer_provider``). Keys are recorded as
    ``clstr.key_hash`` (:func:`key_hash`), and as ``clstr.key`` only with
    ``record_keys=True``.

    Trace context travels in W3C format whatever propagator the application
    configured globally, so that nodes and clients of every language agree.
    Raises :class:`ImportError` (naming the extra) when ``opentelemetry-api``
    is not installed.
    """

    def __init__(
        self, tracer_provider: TracerProvider | None = None, *, record_keys: bool = False
    ) -> None:
        try:
            from opentelemetry import trace
            from opentelemetry.context import Context, attach, detach
            from opentelemetry.trace.propagation.tracecontext import (
                TraceContextTextMapPropagator,
            )
        except ImportError as exc:  # pragma: no cover - the dev extra installs it
            raise ImportError(
                "OpenTelemetryTracing needs opentelemetry-api: pip install 'clstr[tracing]'"
            ) from exc
        self.record_keys = record_keys
        self._tracer = trace.get_tracer("clstr", __version__, tracer_provider=tracer_provider)
        self._trace = trace
        self._propagator = TraceContextTextMapPropagator()
        self._root = Context
        self._attach = attach
        self._detach = detach

    def _key_attributes(self, attributes: dict[str, Any], key: str | None) -> None:
        if key is not None:
            attributes["clstr.key_hash"] = key_hash(key)
            if self.record_keys:
                attributes["clstr.key"] = key

    def start_call(self, kind: str, message_type: str, shard: int, key: str | None) -> CallSpan:
        trace = self._trace
        attributes: dict[str, Any] = {"clstr.message_type": message_type, "clstr.shard": shard}
        self._key_attributes(attributes, key)
        span = self._tracer.start_span(
            _CALL_NAMES.get(kind, f"clstr.{kind}"),
            kind=trace.SpanKind.PRODUCER if kind == "notify" else trace.SpanKind.CLIENT,
            attributes=attributes,
        )
        return _OtelCallSpan(self, span)

    def for_node(self, node_id: str, prefix: str) -> NodeTracing:
        return _OtelNodeTracing(self, node_id, prefix)

    def _inject(self, span: Span) -> dict[str, str]:
        """The W3C headers of ``span``, under clstr's reserved names."""
        carrier: dict[str, str] = {}
        self._propagator.inject(carrier, self._trace.set_span_in_context(span))
        headers = {}
        if "traceparent" in carrier:
            headers[TRACEPARENT_HEADER] = carrier["traceparent"]
            if carrier.get("tracestate"):
                headers[TRACESTATE_HEADER] = carrier["tracestate"]
        return headers

    def _extract(self, env: Envelope) -> Any:
        """The remote context of ``env``, or an empty one (a new trace)."""
        headers = env.headers
        parent = headers.get(TRACEPARENT_HEADER) if headers else None
        if parent is None:
            return self._root()
        carrier = {"traceparent": parent}
        state = headers.get(TRACESTATE_HEADER)
        if state is not None:
            carrier["tracestate"] = state
        # A malformed traceparent is ignored (W3C): the context stays empty.
        return self._propagator.extract(carrier, self._root())


def _end(span: Span, error: BaseException | None, other: str, attempts: int = 0) -> None:
    from opentelemetry.trace import StatusCode  # loaded already: OpenTelemetryTracing did

    result = outcome(error, other)
    span.set_attribute("clstr.outcome", result)
    if attempts:
        span.set_attribute("clstr.attempts", attempts)
    if error is not None:
        span.set_attribute("clstr.error_type", type(error).__name__)
        if result == other:  # not a refusal: where it was raised matters
            span.record_exception(error)
        span.set_status(StatusCode.ERROR, result)
    span.end()


class _OtelCallSpan:
    __slots__ = ("_headers", "_owner", "_span", "attempts")

    def __init__(self, owner: OpenTelemetryTracing, span: Span) -> None:
        self._owner = owner
        self._span = span
        self._headers: dict[str, str] | None = None
        self.attempts = 0

    def headers(self, attempt: int) -> Mapping[str, str]:
        self.attempts = attempt
        if self._headers is None:
            self._headers = self._owner._inject(self._span)
        if attempt > 1 and self._headers:
            return {**self._headers, ATTEMPT_HEADER: str(attempt)}
        return self._headers

    def retry(self, attempt: int, code: str, backoff: float) -> None:
        self._span.add_event(
            "clstr.retry",
            {
                "clstr.attempt": attempt,
                "clstr.error_code": code,
                "clstr.backoff_ms": round(backoff * 1000, 3),
            },
        )

    def event(self, name: str, attributes: Mapping[str, AttributeValue] | None = None) -> None:
        self._span.add_event(name, attributes)

    def end(self, error: BaseException | None) -> None:
        _end(self._span, error, "error", self.attempts)


class _OtelHandlerSpan:
    __slots__ = ("_detach", "_span", "_token")

    def __init__(self, span: Span | None, token: object, detach: Callable[[Any], None]) -> None:
        self._span = span
        self._token = token
        self._detach = detach

    def end(self, error: BaseException | None) -> None:
        self._detach(self._token)
        span = self._span
        if span is None:
            return
        if isinstance(error, RequestError) and error.code == "interrupted":
            span.add_event("clstr.interrupted")
        _end(span, error, "handler_error")


class _OtelNodeTracing:
    """One node's spans: its messages, and a ``clstr.shard`` span per shard it owns."""

    def __init__(self, owner: OpenTelemetryTracing, node_id: str, prefix: str) -> None:
        self._owner = owner
        self._node_id = node_id
        self._prefix = prefix
        self._owned: dict[int, Span] = {}  # shard -> its ownership span

    def _queue(self, env: Envelope, arrived: float) -> tuple[Span, Any, dict[str, Any], Any, int]:
        """Start ``env``'s ``clstr.queue`` span at its arrival: (the span, the remote
        context, the attributes, the links, now in epoch ns)."""
        owner = self._owner
        trace = owner._trace
        parent = owner._extract(env)
        attributes: dict[str, Any] = {
            "clstr.message_type": env.type,
            "clstr.shard": env.shard,
            "clstr.node_id": self._node_id,
            "clstr.attempt": _attempt(env),
        }
        owner._key_attributes(attributes, env.key)
        if env.stream:
            attributes["clstr.stream_window"] = env.stream
        ownership = self._owned.get(env.shard)
        links = None if ownership is None else [trace.Link(ownership.get_span_context())]
        start, now = _wall_ns(arrived)
        queue = owner._tracer.start_span(
            "clstr.queue", parent, trace.SpanKind.INTERNAL, attributes, links, start_time=start
        )
        return queue, parent, attributes, links, now

    def handler_started(self, env: Envelope, arrived: float, answered: bool) -> HandlerSpan:
        owner = self._owner
        trace = owner._trace
        queue, parent, attributes, links, now = self._queue(env, arrived)
        if not queue.is_recording():
            # Not sampled: neither is the handler's span (same parent, same trace),
            # so none is made; the handler's calls still carry the trace onwards.
            return _OtelHandlerSpan(None, owner._attach(parent), owner._detach)
        queue.set_attribute("clstr.outcome", "started")
        queue.end(end_time=now)
        # A request (or stream) is answered: a server span; a notification is consumed.
        span = owner._tracer.start_span(
            "clstr.handle",
            parent,
            trace.SpanKind.SERVER if answered else trace.SpanKind.CONSUMER,
            attributes,
            links,
            start_time=now,
        )
        # Current while the handler runs: the handler's own calls join the trace.
        token = owner._attach(trace.set_span_in_context(span, parent))
        return _OtelHandlerSpan(span, token, owner._detach)

    def message_refused(self, env: Envelope, arrived: float, code: str) -> None:
        queue, _, _, _, now = self._queue(env, arrived)
        queue.set_attribute("clstr.outcome", code)
        if code not in ("cached", "joined"):
            queue.set_status(self._owner._trace.StatusCode.ERROR, code)
        queue.end(end_time=now)

    def event(self, kind: str, shard: int | None, attributes: Mapping[str, AttributeValue]) -> None:
        owner = self._owner
        if kind == "shard_acquired" and shard is not None:
            previous = self._owned.pop(shard, None)
            if previous is not None:
                previous.end()
            self._owned[shard] = owner._tracer.start_span(
                "clstr.shard",
                owner._root(),
                owner._trace.SpanKind.INTERNAL,
                {
                    "clstr.shard": shard,
                    "clstr.node_id": self._node_id,
                    "clstr.prefix": self._prefix,
                    **attributes,
                },
            )
            return
        if shard is None:  # fenced, unfenced: every shard the node holds
            for span in self._owned.values():
                span.add_event(f"clstr.{kind}", attributes)
            return
        held = self._owned.get(shard)
        if held is None:
            return
        if kind == "shard_released":
            del self._owned[shard]
            held.end()
        else:
            held.add_event(f"clstr.{kind}", attributes)


def _attempt(env: Envelope) -> int:
    """Which attempt ``env`` is (``x-clstr-attempt``; 1 without it or when it is
    not a number a sender could mean)."""
    value = env.headers.get(ATTEMPT_HEADER) if env.headers else None
    if value is not None and value.isascii() and value.isdigit() and len(value) < 10:
        return int(value)
    return 1
