"""One runner process serving counters, for the counter crash tests.

    python tests/_counter_node.py NATS_URL NODE_ID NUM_SHARDS

KV membership, counter state in JetStream KV (clstr.counters.serve_counters).
Prints ``ready`` once its shards are served; SIGTERM stops it gracefully.
"""

from __future__ import annotations

import asyncio
import signal
import sys

import structlog

from clstr.counters import serve_counters
from clstr.entities import KvStateStore, Sharding
from clstr.membership import KvMembership, KvSettings
from clstr.transports.nats import NatsOptions, NatsTransport

SETTINGS = KvSettings(heartbeat_interval=0.25, heartbeat_ttl=1.0, reconcile_interval=0.25)


async def main(url: str, node_id: str, num_shards: int) -> None:
    structlog.configure(
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        wrapper_class=structlog.make_filtering_bound_logger(30),
    )
    transport = await NatsTransport.connect(url, NatsOptions(name=node_id, reconnect_time_wait=0.1))
    runner = Sharding(
        transport,
        num_shards=num_shards,
        node_id=node_id,
        membership=lambda group: KvMembership(settings=SETTINGS),
        store=KvStateStore(transport),
        node_options={"stop_timeout": 5},
    )
    serve_counters(runner)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await runner.start()
    print("ready", flush=True)
    await stop.wait()
    await runner.shutdown()
    await transport.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
