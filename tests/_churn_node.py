"""One node process for the churn tests: dynamic membership, a recorded counter handler.

    python tests/_churn_node.py NATS_URL NODE_ID NUM_SHARDS RECORD_FILE

The handler increments a per-key counter kept in the JetStream KV bucket
``counters`` (so the count survives the node), deduplicating by request id
inside the same compare-and-set write: retries never count twice. That
check is the application's own guard for what the framework cannot know (a
node killed between its write and its reply); every time it catches a
duplicate the call appends ``D ...``, so the test can tell that only a crash
led there (the reply cache and its handoff answer every other retry).

Calls take 0-20 ms, and one in twenty takes 1.3 s (longer than the client's
attempt timeout, so its retries arrive while it runs, and shards move under
it). Every call appends ``S shard node time id`` when it starts and
``E ...`` when it ends to RECORD_FILE with single unbuffered writes, so a
SIGKILL loses nothing that happened. Prints ``ready`` once its shards are served; SIGTERM stops it
gracefully.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import sys
import time

import nats.js.errors
import structlog

from clstr import Envelope, Node
from clstr.membership import KvMembership, KvSettings
from clstr.transports.nats import NatsOptions, NatsTransport

SETTINGS = KvSettings(heartbeat_interval=0.25, heartbeat_ttl=1.0, reconcile_interval=0.25)
SLOW_CALL = 1.3  # seconds; longer than the churn client's attempt timeout
SLOW_SHARE = 0.05


async def main(url: str, node_id: str, num_shards: int, record: str) -> None:
    # This process is an application: it may configure logging (stdout is for "ready").
    structlog.configure(
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        wrapper_class=structlog.make_filtering_bound_logger(30),
    )
    fd = os.open(record, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    transport = await NatsTransport.connect(url, NatsOptions(name=node_id, reconnect_time_wait=0.1))
    js = transport.nc.jetstream()
    try:
        counters = await js.key_value("counters")
    except nats.js.errors.BucketNotFoundError:
        counters = await js.create_key_value(bucket="counters")

    def log(kind: str, env: Envelope) -> None:
        os.write(fd, f"{kind} {env.shard} {node_id} {time.time():.6f} {env.id}\n".encode())

    async def handle(env: Envelope) -> bytes:
        log("S", env)
        try:
            assert env.key is not None
            await asyncio.sleep(SLOW_CALL if random.random() < SLOW_SHARE else random.random() / 50)
            try:
                entry = await counters.get(env.key)
                state = json.loads(entry.value)
                revision = entry.revision
            except nats.js.errors.KeyNotFoundError:
                state, revision = {"n": 0, "ids": []}, 0
            if env.id in state["ids"]:
                log("D", env)
            else:
                state["n"] += 1
                state["ids"] = [*state["ids"], env.id][-256:]
                value = json.dumps(state).encode()
                if revision:
                    await counters.update(env.key, value, last=revision)
                else:
                    await counters.create(env.key, value)
            return str(state["n"]).encode()
        finally:
            log("E", env)

    node = Node(
        transport,
        handle,
        node_id=node_id,
        num_shards=num_shards,
        membership=KvMembership(settings=SETTINGS),
        stop_timeout=5,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await node.start()
    print("ready", flush=True)
    await stop.wait()
    await node.stop()
    await transport.close()
    os.close(fd)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]))
