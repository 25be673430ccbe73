"""Soak: sustained load on a node in its own process, watching that process for leaks.

The node runs in a process of its own (``tests/_soak_node.py``), so that what
is measured is the node alone, from a fresh interpreter, whatever ran in the
test process before. This process drives the load over a real nats-server
(keyed requests, requests with ids for the reply cache, notifications and
failing handler calls, 16 loops without pause) and reads the samples the
node prints: its resident memory (RSS), asyncio task count and open file
descriptors. After a warm-up, none may grow by more than 10% over its
warm-up level.

The warm-up must cover what legitimately fills under load and then stays
bounded: the node keeps a loop timer per millisecond of handler deadline in
use (up to the request timeout ahead) and replies with ids for the reply
cache's TTL. Both are short here (``REQUEST_TIMEOUT``, ``REPLY_CACHE_TTL``),
and the warm-up lasts at least that horizon plus a second.

CI runs the short soak (``CLSTR_SOAK_SECONDS``, default 9 s). The full
60-second soak is marked ``slow``: run it with ``pytest -m slow
tests/test_soak.py -s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from clstr import Client, RemoteHandlerError
from clstr.testing import NatsServer
from clstr.transports.nats import NatsOptions, NatsTransport

NODE_SCRIPT = Path(__file__).with_name("_soak_node.py")
SHORT_SECONDS = float(os.environ.get("CLSTR_SOAK_SECONDS", "9"))
FULL_SECONDS = 60.0
GROWTH_BOUND = 0.10
NUM_SHARDS = 32
KEYS = [f"account-{i}" for i in range(2000)]
WORKERS = 16
# The horizon of what fills legitimately: handler deadline timers reach one
# request timeout ahead, cached replies live REPLY_CACHE_TTL.
REQUEST_TIMEOUT = 2.0
REPLY_CACHE_TTL = 2.0
HORIZON = max(REQUEST_TIMEOUT, REPLY_CACHE_TTL)
WARM_UP_FRACTION = 0.25
READY_TIMEOUT = 20.0

pytestmark = pytest.mark.skipif(
    not Path("/proc/self/fd").is_dir() or sys.platform != "linux",
    reason="the soak samples /proc (Linux)",
)


def warm_up_for(seconds: float) -> float:
    """A quarter of the run, and never less than the bounded-fill horizon plus 1 s."""
    return max(seconds * WARM_UP_FRACTION, HORIZON + 1.0)


def sample_period(seconds: float) -> float:
    """About 40 samples a run, at least 0.1 s apart."""
    return max(seconds / 40, 0.1)


@dataclass
class Sample:
    at: float  # seconds since the load started
    rss: int
    tasks: int
    fds: int
    calls: int


@dataclass
class Report:
    requests: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    samples: list[Sample] = field(default_factory=list)
    exit_code: int | None = None
    handled: int = 0  # handler runs on the node, all told

    def growth(self, warm_up: float) -> dict[str, float]:
        """Growth of each measure after warm-up over its level during warm-up.

        RSS and fds are compared by their peaks. Tasks by their floors (the
        fewest seen): the node's worker tasks come and go with the requests
        in flight (0 to ``WORKERS`` of them at a sample), so a leak shows as
        a rising floor, not as a peak.
        """
        before = [s for s in self.samples if s.at <= warm_up]
        after = [s for s in self.samples if s.at > warm_up]
        assert len(before) >= 3, f"too few samples during warm-up: {len(before)}"
        assert len(after) >= 3, f"too few samples after warm-up: {len(after)}"

        def grew(name: str, level: Callable[[list[int]], float]) -> float:
            return (
                level([getattr(s, name) for s in after]) / level([getattr(s, name) for s in before])
                - 1
            )

        return {"rss": grew("rss", max), "tasks": grew("tasks", min), "fds": grew("fds", max)}


async def soak(url: str, seconds: float, tmp_path: Path, *, leak_every: int = 0) -> Report:
    """Run a node process and ``seconds`` of load on it; collect its samples."""
    report = Report()
    stderr_path = tmp_path / "soak-node.stderr"
    args = [
        str(NODE_SCRIPT),
        url,
        f"--num-shards={NUM_SHARDS}",
        f"--period={sample_period(seconds)}",
        f"--reply-cache-ttl={REPLY_CACHE_TTL}",
        f"--leak-every={leak_every}",
    ]
    with stderr_path.open("wb") as stderr:
        node = await asyncio.create_subprocess_exec(
            sys.executable,
            *args,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=stderr,
        )
    assert node.stdin is not None
    assert node.stdout is not None
    stdout = node.stdout
    transport: NatsTransport | None = None
    try:
        line = await asyncio.wait_for(stdout.readline(), READY_TIMEOUT)
        assert line == b"ready\n", f"node said {line!r}; stderr: {stderr_path.read_text()}"
        transport = await NatsTransport.connect(url, NatsOptions(name="soak-client"))
        client = Client(transport, num_shards=NUM_SHARDS, timeout=REQUEST_TIMEOUT)
        started = time.monotonic()
        stop = asyncio.Event()
        keys = itertools.cycle(KEYS)

        async def read_samples() -> None:
            while line := await stdout.readline():
                if line.startswith(b"{"):
                    s = json.loads(line)
                    if s["at"] >= started:  # CLOCK_MONOTONIC is the same in both processes
                        s["at"] -= started
                        report.samples.append(Sample(**s))
                elif line.startswith(b"stopped "):
                    report.handled = int(line.split()[1])

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

        reader = asyncio.create_task(read_samples())
        try:
            async with asyncio.TaskGroup() as tg:
                for n in range(WORKERS):
                    tg.create_task(worker(n))
                await asyncio.sleep(seconds)  # the soak's length itself, not a synchronisation
                stop.set()
        finally:
            # EOF on its stdin stops the node; its last line is "stopped <runs>".
            node.stdin.close()
            report.exit_code = await asyncio.wait_for(node.wait(), 15)
            await reader
    finally:
        if transport is not None:
            await transport.close()
        if node.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                node.send_signal(signal.SIGKILL)
            await node.wait()
    return report


def check(report: Report, seconds: float) -> dict[str, float]:
    """Print the figures; assert no error, a clean exit and bounded growth."""
    warm_up = warm_up_for(seconds)
    growth = report.growth(warm_up)
    last = report.samples[-1]
    print(
        f"\nsoak {seconds:.0f}s: {report.requests} calls ({report.requests / seconds:,.0f}/s; "
        f"{report.handled} handler runs on the node), errors {dict(report.errors)}; "
        f"after {warm_up:.1f}s warm-up, over {len(report.samples)} samples: "
        f"RSS {growth['rss']:+.1%} (now {last.rss / 2**20:.1f} MiB), "
        f"tasks {growth['tasks']:+.1%} (now {last.tasks}), "
        f"fds {growth['fds']:+.1%} (now {last.fds})"
    )
    assert report.exit_code == 0
    assert report.handled > 0
    assert report.errors == {}
    assert report.requests > 0
    return growth


class TestSoak:
    """Sustained load leaks no memory, tasks or file descriptors in the node process."""

    async def test_short_soak(self, clstr_nats_server: NatsServer, tmp_path: Path) -> None:
        """Several seconds of load (CLSTR_SOAK_SECONDS): RSS, tasks and fds stay flat."""
        report = await soak(clstr_nats_server.url, SHORT_SECONDS, tmp_path)
        for name, value in check(report, SHORT_SECONDS).items():
            assert value <= GROWTH_BOUND, f"{name} grew by {value:.1%} after warm-up"

    @pytest.mark.slow
    @pytest.mark.timeout(FULL_SECONDS + 60)
    async def test_full_soak(self, clstr_nats_server: NatsServer, tmp_path: Path) -> None:
        """Sixty seconds of load: RSS, tasks and fds stay within 10% of warm-up.

        Deselected by default (``-m "not slow"`` in the pytest settings): run it
        with ``pytest -m slow tests/test_soak.py``.
        """
        report = await soak(clstr_nats_server.url, FULL_SECONDS, tmp_path)
        for name, value in check(report, FULL_SECONDS).items():
            assert value <= GROWTH_BOUND, f"{name} grew by {value:.1%} after warm-up"
