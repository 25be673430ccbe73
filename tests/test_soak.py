"""Soak: sustained load over a real nats-server, watching the process for leaks.

Two nodes and a client (this process plays the node process) run keyed
requests, requests with ids (the reply cache), notifications and errors
without pause. A sampler reads the process's resident memory (RSS), its
asyncio task count and its open file descriptors (/proc/self/fd). After a
warm-up, none may grow by more than 10% over its warm-up level.

CI runs the short soak (``CLSTR_SOAK_SECONDS``, default 3 s). The full
60-second soak is marked ``slow``: run it with ``pytest -m slow
tests/test_soak.py -s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from statistics import median

import pytest
import structlog
from prometheus_client import CollectorRegistry

from clstr import Client, Envelope, Node, PrometheusMetrics, RemoteHandlerError
from clstr.testing import NatsServer
from clstr.transports.nats import NatsOptions, NatsTransport

SHORT_SECONDS = float(os.environ.get("CLSTR_SOAK_SECONDS", "3"))
FULL_SECONDS = 60.0
WARM_UP_FRACTION = 0.25
GROWTH_BOUND = 0.10
SAMPLES = 30
NUM_SHARDS = 32
NODE_IDS = ["node-0", "node-1"]
KEYS = [f"account-{i}" for i in range(2000)]
WORKERS = 16
# The reply cache holds rate x TTL replies (up to its size): with the default
# 60 s TTL it would still be filling, legitimately, well after warm-up. A TTL
# shorter than the warm-up lets it reach its steady state first.
REPLY_CACHE_TTL = 5.0

pytestmark = pytest.mark.skipif(
    not Path("/proc/self/fd").is_dir() or sys.platform != "linux",
    reason="the soak samples /proc (Linux)",
)


@dataclass
class Sample:
    at: float
    rss: int
    tasks: int
    fds: int


def sample(started: float) -> Sample:
    """RSS in bytes, asyncio tasks and open file descriptors of this process, now."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return Sample(
        at=time.monotonic() - started,
        rss=pages * os.sysconf("SC_PAGE_SIZE"),
        tasks=len(asyncio.all_tasks()),
        fds=len(os.listdir("/proc/self/fd")),
    )


@dataclass
class Ledger:
    """Per-key balances: the stateful handler under load."""

    balances: Counter[str] = field(default_factory=Counter)

    async def __call__(self, env: Envelope) -> bytes:
        if env.type == "fail":
            raise ValueError("refused")
        key = env.key or ""
        self.balances[key] += 1
        return str(self.balances[key]).encode()


@dataclass
class Report:
    requests: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    samples: list[Sample] = field(default_factory=list)

    def growth(self, warm_up: float) -> dict[str, float]:
        """Growth of each measure after warm-up over its level during warm-up.

        RSS and fds are compared by their peaks. Tasks by their medians: the
        node's worker tasks come and go with the requests in flight, so a
        leak shows as a rising floor, not as a peak.
        """
        before = [s for s in self.samples if s.at <= warm_up]
        after = [s for s in self.samples if s.at > warm_up]
        assert before, "no sample during warm-up"
        assert after, "no sample after warm-up"

        def grew(name: str, level: Callable[[list[int]], float]) -> float:
            return (
                level([getattr(s, name) for s in after]) / level([getattr(s, name) for s in before])
                - 1
            )

        return {"rss": grew("rss", max), "tasks": grew("tasks", median), "fds": grew("fds", max)}


async def soak(url: str, seconds: float) -> Report:
    """Run the load for ``seconds``, sampling the process all along."""
    registry = CollectorRegistry()
    metrics = PrometheusMetrics(registry)
    transports: list[NatsTransport] = []
    for name in [*NODE_IDS, "client"]:
        transports.append(await NatsTransport.connect(url, NatsOptions(name=name)))
    ledger = Ledger()
    nodes = [
        Node(
            t,
            ledger,
            node_id=n,
            nodes=NODE_IDS,
            num_shards=NUM_SHARDS,
            metrics=metrics,
            reply_cache_ttl=REPLY_CACHE_TTL,
        )
        for n, t in zip(NODE_IDS, transports, strict=False)
    ]
    client = Client(transports[-1], num_shards=NUM_SHARDS, timeout=5.0, metrics=metrics)
    report = Report()
    stop = asyncio.Event()
    started = time.monotonic()
    keys = itertools.cycle(KEYS)

    async def worker(n: int) -> None:
        for i in itertools.count():
            if stop.is_set():
                return
            key = next(keys)
            kind = (i + n) % 10
            try:
                if kind == 0:
                    await client.notify_key(key, "inc")
                elif kind == 1:
                    await client.request_key(key, "fail")
                elif kind == 2:
                    await client.request_key(key, "inc", request_id=uuid.uuid4().hex)
                else:
                    await client.request_key(key, "inc")
            except RemoteHandlerError:
                pass
            except Exception as exc:  # any other error is a finding: count it
                report.errors[type(exc).__name__] += 1
            report.requests += 1

    async def sampler() -> None:
        while not stop.is_set():
            report.samples.append(sample(started))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=seconds / SAMPLES)

    try:
        for node in nodes:
            await node.start()
        async with asyncio.TaskGroup() as tg:
            for n in range(WORKERS):
                tg.create_task(worker(n))
            tg.create_task(sampler())
            await asyncio.sleep(seconds)  # the soak's length itself, not a synchronisation
            stop.set()
    finally:
        for node in nodes:
            await node.stop()
        for transport in transports:
            await transport.close()
    return report


def check(report: Report, seconds: float) -> None:
    warm_up = max(seconds * WARM_UP_FRACTION, 0.5)
    growth = report.growth(warm_up)
    last = report.samples[-1]
    print(
        f"\nsoak {seconds:.0f}s: {report.requests} calls ({report.requests / seconds:,.0f}/s), "
        f"errors {dict(report.errors)}; after {warm_up:.1f}s warm-up: "
        f"RSS {growth['rss']:+.1%} (now {last.rss / 2**20:.1f} MiB), "
        f"tasks {growth['tasks']:+.1%} (now {last.tasks}), "
        f"fds {growth['fds']:+.1%} (now {last.fds})"
    )
    assert report.errors == {}
    assert report.requests > 0
    for name, value in growth.items():
        assert value <= GROWTH_BOUND, f"{name} grew by {value:.1%} after warm-up"


@pytest.fixture(autouse=True)
def quiet_logs() -> Iterator[None]:
    """Errors only: a warning with a traceback per failing call would swamp the run."""
    saved = structlog.get_config()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    try:
        yield
    finally:
        structlog.configure(**saved)


class TestSoak:
    """Sustained load leaks no memory, tasks or file descriptors."""

    async def test_short_soak(self, clstr_nats_server: NatsServer) -> None:
        """A few seconds of load (CLSTR_SOAK_SECONDS): RSS, tasks and fds stay flat."""
        check(await soak(clstr_nats_server.url, SHORT_SECONDS), SHORT_SECONDS)

    @pytest.mark.slow
    @pytest.mark.timeout(FULL_SECONDS + 60)
    async def test_full_soak(self, clstr_nats_server: NatsServer) -> None:
        """Sixty seconds of load: RSS, tasks and fds stay within 10% of warm-up.

        Deselected by default (``-m "not slow"`` in the pytest settings): run it
        with ``pytest -m slow tests/test_soak.py``.
        """
        check(await soak(clstr_nats_server.url, FULL_SECONDS), FULL_SECONDS)
