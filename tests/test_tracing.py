"""Tracing with OpenTelemetry: one trace from the client's span to the node's handler,
on both transports (the ``connect`` fixture), with the SDK's in-memory exporter."""

from __future__ import annotations

import asyncio
import contextlib
import re
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from typing import Any

import msgpack
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from clstr import (
    BadRequestError,
    Client,
    Envelope,
    Node,
    OpenTelemetryTracing,
    RemoteHandlerError,
    ReservedHeaderError,
    RetryPolicy,
    Transport,
    with_header,
)
from clstr.codec import decode_request
from clstr.envelope import ATTEMPT_HEADER, CLSTR_HEADERS, TRACEPARENT_HEADER, TRACESTATE_HEADER
from clstr.handlers import current_stream
from clstr.metrics import NoopMetrics
from clstr.node import ShardContext
from clstr.tracing import key_hash

Connect = Callable[[str], Awaitable[Transport]]

NUM_SHARDS = 4
TRACEPARENT = re.compile(r"^00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$")


class Ended(SpanProcessor):
    """Wakes waiters as spans end (the exporter holds them): wait on what a span
    says, never on a sleep."""

    def __init__(self, exporter: InMemorySpanExporter) -> None:
        self._exporter = exporter
        self._changed = asyncio.Event()

    def on_end(self, span: ReadableSpan) -> None:
        self._changed.set()

    async def wait(self, predicate: Callable[[Sequence[ReadableSpan]], bool]) -> None:
        """Return once the spans ended so far satisfy ``predicate``."""
        while not predicate(self._exporter.get_finished_spans()):
            self._changed.clear()
            await self._changed.wait()


class Traces:
    """A tracer provider of its own (not the global one) with an in-memory exporter."""

    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.provider = TracerProvider()
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.ended = Ended(self.exporter)
        self.provider.add_span_processor(self.ended)

    def tracing(self, *, record_keys: bool = False) -> OpenTelemetryTracing:
        return OpenTelemetryTracing(self.provider, record_keys=record_keys)

    @property
    def spans(self) -> Sequence[ReadableSpan]:
        return self.exporter.get_finished_spans()

    def named(self, name: str) -> list[ReadableSpan]:
        return [s for s in self.spans if s.name == name]

    def one(self, name: str) -> ReadableSpan:
        spans = self.named(name)
        assert len(spans) == 1, [s.name for s in self.spans]
        return spans[0]

    async def wait_for(self, name: str, count: int = 1) -> None:
        await self.ended.wait(lambda spans: sum(s.name == name for s in spans) >= count)


@pytest.fixture
def traces() -> Iterator[Traces]:
    """An in-memory exporter for one test."""
    made = Traces()
    yield made
    made.provider.shutdown()


def _attr(span: ReadableSpan, name: str) -> object:
    assert span.attributes is not None
    return span.attributes.get(name)


def _events(span: ReadableSpan) -> list[str]:
    return [event.name for event in span.events]


@contextlib.asynccontextmanager
async def _node(transport: Transport, handler: Any, **kwargs: Any) -> AsyncIterator[Node]:
    node = Node(transport, handler, num_shards=NUM_SHARDS, **kwargs)
    await node.start()
    try:
        yield node
    finally:
        await node.stop()


