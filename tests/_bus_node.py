"""One consumer node process for the event bus kill test.

    python tests/_bus_node.py NATS_URL NODE_ID NUM_SHARDS RECORD_FILE CHECKPOINT_INTERVAL

A clstr node with KvMembership whose BusConsumer consumes bus ``orders``. Every
handled event appends ``H node shard frame offset payload time`` to RECORD_FILE and
every checkpoint written ``C node shard frame offset time``, each with one
unbuffered write, so a SIGKILL loses nothing that happened. Prints a JSON ``node
ready`` record once its shards are served; SIGTERM stops it gracefully.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import Sequence

import structlog

from clstr import Envelope, Node
from clstr.eventbus import (
    BusConsumer,
    Checkpoint,
    CheckpointStore,
    ConsumerSettings,
    KvCheckpoints,
    Position,
    StoredEvent,
)
from clstr.membership import KvMembership, KvSettings
from clstr.transports.nats import NatsOptions, NatsTransport

SETTINGS = KvSettings(heartbeat_interval=0.25, heartbeat_ttl=1.0, reconcile_interval=0.25)


class RecordingCheckpoints(CheckpointStore):
    """Checkpoints kept by ``store`` whose every successful write is appended to the record."""

    def __init__(self, store: CheckpointStore, fd: int, node_id: str) -> None:
        self.store = store
        self.fd = fd
        self.node_id = node_id

    async def load(self, bus: str, shard: int) -> Checkpoint | None:
        return await self.store.load(bus, shard)

    async def save(
        self, bus: str, shard: int, position: Position, *, token: int, node: str, revision: int
    ) -> int:
        revision = await self.store.save(
            bus, shard, position, token=token, node=node, revision=revision
        )
        line = f"C {self.node_id} {shard} {position.frame} {position.offset} {time.time():.6f}\n"
        os.write(self.fd, line.encode())
        return revision


async def _noop(env: Envelope) -> bytes:
    return b""


async def main(url: str, node_id: str, num_shards: int, record: str, interval: float) -> None:
    structlog.configure(
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        wrapper_class=structlog.make_filtering_bound_logger(30),
    )
    fd = os.open(record, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    transport = await NatsTransport.connect(url, NatsOptions(name=node_id, reconnect_time_wait=0.1))
    checkpoints = RecordingCheckpoints(await KvCheckpoints.open(transport), fd, node_id)

    async def handle(events: Sequence[StoredEvent]) -> None:
        now = time.time()
        lines = "".join(
            f"H {node_id} {e.shard} {e.frame} {e.offset} {int(e.payload)} {now:.6f}\n"
            for e in events
        )
        os.write(fd, lines.encode())

    node = Node(
        transport,
        _noop,
        node_id=node_id,
        num_shards=num_shards,
        membership=KvMembership(settings=SETTINGS),
        stop_timeout=5,
    )
    consumer = BusConsumer(
        node,
        "orders",
        handle,
        checkpoints=checkpoints,
        settings=ConsumerSettings(
            checkpoint_interval=interval, refresh_interval=0.2, idle_wait=(0.005, 0.05)
        ),
    )
    consumer.bind()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await node.start()
    print(
        json.dumps({"event": "node ready", "pid": os.getpid(), "shards": node.shards}), flush=True
    )
    await stop.wait()
    await node.stop()
    await transport.close()
    os.close(fd)


if __name__ == "__main__":
    url, node_id, shards, record, interval = sys.argv[1:6]
    asyncio.run(main(url, node_id, int(shards), record, float(interval)))
