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

Then, for the finer figure that process-to-process noise hides, ``before``
and ``off`` in **one** process (the baseline imported as ``clstr_before``):
sequential requests and notifications over the memory transport, the two
alternating run by run, best of ``--same-runs`` runs; and what one span costs
the OpenTelemetry SDK by itself (start with 5 attributes, end, batched to an
exporter that drops it), for scale.
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


def _import_before(baseline: Path) -> Any:
    """The baseline package, imported under the name ``clstr_before``."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "clstr_before",
        baseline / "clstr" / "__init__.py",
        submodule_search_locations=[str(baseline / "clstr")],
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["clstr_before"] = module
    spec.loader.exec_module(module)
    return module


async def _sequential(package: Any, n: int) -> tuple[float, float]:
    """(CPU µs a request, CPU µs a notification) of ``n`` sequential calls each,
    one node and one client of ``package`` on its memory transport. CPU time:
    other processes on the host move it far less than wall time."""
    handled = 0
    reached = asyncio.Event()

    async def handler(env: Any) -> bytes:
        nonlocal handled
        handled += 1
        if handled == n:
            reached.set()
        return b""

    network = package.MemoryNetwork()
    async with package.Node(package.MemoryTransport(network), handler, num_shards=64):
        client = package.Client(package.MemoryTransport(network), num_shards=64)
        started = time.process_time()
        for i in range(n):
            await client.request_key(KEYS[i % len(KEYS)], "echo", b"x")
        request = (time.process_time() - started) / n * 1e6
        handled = 0
        started = time.process_time()
        for i in range(n):
            await client.notify_key(KEYS[i % len(KEYS)], "count", b"x")
        await reached.wait()
        notify = (time.process_time() - started) / n * 1e6
    return request, notify


async def _opcodes(package: Any, n: int) -> tuple[float, float]:
    """Python bytecodes executed per request and per notification (``n`` each,
    after a warm-up), counted with opcode tracing: no noise, and only the
    Python part of the work (msgpack, BLAKE3 and the loop's C code are not
    counted, so it overstates what a change in Python code weighs)."""
    count = 0

    def tracer(frame: Any, event: str, arg: Any) -> Any:
        nonlocal count
        if "/clstr/" not in frame.f_code.co_filename:
            return None  # asyncio's share moves with wall time (timers), not with clstr
        frame.f_trace_opcodes = True
        if event == "opcode":
            count += 1
        return tracer

    handled = 0
    reached = asyncio.Event()

    async def handler(env: Any) -> bytes:
        nonlocal handled
        handled += 1
        if handled == n:
            reached.set()
        return b""

    network = package.MemoryNetwork()
    async with package.Node(package.MemoryTransport(network), handler, num_shards=64):
        client = package.Client(package.MemoryTransport(network), num_shards=64)
        for i in range(100):
            await client.request_key(KEYS[i], "echo", b"x")
        sys.settrace(tracer)
        for i in range(n):
            await client.request_key(KEYS[i % len(KEYS)], "echo", b"x")
        sys.settrace(None)
        requests, count, handled = count / n, 0, 0
        sys.settrace(tracer)
        for i in range(n):
            await client.notify_key(KEYS[i % len(KEYS)], "count", b"x")
        await reached.wait()
        sys.settrace(None)
    return requests, count / n


def same_process(baseline: Path, runs: int, n: int) -> None:
    import structlog

    import clstr

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))
    packages = {"before": _import_before(baseline), "off": clstr}
    best = {name: [float("inf"), float("inf")] for name in packages}
    for run in range(runs):
        for name in packages if run % 2 == 0 else reversed(packages):
            request, notify = asyncio.run(_sequential(packages[name], n))
            best[name] = [min(best[name][0], request), min(best[name][1], notify)]
    before, off = best["before"], best["off"]
    ops = {name: asyncio.run(_opcodes(package, 500)) for name, package in packages.items()}
    print("one process, memory transport, clstr's Python bytecodes executed a call:")
    for i, op in enumerate(("request/reply", "notify")):
        counts = ops["before"][i], ops["off"][i]
        print(
            f"  {op + ':':14} before {counts[0]:.0f}, off {counts[1]:.0f} "
            f"({counts[1] - counts[0]:+.0f}, {(counts[1] / counts[0] - 1) * 100:+.1f} %)"
        )
    print(f"one process, memory transport, CPU, best of {runs} runs of {n} sequential calls:")
    print(
        f"  request/reply: before {before[0]:.2f} µs, off {off[0]:.2f} µs, "
        f"ratio {before[0] / off[0]:.3f} (rate off / before)"
    )
    print(
        f"  notify:        before {before[1]:.2f} µs, off {off[1]:.2f} µs, "
        f"ratio {before[1] / off[1]:.3f}"
    )


def span_cost(spans: int = 20_000) -> None:
    """CPU µs the SDK spends on one span (best of 3), with nothing of clstr's."""
    provider = _tracing("on")["tracing"]._tracer
    attributes = {"a": 1, "b": "x", "c": "y", "d": 2, "e": "z"}
    best = float("inf")
    for _ in range(3):
        started = time.process_time()
        for _ in range(spans):
            span = provider.start_span("s", attributes=attributes)
            span.set_attribute("o", "ok")
            span.end()
        best = min(best, (time.process_time() - started) / spans * 1e6)
    print(f"the OpenTelemetry SDK alone: {best:.1f} CPU µs a span (start, 6 attributes, end)")


def main(args: argparse.Namespace) -> None:
    from clstr.testing import NatsServer

    results: dict[tuple[str, str], list[Any]] = {}
    with tempfile.TemporaryDirectory() as tmp, NatsServer() as server:
        baseline = _baseline(args.baseline, Path(tmp))
        if args.same_runs:
            same_process(baseline, args.same_runs, args.same_calls)
            span_cost()
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
    if not args.rounds:
        return
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
    parser.add_argument("--same-runs", type=int, default=21)
    parser.add_argument("--same-calls", type=int, default=5000)
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