class TestOneTrace:
    async def test_request_is_one_trace_from_client_to_handler(
        self, connect: Connect, traces: Traces
    ) -> None:
        """A request's client span is the parent of the node's queue and handler spans
        (one trace id, sent as x-clstr-traceparent), with the documented attributes
        and no raw key."""
        seen: list[Envelope] = []
        current: list[int] = []

        async def handler(env: Envelope) -> bytes:
            seen.append(env)
            current.append(trace.get_current_span().get_span_context().span_id)
            return b"ok"

        tracing = traces.tracing()
        async with _node(await connect("node"), handler, node_id="n1", tracing=tracing):
            client = Client(await connect("client"), num_shards=NUM_SHARDS, tracing=tracing)
            assert await client.request_key("user-42", "Greet", b"hi") == b"ok"
        request = traces.one("clstr.request")
        queue, handle = traces.one("clstr.queue"), traces.one("clstr.handle")
        trace_id = request.context.trace_id
        assert queue.context.trace_id == handle.context.trace_id == trace_id
        assert queue.parent is not None
        assert handle.parent is not None
        assert queue.parent.span_id == handle.parent.span_id == request.context.span_id
        assert queue.parent.is_remote
        assert handle.parent.is_remote
        assert (request.kind, queue.kind, handle.kind) == (
            SpanKind.CLIENT,
            SpanKind.INTERNAL,
            SpanKind.SERVER,
        )
        assert current == [handle.context.span_id]  # current while the handler ran
        headers = dict(seen[0].headers)
        assert TRACEPARENT.match(headers[TRACEPARENT_HEADER])
        assert headers[TRACEPARENT_HEADER][3:35] == f"{trace_id:032x}"
        assert ATTEMPT_HEADER not in headers  # the first attempt carries none
        shard = client.shard_for("user-42")
        for span in (queue, handle):
            assert _attr(span, "clstr.shard") == shard
            assert _attr(span, "clstr.message_type") == "Greet"
            assert _attr(span, "clstr.node_id") == "n1"
            assert _attr(span, "clstr.attempt") == 1
            assert _attr(span, "clstr.key_hash") == key_hash("user-42")
        assert _attr(queue, "clstr.outcome") == "started"
        assert _attr(handle, "clstr.outcome") == "ok"
        assert _attr(request, "clstr.outcome") == "ok"
        assert _attr(request, "clstr.attempts") == 1
        assert queue.end_time is not None
        assert handle.start_time is not None
        assert queue.end_time <= handle.start_time
        for span in traces.spans:
            assert "clstr.key" not in (span.attributes or {})
            assert "user-42" not in {str(v) for v in (span.attributes or {}).values()}

    async def test_a_handlers_own_calls_join_the_trace(
        self, connect: Connect, traces: Traces
    ) -> None:
        """A handler that calls another node makes a client span under its own: the
        second node's handler is in the first caller's trace (two hops)."""
        tracing = traces.tracing()

        async def leaf(env: Envelope) -> bytes:
            return b"leaf"

        async with _node(await connect("leaf"), leaf, prefix="leaf", tracing=tracing):
            inner = Client(
                await connect("inner"), num_shards=NUM_SHARDS, prefix="leaf", tracing=tracing
            )

            async def middle(env: Envelope) -> bytes:
                return await inner.request_key("k2", "Leaf")

            async with _node(await connect("middle"), middle, tracing=tracing):
                client = Client(await connect("client"), num_shards=NUM_SHARDS, tracing=tracing)
                assert await client.request_key("k1", "Middle") == b"leaf"
        handles = traces.named("clstr.handle")
        requests = traces.named("clstr.request")
        assert len(handles) == len(requests) == 2
        assert len({s.context.trace_id for s in traces.spans if s.name != "clstr.shard"}) == 1
        outer = next(s for s in handles if _attr(s, "clstr.message_type") == "Middle")
        nested = next(s for s in requests if _attr(s, "clstr.message_type") == "Leaf")
        assert nested.parent is not None
        assert nested.parent.span_id == outer.context.span_id

    async def test_notify_is_a_producer_span_the_handler_continues(
        self, connect: Connect, traces: Traces
    ) -> None:
        """A notification's producer span is the parent of the handler's consumer span."""
        done = asyncio.Event()

        async def handler(env: Envelope) -> None:
            done.set()

        tracing = traces.tracing()
        async with _node(await connect("node"), handler, tracing=tracing):
            client = Client(await connect("client"), num_shards=NUM_SHARDS, tracing=tracing)
            await client.notify_key("k", "Event", b"x")
            await done.wait()
            await traces.wait_for("clstr.handle")
        notify, handle = traces.one("clstr.notify"), traces.one("clstr.handle")
        assert notify.kind is SpanKind.PRODUCER
        assert handle.kind is SpanKind.CONSUMER
        assert handle.parent is not None
        assert handle.parent.span_id == notify.context.span_id
        assert handle.context.trace_id == notify.context.trace_id

    async def test_an_unsampled_trace_makes_no_node_spans_and_carries_on(
        self, connect: Connect
    ) -> None:
        """When the client's trace is not sampled (flags 00), the node records no span
        but its handler runs in that trace, so its own calls stay in it."""
        from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased

        exporter = InMemorySpanExporter()
        provider = TracerProvider(sampler=ParentBased(ALWAYS_OFF))
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        tracing = OpenTelemetryTracing(provider)
        inside: list[trace.SpanContext] = []

        async def handler(env: Envelope) -> bytes:
            inside.append(trace.get_current_span().get_span_context())
            return env.headers[TRACEPARENT_HEADER].encode()

        try:
            async with _node(await connect("node"), handler, tracing=tracing):
                client = Client(await connect("client"), num_shards=NUM_SHARDS, tracing=tracing)
                sent = (await client.request_key("k", "T")).decode()
        finally:
            provider.shutdown()
        assert int(sent[-2:], 16) & 1 == 0  # not sampled, and said so on the wire
        assert exporter.get_finished_spans() == ()
        assert inside[0].trace_id == int(sent[3:35], 16)
        assert not inside[0].trace_flags.sampled

    async def test_record_keys_puts_the_raw_key_on_spans(
        self, connect: Connect, traces: Traces
    ) -> None:
        """With record_keys=True the raw key is the clstr.key attribute, client and node."""

        async def handler(env: Envelope) -> bytes:
            return b""

        tracing = traces.tracing(record_keys=True)
        async with _node(await connect("node"), handler, tracing=tracing):
            client = Client(await connect("client"), num_shards=NUM_SHARDS, tracing=tracing)
            await client.request_key("user-42", "Greet")
        for name in ("clstr.request", "clstr.queue", "clstr.handle"):
            assert _attr(traces.one(name), "clstr.key") == "user-42"

    async def test_handler_error_marks_both_sides(self, connect: Connect, traces: Traces) -> None:
        """A handler that raises ends the handler span in error with the exception
        recorded, and the client span with the error code."""

        async def handler(env: Envelope) -> bytes:
            raise ValueError("boom")

        tracing = traces.tracing()
        async with _node(await connect("node"), handler, tracing=tracing):
            client = Client(await connect("client"), num_shards=NUM_SHARDS, tracing=tracing)
            with pytest.raises(RemoteHandlerError):
                await client.request_key("k", "Fail")
        handle, request = traces.one("clstr.handle"), traces.one("clstr.request")
        assert handle.status.status_code is StatusCode.ERROR
        assert _attr(handle, "clstr.outcome") == "handler_error"
        assert _attr(handle, "clstr.error_type") == "ValueError"
        assert "exception" in _events(handle)
        assert request.status.status_code is StatusCode.ERROR
        assert _attr(request, "clstr.outcome") == "handler_error"

    async def test_a_traced_client_talks_to_an_untraced_node(
        self, connect: Connect, traces: Traces
    ) -> None:
        """A node without tracing accepts the trace headers (and only records nothing)."""

        async def handler(env: Envelope) -> bytes:
            return env.headers[TRACEPARENT_HEADER].encode()

        async with _node(await connect("node"), handler):
            client = Client(
                await connect("client"), num_shards=NUM_SHARDS, tracing=traces.tracing()
            )
            assert TRACEPARENT.match((await client.request_key("k", "T")).decode())
        assert [s.name for s in traces.spans] == ["clstr.request"]

    async def test_a_malformed_traceparent_starts_a_new_trace(
        self, connect: Connect, traces: Traces
    ) -> None:
        """A peer's traceparent that is not W3C is ignored: the node's spans are the
        roots of a new trace, and the message is served."""

        async def handler(env: Envelope) -> bytes:
            return b"ok"

        async with _node(await connect("node"), handler, tracing=traces.tracing()):
            sender = await connect("raw")
            body = msgpack.packb(
                {"v": 1, "t": "T", "h": {TRACEPARENT_HEADER: "not-a-traceparent"}},
                use_bin_type=True,
            )
            reply = msgpack.unpackb(await sender.request("clstr.shard.0", body, 5.0))
            assert reply["ok"] is True
        handle = traces.one("clstr.handle")
        assert handle.parent is None


