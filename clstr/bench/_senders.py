"""Request/reply over NATS through the edge client and with tracing on (groups
``edge_client`` and ``tracing``), each against a plain :class:`~clstr.Client`
with tracing off, in the same run.

Each group has a stage of its own: a plain node (a :class:`~clstr.Node`
echoing) and a client process with a plain ``Client`` to it, and for
``edge_client`` a client process with an ``EdgeClient`` (one endpoint: this
nats-server) to the same node; for ``tracing`` a traced node (on a subject
prefix of its own) and two client processes to it, one sampling every trace
and one 1 % of them. Everything else is the ``nats_rr`` workload: 64 shards,
1024 keys, 100-byte payloads, 256 requests in flight.

* ``edge_client_rr``: ``EdgeClient.request_key`` against ``Client.request_key``
  to the same node: the failover client's cost as a user meets it (its
  endpoint pick, and the request id every call carries, which the node keeps
  the reply under: a plain ``Client`` sends one only with a retry policy).
* ``edge_client_rr_vs_ids``: the same against a ``Client`` with a
  ``RetryPolicy`` (a request id per call): the edge client's own path alone.
* ``tracing_rr``: ``OpenTelemetryTracing`` on the client and the node, on the
  OpenTelemetry SDK, every trace sampled, spans batched to an exporter that
  drops them (the cost of making them, not of shipping them) against the same
  requests with tracing off (the default) to the plain node.
* ``tracing_rr_1pct`` (report only): the same with the client sampling 1 %
  (``ParentBased(TraceIdRatioBased(0.01))``; the node follows its parent's
  decision), what a production set-up would run.

``benchmarks/bench_tracing_overhead.py`` measures more (tracing off against
the code before tracing existed, notify, one process per variant).
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any, Final

from ._group import Context, Group, Workers
from ._pairs import add_throughput, both_sides, pair_stage
from ._protocol import JSON, cpu, quiet_logs, serve
from ._specs import KEYS, PAYLOAD_BYTES, BenchError, Spec
from ._timing import throughput

_PLAIN_PREFIX: Final = "benchplain"
_TRACED_PREFIX: Final = "benchtraced"

_RR: Final = "request/reply throughput over NATS (256 in flight, 100 B)"
_EDGE_SPECS: Final = (
    Spec(
        "edge_client_rr",
        "edge_client",
        "EdgeClient (one endpoint) " + _RR,
        "plain Client request/reply to the same node",
        "req/s",
        True,
        # Medians of --runs 3: 0.56-0.96x (CPU 0.66-0.80x): the floor is ~60 % of
        # the ~0.8x typical of them.
        0.5,
    ),
    Spec(
        "edge_client_rr_vs_ids",
        "edge_client",
        "EdgeClient (one endpoint) " + _RR,
        "Client with a RetryPolicy (a request id per call, as the EdgeClient sends) "
        "to the same node",
        "req/s",
        True,
        # Medians of --runs 3: 0.68-0.85x (CPU 0.71-0.87x): the floor is ~65 % of
        # the ~0.78x typical of them.
        0.5,
    ),
)
_PLAIN: Final = "the same requests with tracing off (the default), node and client"
_TRACING_SPECS: Final = (
    Spec(
        "tracing_rr",
        "tracing",
        "tracing on, every trace sampled (OpenTelemetry SDK, client and node): " + _RR,
        _PLAIN,
        "req/s",
        True,
        # Medians of --runs 3: 0.17-0.21x, 0.13x once at load 6 (CPU 0.16-0.19x:
        # the traced side is CPU-bound and loses most on a loaded machine): the floor
        # is 60 % of the ~0.2x typical of them.
        0.12,
    ),
    Spec(
        "tracing_rr_1pct",
        "tracing",
        "tracing on, 1 % sampled at the client (ParentBased(TraceIdRatioBased(0.01))): " + _RR,
        _PLAIN,
        "req/s",
        True,
        # Medians of --runs 3: 0.34-0.54x (CPU 0.34-0.41x): the floor is ~60 % of
        # the ~0.4x typical of them.
        0.25,
    ),
)


def _provider(ratio: float | None) -> Any:
    """An OpenTelemetry SDK tracer provider sampling ``ratio`` of root traces
    (``None``: the SDK's default, following the parent and sampling every
    root), its spans batched to an exporter that drops them."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    class Drop(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    sampler = None if ratio is None else ParentBased(TraceIdRatioBased(ratio))
    provider = TracerProvider() if sampler is None else TracerProvider(sampler=sampler)
    provider.add_span_processor(BatchSpanProcessor(Drop()))
    return provider


async def _node(cfg: JSON, *, traced: bool) -> None:
    from clstr import Envelope, Node, OpenTelemetryTracing
    from clstr.tracing import NOOP_TRACING
    from clstr.transports.nats import NatsOptions, NatsTransport

    quiet_logs()
    side = "traced" if traced else "plain"
    transport = await NatsTransport.connect(cfg["url"], NatsOptions(name=f"bench-{side}-node"))

    async def echo(env: Envelope) -> bytes:
        return env.data

    provider = _provider(None) if traced else None
    node = Node(
        transport,
        echo,
        num_shards=cfg["shards"],
        prefix=_TRACED_PREFIX if traced else _PLAIN_PREFIX,
        node_id=f"bench-{side}",
        tracing=NOOP_TRACING if provider is None else OpenTelemetryTracing(provider),
    )
    try:
        async with node:
            await serve({"cpu": cpu})
    finally:
        await transport.close()
        if provider is not None:
            provider.shutdown()


async def plain_node(cfg: JSON) -> None:
    """An echo node, tracing off."""
    await _node(cfg, traced=False)


