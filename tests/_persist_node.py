"""One node process for the persisted-message crash tests: KV membership, consumers
of persisted messages, and a handler whose effect is guarded by a conditional write.

    python tests/_persist_node.py NATS_URL NODE_ID NUM_SHARDS PREFIX RECORD_FILE [DELAY]

The handler's effect is a create (only if absent) of the key of its request id in
the JetStream KV bucket ``<prefix>_effects``: the application's own guard for what
the framework cannot know (a node killed after the effect and before the reply was
stored). It appends ``S id node time`` when it starts, then ``A ...`` when its
effect was applied or ``D ...`` when the guard refused a duplicate, to RECORD_FILE
with single unbuffered writes, so a SIGKILL loses nothing that happened. Each call
waits 0 to 2 DELAY seconds (DELAY default 0.1) before its effect and again after it
(so a kill often falls between an effect and its stored reply). Prints ``ready`` once its
shards are served; SIGTERM stops it gracefully.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sys
import time

import structlog

from clstr import Envelope, Node
from clstr.membership import KvMembership, KvSettings
from clstr.persist import PersistSettings, serve_persisted
from clstr.transports.jetstream import is_cas_failure, kv_key, open_bucket
from clstr.transports.nats import NatsOptions, NatsTransport

SETTINGS = KvSettings(heartbeat_interval=0.25, heartbeat_ttl=1.0, reconcile_interval=0.25)


async def main(
    url: str, node_id: str, num_shards: int, prefix: str, record: str, delay: float
) -> None:
    # This process is an application: it may configure logging (stdout is for "ready").
    structlog.configure(
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        wrapper_class=structlog.make_filtering_bound_logger(30),
    )
    fd = os.open(record, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    transport = await NatsTransport.connect(url, NatsOptions(name=node_id, reconnect_time_wait=0.1))
    effects = await open_bucket(transport.nc.jetstream(), f"{prefix}_effects", replicas=1)

    def log(kind: str, request_id: str | None) -> None:
        os.write(fd, f"{kind} {request_id} {node_id} {time.time():.6f}\n".encode())

    async def handle(env: Envelope) -> bytes:
        log("S", env.id)
        await asyncio.sleep(random.uniform(0, 2 * delay))
        try:
            await effects.create(kv_key(str(env.id)), node_id.encode())
            log("A", env.id)
        except Exception as exc:
            if not is_cas_failure(exc):
                raise
            log("D", env.id)
        await asyncio.sleep(random.uniform(0, 2 * delay))
        return node_id.encode()

    node = Node(
        transport,
        handle,
        node_id=node_id,
        num_shards=num_shards,
        prefix=prefix,
        membership=KvMembership(settings=SETTINGS),
        stop_timeout=5,
    )
    serve_persisted(node, PersistSettings(grace=1.0))
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await node.start()
    print("ready", flush=True)
    await stop.wait()
    await node.stop()
    await transport.close()
    os.close(fd)


if __name__ == "__main__":
    delay = float(sys.argv[6]) if len(sys.argv) > 6 else 0.1
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5], delay))