class TestRetries:
    async def test_retries_show_as_attempts(self, connect: Connect, traces: Traces) -> None:
        """A request refused not_owner and retried is one trace: a retry event on the
        client span, a refused queue span for attempt 1 and the handler's spans for
        attempt 2 (x-clstr-attempt: 2 on the wire)."""
        seen: list[Envelope] = []

        async def handler(env: Envelope) -> bytes:
            seen.append(env)
            return b"done"

        tracing = traces.tracing()
        async with _node(await connect("node"), handler, tracing=tracing) as node:

            class UnfenceOnRetry(NoopMetrics):
                def request_retried(self, message_type: str, reason: str) -> None:
                    node.unfence()  # before the second attempt is sent

            node.fence("test: heartbeat lost")
            client = Client(
                await connect("client"),
                num_shards=NUM_SHARDS,
                retry=RetryPolicy(initial_backoff=0.001, max_backoff=0.001),
                metrics=UnfenceOnRetry(),
                tracing=tracing,
                timeout=10,
            )
            assert await client.request_key("k", "Work") == b"done"
        request = traces.one("clstr.request")
        assert _attr(request, "clstr.attempts") == 2
        retry = next(e for e in request.events if e.name == "clstr.retry")
        assert retry.attributes is not None
        assert retry.attributes["clstr.attempt"] == 1
        assert retry.attributes["clstr.error_code"] == "not_owner"
        queues = sorted(traces.named("clstr.queue"), key=lambda s: s.start_time or 0)
        assert [(_attr(s, "clstr.attempt"), _attr(s, "clstr.outcome")) for s in queues] == [
            (1, "not_owner"),
            (2, "started"),
        ]
        assert queues[0].status.status_code is StatusCode.ERROR
        assert _attr(traces.one("clstr.handle"), "clstr.attempt") == 2
        assert seen[0].headers[ATTEMPT_HEADER] == "2"
        assert len({s.context.trace_id for s in traces.spans if s.name != "clstr.shard"}) == 1

    async def test_a_retry_answered_from_the_reply_cache_is_a_cached_span(
        self, connect: Connect, traces: Traces
    ) -> None:
        """A request id sent again is answered from the reply cache: its queue span
        says ``cached`` and no handler span is made for it."""

        async def handler(env: Envelope) -> bytes:
            return b"once"

        tracing = traces.tracing()
        async with _node(await connect("node"), handler, tracing=tracing):
            client = Client(await connect("client"), num_shards=NUM_SHARDS, tracing=tracing)
            for _ in range(2):
                assert await client.request_key("k", "Pay", request_id="pay-1") == b"once"
        outcomes = sorted(str(_attr(s, "clstr.outcome")) for s in traces.named("clstr.queue"))
        assert outcomes == ["cached", "started"]
        assert len(traces.named("clstr.handle")) == 1


