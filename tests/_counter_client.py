"""One client process for the counter crash tests.

    python tests/_counter_client.py MODE NATS_URL NAMESPACE NUM_SHARDS KEYS COUNT

Prints ``ready`` once connected, ``progress N`` as it goes (strict: operations
acknowledged; lax: increments issued), and a JSON line at the end. Modes:

* ``strict``: COUNT increments (1 to 3 each) by 8 concurrent tasks on KEYS
  keys; the JSON holds the acknowledged sum per key and the failures.
* ``lax``: COUNT increments with ``inc_nowait`` in bursts, flushed every
  20 ms; ``close()`` flushes the rest; the JSON holds the sum issued per key.
* ``die``: COUNT increments through a LaxCounter, ``flush()`` (the JSON line
  ``acked``), then COUNT more without yielding to the loop (the JSON line
  ``unflushed``: nothing of them was sent), then SIGKILL of itself.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import sys

import structlog

from clstr import Client, RetryPolicy
from clstr.counters import LaxCounter, StrictCounter
from clstr.transports.nats import NatsOptions, NatsTransport


def say(line: str) -> None:
    print(line, flush=True)


async def strict(client: Client, namespace: str, keys: list[str], count: int) -> None:
    retry = RetryPolicy(attempt_timeout=1.0, max_backoff=0.2)
    counter = StrictCounter(client, namespace, timeout=30.0, retry=retry)
    acked = dict.fromkeys(keys, 0)
    failed = 0
    done = 0
    todo = iter(range(count))
    rng = random.Random(os.getpid())

    async def worker() -> None:
        nonlocal failed, done
        for _ in todo:
            key, n = rng.choice(keys), rng.randint(1, 3)
            try:
                await counter.inc(key, n)
            except Exception as exc:
                failed += 1
                print(f"failed {exc!r}", file=sys.stderr, flush=True)
                continue
            acked[key] += n
            done += 1
            if done % 50 == 0:
                say(f"progress {done}")

    await asyncio.gather(*(worker() for _ in range(8)))
    await counter.close()
    say(json.dumps({"acked": acked, "failed": failed}))


async def lax(client: Client, namespace: str, keys: list[str], count: int) -> None:
    issued = dict.fromkeys(keys, 0)
    rng = random.Random(os.getpid())
    async with LaxCounter(client, namespace, timeout=30.0) as counter:
        for i in range(count):
            key = rng.choice(keys)
            counter.inc_nowait(key)
            issued[key] += 1
            if i % 20 == 19:
                await asyncio.sleep(0.004)  # about 5,000 increments a second
            if i % 500 == 499:
                say(f"progress {i + 1}")
    say(json.dumps({"issued": issued, "stats": str(counter.stats)}))


async def die(client: Client, namespace: str, keys: list[str], count: int) -> None:
    counter = LaxCounter(client, namespace, timeout=30.0)
    acked = dict.fromkeys(keys, 0)
    for i in range(count):
        key = keys[i % len(keys)]
        counter.inc_nowait(key, 2)
        acked[key] += 2
        if i % 50 == 49:
            await asyncio.sleep(0.005)  # flushes happen meanwhile
    await counter.flush()
    say(json.dumps({"acked": acked}))
    for i in range(count):
        counter.inc_nowait(keys[i % len(keys)], 1)
    say(json.dumps({"unflushed": counter.unflushed()}))
    os.kill(os.getpid(), signal.SIGKILL)


async def main(
    mode: str, url: str, namespace: str, num_shards: int, nkeys: int, count: int
) -> None:
    structlog.configure(
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        wrapper_class=structlog.make_filtering_bound_logger(40),
    )
    transport = await NatsTransport.connect(url, NatsOptions(reconnect_time_wait=0.1))
    client = Client(transport, num_shards=num_shards)
    keys = [f"key-{i}" for i in range(nkeys)]
    say("ready")
    await {"strict": strict, "lax": lax, "die": die}[mode](client, namespace, keys, count)
    await client.close()
    await transport.close()


if __name__ == "__main__":
    mode, url, namespace, shards, nkeys, count = sys.argv[1:7]
    asyncio.run(main(mode, url, namespace, int(shards), int(nkeys), int(count)))
