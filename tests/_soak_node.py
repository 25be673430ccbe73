"""The node process of the soak test: a Node over NATS that reports on itself.

    python tests/_soak_node.py NATS_URL --num-shards 32 --period 0.25 \
        --reply-cache-ttl 2 [--leak-every N]

Serves every shard with a per-key counter handler (message type ``fail``
raises instead). Prints ``ready`` once its shards are served, then every
``--period`` seconds one JSON line::

    {"at": <time.monotonic()>, "rss": <bytes>, "tasks": <asyncio tasks>,
     "fds": <open fds>, "calls": <handler runs>}

read from /proc/self/statm, ``asyncio.all_tasks()`` and /proc/self/fd.
Stops gracefully on SIGTERM or when its stdin reaches EOF (the test went
away), then prints ``stopped <handler runs>`` and exits 0.

``--leak-every N`` plants the bug the soak must catch: every N-th call
starts a task that never ends (a mutation to check that the test catches
a leak; the soak itself never passes it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import time
from collections import Counter

import structlog
from prometheus_client import CollectorRegistry

from clstr import Envelope, Node, PrometheusMetrics
from clstr.transports.nats import NatsOptions, NatsTransport

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def sample(calls: int) -> dict[str, float | int]:
    """This process now: RSS in bytes, asyncio tasks, open file descriptors."""
    with open("/proc/self/statm") as statm:
        resident = int(statm.read().split()[1])
    return {
        "at": time.monotonic(),
        "rss": resident * PAGE_SIZE,
        "tasks": len(asyncio.all_tasks()),
        "fds": len(os.listdir("/proc/self/fd")),
        "calls": calls,
    }


async def main(args: argparse.Namespace) -> None:
    # This process is an application: it may configure logging. Errors only:
    # a warning with a traceback per failing call would swamp stderr.
    structlog.configure(
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR),
    )
    balances: Counter[str] = Counter()
    leaked: set[asyncio.Task[bool]] = set()
    calls = 0

    async def handle(env: Envelope) -> bytes:
        nonlocal calls
        calls += 1
        if args.leak_every and calls % args.leak_every == 0:
            leaked.add(asyncio.get_running_loop().create_task(asyncio.Event().wait()))
        if env.type == "fail":
            raise ValueError("refused")
        key = env.key or ""
        balances[key] += 1
        return str(balances[key]).encode()

    transport = await NatsTransport.connect(args.url, NatsOptions(name="soak-node"))
    node = Node(
        transport,
        handle,
        node_id="soak-node",
        num_shards=args.num_shards,
        metrics=PrometheusMetrics(CollectorRegistry()),
        reply_cache_ttl=args.reply_cache_ttl,
    )
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)

    def on_stdin() -> None:
        if not os.read(sys.stdin.fileno(), 4096):
            loop.remove_reader(sys.stdin.fileno())
            stop.set()

    loop.add_reader(sys.stdin.fileno(), on_stdin)
    await node.start()
    print("ready", flush=True)
    try:
        while not stop.is_set():
            stats = node.stats
            print(json.dumps(sample(stats.handled + stats.errors)), flush=True)
            try:
                async with asyncio.timeout(args.period):
                    await stop.wait()
            except TimeoutError:
                pass
    finally:
        loop.remove_reader(sys.stdin.fileno())
        await node.stop()
        await transport.close()
        for task in leaked:
            task.cancel()
    print(f"stopped {node.stats.handled + node.stats.errors}", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("url")
    parser.add_argument("--num-shards", type=int, default=32)
    parser.add_argument("--period", type=float, default=0.25)
    parser.add_argument("--reply-cache-ttl", type=float, default=2.0)
    parser.add_argument("--leak-every", type=int, default=0)
    asyncio.run(main(parser.parse_args()))