class TestNodeEvents:
    async def test_ownership_span_carries_fence_task_and_handoff_events(
        self, connect: Connect, traces: Traces
    ) -> None:
        """Each shard a node owns is a clstr.shard span from acquire to release, with
        its fencing, shard-bound tasks and handoff as events; the spans of its
        messages link to it."""
        task_running = asyncio.Event()

        async def task(ctx: ShardContext) -> None:
            task_running.set()
            await ctx.stopping.wait()

        async def handler(env: Envelope) -> bytes:
            return b""

        tracing = traces.tracing()
        async with _node(
            await connect("node"), handler, node_id="n1", shards=[0, 1], tracing=tracing
        ) as node:
            node.bind("singleton", task, shards=[0], grace=1.0)
            await task_running.wait()
            client = Client(await connect("client"), num_shards=NUM_SHARDS, tracing=tracing)
            await client.request_shard(0, "Work")
            node.fence("test: heartbeat lost")
            node.unfence()
            await node.release(0)  # a handoff: the membership gives the shard away
            await traces.wait_for("clstr.shard")
            shard0 = traces.one("clstr.shard")
            assert _attr(shard0, "clstr.shard") == 0
            assert _attr(shard0, "clstr.node_id") == "n1"
            assert _attr(shard0, "clstr.token") == 0
            names = _events(shard0)
            assert names.index("clstr.task_started") < names.index("clstr.fenced")
            assert names.index("clstr.fenced") < names.index("clstr.unfenced")
            assert names.index("clstr.unfenced") < names.index("clstr.shard_releasing")
            assert "clstr.task_stopped" in names
            fenced = next(e for e in shard0.events if e.name == "clstr.fenced")
            assert fenced.attributes is not None
            assert fenced.attributes["clstr.reason"] == "test: heartbeat lost"
            for name in ("clstr.queue", "clstr.handle"):
                links = traces.one(name).links
                assert [link.context.span_id for link in links] == [shard0.context.span_id]
        # Stopping releases shard 1 too: its span ends, with the fence events.
        shard1 = next(s for s in traces.named("clstr.shard") if _attr(s, "clstr.shard") == 1)
        assert {"clstr.fenced", "clstr.unfenced", "clstr.shard_releasing"} <= set(_events(shard1))