async def traced_node(cfg: JSON) -> None:
    """An echo node with tracing on (following the callers' sampling)."""
    await _node(cfg, traced=True)


async def _client(
    cfg: JSON, *, edge: bool = False, ids: bool = False, ratio: float | None = 0.0
) -> None:
    """Requests to the plain node (``ratio`` 0: tracing off), through an
    EdgeClient with ``edge``, with a request id each with ``ids``; else, traced,
    to the traced node."""
    from clstr import Client, OpenTelemetryTracing
    from clstr.client import EdgeClient, RetryPolicy
    from clstr.transports.nats import NatsOptions, NatsTransport

    quiet_logs()
    shards = cfg["shards"]
    provider = None
    sender: Client | EdgeClient
    if edge:  # it connects by itself
        sender = EdgeClient([cfg["url"]], num_shards=shards, prefix=_PLAIN_PREFIX, timeout=10.0)
        await sender.start()
    else:
        transport = await NatsTransport.connect(cfg["url"], NatsOptions(name="bench-rr-client"))
        if ratio == 0.0:
            retry = RetryPolicy() if ids else None
            sender = Client(
                transport,
                num_shards=shards,
                prefix=_PLAIN_PREFIX,
                timeout=10.0,
                retry=retry,
                owns_transport=True,
            )
        else:
            provider = _provider(ratio)
            sender = Client(
                transport,
                num_shards=shards,
                prefix=_TRACED_PREFIX,
                timeout=10.0,
                tracing=OpenTelemetryTracing(provider),
                owns_transport=True,
            )
    keys = [f"key-{i}" for i in range(KEYS)]
    payload = os.urandom(PAYLOAD_BYTES)
    request = sender.request_key

    async def call(i: int) -> object:
        return await request(keys[i % KEYS], "echo", payload)

    async def measure(cmd: JSON) -> JSON:
        return await throughput(call, cmd["n"], cmd["warmup"], cfg["inflight"])

    try:
        await serve({"sender_rr": measure})
    finally:
        await sender.close()  # and its connection
        if provider is not None:
            provider.shutdown()


async def plain_client(cfg: JSON) -> None:
    """A plain Client, tracing off, to the plain node."""
    await _client(cfg)


async def ids_client(cfg: JSON) -> None:
    """A Client with a RetryPolicy (a request id per call), to the plain node."""
    await _client(cfg, ids=True)


async def edge_client(cfg: JSON) -> None:
    """An EdgeClient over this nats-server alone, to the plain node."""
    await _client(cfg, edge=True)


async def traced_client(cfg: JSON) -> None:
    """A Client sampling every trace, to the traced node."""
    await _client(cfg, ratio=None)


async def sampled_client(cfg: JSON) -> None:
    """A Client sampling 1 % of its traces, to the traced node."""
    await _client(cfg, ratio=0.01)


def _config(context: Context) -> JSON:
    sizes = context.sizes
    return {"url": context.url, "shards": sizes.nats_shards, "inflight": sizes.inflight}


def _traced_config(context: Context) -> JSON:
    if importlib.util.find_spec("opentelemetry.sdk") is None:
        raise BenchError(
            "the tracing group needs the OpenTelemetry SDK: pip install 'clstr[bench]'"
        )
    return _config(context)


_EDGE_STAGE: Final = pair_stage(
    {
        "plain-node": plain_node,
        "plain-client": plain_client,
        "ids-client": ids_client,
        "edge-client": edge_client,
    },
    _config,
    what="edge client workers (a node, 3 clients)",
)
_TRACING_STAGE: Final = pair_stage(
    {
        "plain-node": plain_node,
        "traced-node": traced_node,
        "plain-client": plain_client,
        "traced-client": traced_client,
        "sampled-client": sampled_client,
    },
    _traced_config,
    what="tracing workers (2 nodes, 3 clients)",
)


async def _rr(
    context: Context,
    workers: Workers,
    run_index: int,
    sides: tuple[str, str],
    node: str = "plain-node",
) -> dict[str, JSON]:
    """:func:`both_sides` of the clients ``sides`` (clstr's, the baseline's):
    clstr's to ``node``, the baseline's to the plain node."""
    sizes = context.sizes
    command = {"n": sizes.rr_requests, "warmup": sizes.rr_warmup}
    clstr, baseline = sides
    view: Workers = {
        f"{clstr}-node": workers[node],
        f"{clstr}-client": workers[f"{clstr}-client"],
        f"{baseline}-node": workers["plain-node"],
        f"{baseline}-client": workers[f"{baseline}-client"],
    }
    prefixes = {"clstr": clstr, "raw": baseline}
    return await both_sides(context, view, run_index, "sender_rr", command, prefixes)


async def _measure_edge(context: Context, workers: Workers, run_index: int) -> None:
    add_throughput(
        context, "edge_client_rr", await _rr(context, workers, run_index, ("edge", "plain"))
    )
    answers = await _rr(context, workers, run_index, ("edge", "ids"))
    add_throughput(context, "edge_client_rr_vs_ids", answers)


async def _measure_tracing(context: Context, workers: Workers, run_index: int) -> None:
    answers = await _rr(context, workers, run_index, ("traced", "plain"), "traced-node")
    add_throughput(context, "tracing_rr", answers)
    answers = await _rr(context, workers, run_index, ("sampled", "plain"), "traced-node")
    add_throughput(context, "tracing_rr_1pct", answers)


EDGE: Final = Group(
    name="edge_client", specs=_EDGE_SPECS, steps=4, stage=_EDGE_STAGE, measure=_measure_edge
)
TRACING: Final = Group(
    name="tracing", specs=_TRACING_SPECS, steps=4, stage=_TRACING_STAGE, measure=_measure_tracing
)
