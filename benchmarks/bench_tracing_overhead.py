"""What tracing costs: request/reply and notify with tracing off, against the code
before tracing existed, and with tracing on, in one run (docs/observability.md).

    .venv/bin/python benchmarks/bench_tracing_overhead.py [--baseline eb215da]
        [--rounds 5] [--requests 20000] [--notifies 40000]

Variants, each in a fresh process, interleaved round by round:

* ``before``: the package as it was at ``--baseline`` (the last commit before
  tracing; ``git archive`` into a temporary directory, first on PYTHONPATH);
* ``off``: this tree, no tracing (the default; checks that no opentelemetry
  module is loaded);
* ``on``: this tree, ``OpenTelemetryTracing`` on the SDK, every trace sampled,
  spans batched to an exporter that drops them (the cost of making them);
* ``on 1%``: the same with ``ParentBased(TraceIdRatioBased(0.01))``.

Each process runs one node and one client on the memory transport and on one
nats-server (both in the process, 64 requests in flight, 1000 keys), and
reports messages per second and its CPU time per message (the figure to
compare on a noisy host: other processes do not move it). Ratios are
variant / ``before``, of the medians over the rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = ("before", "off", "on", "on 1%")
TRANSPORTS = ("memory", "nats")
OPS = ("rr", "notify")
KEYS = [f"key-{i}" for i in range(1000)]
INFLIGHT = 64
_MARK = "RESULT "


# -- worker: one variant in one process --------------------------------------------


def _tracing(variant: str) -> dict[str, Any]:
    """The ``tracing=`` keyword for ``variant`` (empty: the default)."""
    if not variant.startswith("on"):
        return {}
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    from clstr import OpenTelemetryTracing

    class Drop(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    sampler = ParentBased(TraceIdRatioBased(0.01)) if variant == "on 1%" else None
    provider = TracerProvider(sampler=sampler) if sampler else TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(Drop()))
    return {"tracing": OpenTelemetryTracing(provider)}


async def _drive(send: Callable[[int], Awaitable[object]], n: int) -> tuple[float, float]:
    """(messages/s, CPU µs a message) of ``n`` calls of ``send``, INFLIGHT at once."""
    indices = iter(range(n))

    async def lane() -> None:
        for i in indices:
            await send(i)

    started, cpu = time.perf_counter(), time.process_time()
    async with asyncio.TaskGroup() as tg:
        for _ in range(INFLIGHT):
            tg.create_task(lane())
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    return n / elapsed, cpu / n * 1e6


async def _worker(
    variant: str, transport_kind: str, url: str, requests: int, notifies: int
) -> None:
    import structlog

    import clstr
    from clstr import Client, Envelope, Node

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))
    kwargs = _tracing(variant)
    received = 0
    target = 0
    reached = asyncio.Event()

    async def handler(env: Envelope) -> bytes:
        nonlocal received
        received += 1
        if received >= target:
            reached.set()
        return env.data

    if transport_kind == "memory":
        from clstr import MemoryNetwork, MemoryTransport

        network = MemoryNetwork()
        node_side, client_side = MemoryTransport(network), MemoryTransport(network)
    else:
        from clstr.transports.nats import NatsTransport

        node_side = await NatsTransport.connect(url)
        client_side = await NatsTransport.connect(url)
    result: dict[str, Any] = {"variant": variant, "transport": transport_kind}
    try:
        # Room for every notification: the measure is of handled ones, none refused.
        async with Node(node_side, handler, num_shards=64, max_pending=notifies, **kwargs):
            client = Client(client_side, num_shards=64, timeout=30, **kwargs)
            payload = b"x" * 64

            async def request(i: int) -> object:
                return await client.request_key(KEYS[i % len(KEYS)], "echo", payload)

            async def notify(i: int) -> None:
                await client.notify_key(KEYS[i % len(KEYS)], "count", payload)

            await _drive(request, 2000)  # warm-up
            result["rr"] = await _drive(request, requests)
            received, target = 0, notifies
            reached.clear()
            started, cpu = time.perf_counter(), time.process_time()
            await _drive(notify, notifies)
            async with asyncio.timeout(60):
                await reached.wait()  # all handled, not only sent
            elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
            result["notify"] = (notifies / elapsed, cpu / notifies * 1e6)
    finally:
        await client_side.close()
        await node_side.close()
    result["otel_loaded"] = any(m.startswith("opentelemetry") for m in sys.modules)
    result["package"] = clstr.__file__
    print(_MARK + json.dumps(result), flush=True)


# -- parent: rounds of every variant ------------------------------------------------


def _baseline(ref: str, into: Path) -> Path:
    """The clstr package as it was at ``ref``, extracted under ``into``."""
    archive = into / "baseline.tar"
    subprocess.run(
        ["git", "-C", str(ROOT), "archive", "-o", str(archive), ref, "clstr"], check=True
    )
    with tarfile.open(archive) as tar:
        tar.extractall(into / "src", filter="data")
    return into / "src"


def _run(variant: str, transport: str, url: str, args: argparse.Namespace, baseline: Path) -> Any:
    env = dict(os.environ)
    if variant == "before":
        env["PYTHONPATH"] = str(baseline)
    command = [sys.executable, __file__, "--worker", variant, "--transport", transport]
    command += ["--url", url, "--requests", str(args.requests), "--notifies", str(args.notifies)]
    out = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    lines = [line for line in out.stdout.splitlines() if line.startswith(_MARK)]
    if out.returncode or not lines:
        raise RuntimeError(f"{variant}/{transport} failed:\n{out.stderr[-2000:]}")
    return json.loads(lines[-1][len(_MARK) :])


def main(args: argparse.Namespace) -> None:
    from clstr.testing import NatsServer

    results: dict[tuple[str, str], list[Any]] = {}
    with tempfile.TemporaryDirectory() as tmp, NatsServer() as server:
        baseline = _baseline(args.baseline, Path(tmp))
        for round_ in range(args.rounds):
            order = VARIANTS if round_ % 2 == 0 else tuple(reversed(VARIANTS))
            for transport in TRANSPORTS:
                for variant in order:
                    result = _run(variant, transport, server.url, args, baseline)
                    if variant in ("before", "off") and result["otel_loaded"]:
                        raise RuntimeError(f"{variant} loaded opentelemetry")
                    source = baseline if variant == "before" else ROOT
                    if not result["package"].startswith(str(source)):
                        raise RuntimeError(f"{variant} ran {result['package']}, not {source}")
                    results.setdefault((variant, transport), []).append(result)
            print(f"round {round_ + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    print(f"{args.rounds} rounds, medians; ratio = variant / before (rate; CPU per message)")
    head = ("transport", "op", "variant", "msg/s", "CPU µs", "best", "ratio", "CPU x")
    print("{:9} {:6} {:7} {:>9} {:>7} {:>6} {:>6} {:>6}".format(*head))
    for transport in TRANSPORTS:
        for op in OPS:
            base_rate = statistics.median(r[op][0] for r in results["before", transport])
            base_cpu = statistics.median(r[op][1] for r in results["before", transport])
            for variant in VARIANTS:
                rate = statistics.median(r[op][0] for r in results[variant, transport])
                cpu = statistics.median(r[op][1] for r in results[variant, transport])
                best = min(r[op][1] for r in results[variant, transport])
                print(
                    f"{transport:9} {op:6} {variant:7} {rate:9,.0f} {cpu:7.1f} {best:6.1f} "
                    f"{rate / base_rate:6.2f} {cpu / base_cpu:6.2f}"
                )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--baseline", default="eb215da", help="git ref of the code before")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--notifies", type=int, default=40_000)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--transport", default="memory", help=argparse.SUPPRESS)
    parser.add_argument("--url", default="", help=argparse.SUPPRESS)
    parsed = parser.parse_args()
    if parsed.worker:
        asyncio.run(
            _worker(parsed.worker, parsed.transport, parsed.url, parsed.requests, parsed.notifies)
        )
    else:
        main(parsed)