class TestStreams:
    async def test_stream_span_covers_the_stream_and_an_interrupt_is_an_event(
        self, connect: Connect, traces: Traces
    ) -> None:
        """The client's stream span lasts until the caller leaves; leaving early is a
        clstr.interrupt event, and the node's handler span ends interrupted."""
        started = asyncio.Event()

        async def handler(env: Envelope) -> bytes:
            sink = current_stream()
            assert sink is not None
            started.set()
            for n in range(1000):
                await sink.send(b"%d" % n)
            return b""

        tracing = traces.tracing()
        async with _node(await connect("node"), handler, tracing=tracing):
            client = Client(await connect("client"), num_shards=NUM_SHARDS, tracing=tracing)
            chunks = []
            async with contextlib.aclosing(client.stream_key("k", "Rows", window=4)) as rows:
                async for chunk in rows:
                    chunks.append(chunk)
                    if len(chunks) == 3:
                        break
            await traces.wait_for("clstr.handle")
        stream, handle = traces.one("clstr.stream"), traces.one("clstr.handle")
        assert handle.parent is not None
        assert handle.parent.span_id == stream.context.span_id
        assert "clstr.interrupt" in _events(stream)
        assert _attr(stream, "clstr.outcome") == "ok"
        assert _attr(handle, "clstr.outcome") == "interrupted"
        assert "clstr.interrupted" in _events(handle)
        assert _attr(handle, "clstr.stream_window") == 4
        assert handle.kind is SpanKind.SERVER

    async def test_a_whole_stream_is_one_span(self, connect: Connect, traces: Traces) -> None:
        """A stream read to its end is one client span, ended after the last chunk."""

        async def handler(env: Envelope) -> bytes:
            sink = current_stream()
            assert sink is not None
            for n in range(10):
                await sink.send(b"%d" % n)
            return b""

        tracing = traces.tracing()
        async with _node(await connect("node"), handler, tracing=tracing):
            client = Client(await connect("client"), num_shards=NUM_SHARDS, tracing=tracing)
            assert len([c async for c in client.stream_key("k", "Rows")]) == 10
            await traces.wait_for("clstr.handle")
        stream, handle = traces.one("clstr.stream"), traces.one("clstr.handle")
        assert "clstr.interrupt" not in _events(stream)
        assert stream.end_time is not None
        assert handle.end_time is not None
        assert _attr(handle, "clstr.outcome") == "ok"


