"""Persisted messages: throughput against raw JetStream, and answers after a crash.

    python benchmarks/bench_persist.py [--messages 5000] [--rounds 3] [--kills 5]

Throughput (one process, one embedded nats-server with JetStream, 8 shards):
``clstr bench``'s group ``persisted_rr`` (clstr/bench/_persisted.py), whose
rounds this script runs in its own process: the same ``--messages`` messages
of 100 bytes over 256 keys go

* **raw**: published by nats-py to a work-queue stream (``Nats-Msg-Id`` on each,
  256 publishes in flight) and pulled by one durable consumer per shard
  (batches of 64), each message acknowledged;
* **raw + reply**: the same, and a reply written to a KV bucket with a
  conditional create per message (the least a stored reply costs);
* **clstr**: sent with ``PersistedClient.send_raw`` (256 in flight) and consumed by
  a node's persisted-message consumers: reply-store check, the node's message
  path (an echo handler), the reply stored, the message acknowledged.

Each is timed from the first publish to the last acknowledgement (clstr: the
last stored reply), ``--rounds`` times alternating; the medians and the ratio
clstr / raw are printed.

Crash (node processes, this file in ``node`` mode, KV membership with a
heartbeat TTL of ``--ttl`` seconds): two nodes; 400 persisted messages (5 ms of
work each) are sent; once a quarter of them is answered, the node serving
most of the shards is SIGKILLed; time from the kill to the first reply of one
of its shards stored by the other node, and until every message is answered.
The killed node is started again before the next round. Prints each round,
the median and the maximum.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import statistics
import sys
import time
import uuid
from typing import Any

from clstr.bench._persisted import NUM_SHARDS, clstr_round, raw_round

# -- node mode (crash rounds) ----------------------------------------------------


async def node_main(url: str, node_id: str, prefix: str, ttl: float) -> None:
    import structlog

    from clstr import Envelope, Node
    from clstr.membership import KvMembership, KvSettings
    from clstr.persist import PersistSettings, serve_persisted
    from clstr.transports.nats import NatsOptions, NatsTransport

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))
    settings = KvSettings(heartbeat_interval=ttl / 8, heartbeat_ttl=ttl, reconcile_interval=0.1)
    transport = await NatsTransport.connect(url, NatsOptions(name=node_id, reconnect_time_wait=0.1))

    async def work(env: Envelope) -> bytes:
        await asyncio.sleep(0.005)
        return node_id.encode()

    node = Node(
        transport,
        work,
        node_id=node_id,
        num_shards=NUM_SHARDS,
        prefix=prefix,
        membership=KvMembership(settings=settings),
    )
    serve_persisted(node, PersistSettings(grace=0.5))
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await node.start()
    print("ready", flush=True)
    await stop.wait()
    await node.stop()
    await transport.close()


# -- throughput ----------------------------------------------------------------------


async def throughput(url: str, count: int, rounds: int) -> None:
    results: dict[str, list[float]] = {"raw": [], "raw + reply": [], "clstr": []}
    for n in range(rounds):
        results["raw"].append(count / await raw_round(url, count, reply=False))
        results["raw + reply"].append(count / await raw_round(url, count, reply=True))
        results["clstr"].append(count / await clstr_round(url, count))
        print(
            f"round {n + 1}: "
            + ", ".join(f"{name} {rates[-1]:,.0f} msg/s" for name, rates in results.items()),
            flush=True,
        )
    medians = {name: statistics.median(rates) for name, rates in results.items()}
    ratios = [c / r for c, r in zip(results["clstr"], results["raw"], strict=True)]
    print(
        f"median: raw {medians['raw']:,.0f}, raw + reply {medians['raw + reply']:,.0f}, "
        f"clstr {medians['clstr']:,.0f} msg/s; clstr / raw {statistics.median(ratios):.2f} "
        f"(rounds {', '.join(f'{r:.2f}' for r in ratios)}); clstr / (raw + reply) "
        f"{medians['clstr'] / medians['raw + reply']:.2f}"
    )


# -- crash rounds --------------------------------------------------------------------


class _Node:
    def __init__(self, node_id: str, url: str, prefix: str, ttl: float) -> None:
        self.node_id, self.url, self.prefix, self.ttl = node_id, url, prefix, ttl
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self.process = await asyncio.create_subprocess_exec(
            sys.executable,
            __file__,
            "node",
            self.url,
            self.node_id,
            self.prefix,
            str(self.ttl),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
        assert self.process.stdout is not None
        line = await asyncio.wait_for(self.process.stdout.readline(), 30)
        assert line.strip() == b"ready", line

    async def kill(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
            await self.process.wait()

    async def terminate(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            await self.process.wait()


async def crashes(url: str, kills: int, ttl: float) -> None:
    from clstr import Client
    from clstr.persist import PersistedClient
    from clstr.transports.jetstream import stop_watcher
    from clstr.transports.nats import NatsTransport

    prefix = f"k{uuid.uuid4().hex[:8]}"
    nodes = {n: _Node(n, url, prefix, ttl) for n in ("n1", "n2")}
    transport = await NatsTransport.connect(url)
    client = Client(transport, num_shards=NUM_SHARDS, prefix=prefix, timeout=2)
    persisted = PersistedClient(client)
    stored: dict[str, float] = {}  # request id -> when its reply was seen stored
    bucket = await persisted.replies.bucket()
    watcher = await bucket.watchall()

    async def follow() -> None:
        async for entry in watcher:
            if entry is not None and entry.value:
                stored[entry.key] = time.time()

    follower = asyncio.create_task(follow())
    firsts: list[float] = []
    alls: list[float] = []
    try:
        for node in nodes.values():
            await node.start()
        for round_ in range(kills):
            owners = await _owners(client)
            while len(owners) < NUM_SHARDS or len(set(owners.values())) < 2:
                await asyncio.sleep(0.2)  # both nodes settled: every shard served
                owners = await _owners(client)
            victim = max(nodes, key=lambda n: sum(1 for o in owners.values() if o == n))
            victim_shards = {s for s, o in owners.items() if o == victim}
            ids = []
            for n in range(400):
                key = f"r{round_}-{n}"
                ids.append((await persisted.send_raw("work", key=key), client.shard_for(key)))
            while len([i for i, _ in ids if i in stored]) < len(ids) // 4:  # noqa: ASYNC110
                await asyncio.sleep(0.001)
            await nodes[victim].kill()
            killed = time.time()
            pending = [(i, s) for i, s in ids if i not in stored]
            while any(i not in stored for i, _ in pending):  # noqa: ASYNC110 - a watch's set
                await asyncio.sleep(0.005)
            moved = [stored[i] for i, s in pending if s in victim_shards]
            first = min(moved) - killed if moved else float("nan")
            last = max(stored[i] for i, _ in pending) - killed
            firsts.append(first)
            alls.append(last)
            print(
                f"kill {round_ + 1}: {victim} ({len(victim_shards)} shards), "
                f"{len(pending)} pending: first answer from the other node after {first:.2f} s, "
                f"all answered after {last:.2f} s",
                flush=True,
            )
            await nodes[victim].start()
        print(
            f"{kills} kills, heartbeat TTL {ttl} s: first answer median "
            f"{statistics.median(firsts):.2f} s, max {max(firsts):.2f} s; all pending answered "
            f"median {statistics.median(alls):.2f} s, max {max(alls):.2f} s"
        )
    finally:
        await stop_watcher(watcher)
        follower.cancel()
        for node in nodes.values():
            await node.terminate()
        await client.close()
        await transport.close()


async def _owners(client: Any) -> dict[int, str]:
    """Which node serves each shard now (node info), leaving out shards nobody serves."""
    from clstr import RequestError

    owners = {}
    for shard in range(NUM_SHARDS):
        with contextlib.suppress(RequestError):
            owners[shard] = (await client.shard(shard).node_info()).node_id
    return owners


async def main(args: argparse.Namespace) -> None:
    from clstr.testing import NatsServer

    async with NatsServer(jetstream=True) as server:
        await throughput(server.url, args.messages, args.rounds)
        if args.kills:
            await crashes(server.url, args.kills, args.ttl)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "node":
        asyncio.run(node_main(sys.argv[2], sys.argv[3], sys.argv[4], float(sys.argv[5])))
    else:
        parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
        parser.add_argument("--messages", type=int, default=5000)
        parser.add_argument("--rounds", type=int, default=3)
        parser.add_argument("--kills", type=int, default=5)
        parser.add_argument("--ttl", type=float, default=2.0)
        asyncio.run(main(parser.parse_args()))