class TestWire:
    def test_node_accepts_clstr_trace_headers_and_refuses_other_reserved_ones(self) -> None:
        """The decoder takes exactly clstr's own reserved names (lower case); any other
        x-clstr- name, or one of these in another case, is bad_request."""
        own = {
            TRACEPARENT_HEADER: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            TRACESTATE_HEADER: "congo=t61rcWkgMzE",
            ATTEMPT_HEADER: "2",
        }
        assert set(own) == CLSTR_HEADERS
        body = msgpack.packb({"v": 1, "t": "T", "h": own}, use_bin_type=True)
        assert dict(decode_request(body).headers) == own
        for name in ("x-clstr-trace", "X-Clstr-Traceparent"):
            bad = msgpack.packb({"v": 1, "t": "T", "h": {name: "1"}}, use_bin_type=True)
            with pytest.raises(BadRequestError, match="reserved prefix"):
                decode_request(bad)

    def test_users_still_may_not_set_them(self) -> None:
        """The client refuses a user header with one of the trace names."""
        for name in CLSTR_HEADERS:
            with pytest.raises(ReservedHeaderError):
                with_header(name, "x")

    def test_header_limits_count_trace_headers(self) -> None:
        """A node counts the trace headers in the headers' limits (64 entries)."""
        headers = {f"h{i}": "v" for i in range(63)}
        headers[TRACEPARENT_HEADER] = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        body = msgpack.packb({"v": 1, "t": "T", "h": headers}, use_bin_type=True)
        decode_request(body)
        headers[TRACESTATE_HEADER] = "a=b"
        body = msgpack.packb({"v": 1, "t": "T", "h": headers}, use_bin_type=True)
        with pytest.raises(BadRequestError, match="65 headers"):
            decode_request(body)

    async def test_trace_context_that_does_not_fit_is_dropped(
        self, connect: Connect, traces: Traces
    ) -> None:
        """When the user's headers leave no room under the limits, the call goes
        untraced (never refused for tracing) and the client span says so."""
        seen: list[Envelope] = []

        async def handler(env: Envelope) -> bytes:
            seen.append(env)
            return b"ok"

        full = [with_header(f"h{i}", "v") for i in range(64)]
        tracing = traces.tracing()
        async with _node(await connect("node"), handler, tracing=tracing):
            client = Client(await connect("client"), num_shards=NUM_SHARDS, tracing=tracing)
            assert await client.request_key("k", "T", options=full) == b"ok"
        assert TRACEPARENT_HEADER not in seen[0].headers
        assert "clstr.trace_context_dropped" in _events(traces.one("clstr.request"))
        handle = traces.one("clstr.handle")
        assert handle.parent is None  # the node started a trace of its own


class TestCost:
    def test_opentelemetry_is_not_imported_without_tracing(self) -> None:
        """A process that runs a node and a client without tracing never imports
        opentelemetry (requests, notifications and a stream on the memory transport)."""
        code = textwrap.dedent(
            """
            import asyncio, sys
            from clstr import Client, MemoryNetwork, MemoryTransport, Node
            from clstr.handlers import current_stream

            async def main():
                done = asyncio.Event()

                async def handler(env):
                    sink = current_stream()
                    if sink is not None:
                        await sink.send(b"chunk")
                    if env.type == "note":
                        done.set()
                    return b"ok"

                network = MemoryNetwork()
                async with Node(MemoryTransport(network), handler, num_shards=4):
                    client = Client(MemoryTransport(network), num_shards=4)
                    assert await client.request_key("k", "t") == b"ok"
                    await client.notify_key("k", "note")
                    await done.wait()
                    assert [c async for c in client.stream_key("k", "s")] == [b"chunk", b"ok"]
                loaded = sorted(m for m in sys.modules if m.startswith("opentelemetry"))
                print("loaded:", ",".join(loaded) or "none")

            asyncio.run(main())
            """
        )
        result = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip().splitlines()[-1] == "loaded: none"

    def test_no_tracing_sends_no_trace_headers(self) -> None:
        """The untraced client builds the very envelope it did before: no reserved
        header is added (checked on the encoded body)."""
        from clstr import MemoryNetwork, MemoryTransport

        client = Client(MemoryTransport(MemoryNetwork()), num_shards=NUM_SHARDS)
        env = client._build(0, "T", b"", "k", (), None)
        assert "h" not in msgpack.unpackb(client._encode(env))
