"""Instructions per message on clstr's hot paths, counted by valgrind's callgrind.

A count that other processes loading the machine do not move: compare
patches with it where wall-clock and CPU time are too noisy to show a few
per cent (docs/benchmarks.md)::

    git archive main | tar -x -C /tmp/old
    python benchmarks/instructions.py --tree old=/tmp/old --tree new=. [PATH ...]

Each tree is a directory holding a ``clstr`` package. The paths:

* ``client-notify``: ``Client.notify_key`` over a NATS transport whose
  connection is marked connected but never flushed (the client's side only);
* ``node-notify``, ``node-request``: a node's intake and workers, fed encoded
  notifications (requests with a TTL and a reply subject) in batches of 100;
* ``memory-rr``: request/reply over the memory transport, client and node in
  one process, 256 in flight.

Each figure is the difference between runs of ``n`` and ``2n`` steps divided
by the messages of ``n`` steps, so that start-up cancels out. The paths with
deadlines (``node-request``, ``memory-rr``) vary by a few per cent from run
to run: their timers depend on how many milliseconds pass.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

_CLIENT = """
import os
from clstr import Client
from clstr.transports.nats import NatsConnection, NatsTransport
nc = NatsConnection()
nc._status = NatsConnection.CONNECTED
nc._max_payload = 1 << 20
nc._max_pending_size = 1 << 62
nc._flush_queue = None
client = Client(NatsTransport(nc), num_shards=64)
payload = os.urandom(100)
keys = [f"key-{i}" for i in range(1024)]
def step(i):
    coro = client.notify_key(keys[i % 1024], "count", payload)
    try:
        coro.send(None)
    except StopIteration:
        pass
    if len(nc._pending) > 1000:
        nc._pending.clear()
        nc._pending_data_size = 0
"""

_NODE = """
import asyncio, logging, os
import structlog
structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
from clstr import Client, MemoryTransport, Node
loop = asyncio.new_event_loop()
asyncio.set_event_loop(loop)
state = {"count": 0, "target": 0, "done": None}
async def handler(env):
    state["count"] += 1
    if state["count"] == state["target"]:
        state["done"].set_result(None)
    return env.data if env.type == "echo" else None
transport = MemoryTransport(name="node")
node = Node(transport, handler, num_shards=64, node_id="n", max_pending=100_000,
            loop_stall_threshold=None)
client = Client(transport.connect("client"), num_shards=64)
payload = os.urandom(100)
messages = []
for i in range(4000):
    key = f"key-{i % 1024}"
    shard = client.shard_for(key)
    if REQUEST:
        env, _ = client.build_request(shard, "echo", payload, key=key)
        messages.append((shard, client._encode(env, ttl=9.9), "_INBOX.x.1"))
    else:
        messages.append((shard, client.build_request(shard, "count", payload, key=key)[1], None))
loop.run_until_complete(node.start())
transport.publish_nowait = lambda subject, data: None  # replies go nowhere
on_message = node._intake.on_message
async def feed(i):
    state["done"] = loop.create_future()
    state["target"] = state["count"] + 100
    base = i * 100 % 4000
    for shard, body, reply in messages[base:base + 100]:
        on_message(shard, body, reply)
    await state["done"]
def step(i):
    loop.run_until_complete(feed(i))
"""

_MEMORY = """
import asyncio, logging, os
import structlog
structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
from clstr import Client, MemoryTransport, Node
from clstr.bench._timing import drive
loop = asyncio.new_event_loop()
asyncio.set_event_loop(loop)
async def echo(env):
    return env.data
transport = MemoryTransport(name="node")
node = Node(transport, echo, num_shards=64, node_id="n", loop_stall_threshold=None)
client = Client(transport.connect("client"), num_shards=64, timeout=10.0)
keys = [f"key-{i}" for i in range(1024)]
payload = os.urandom(100)
async def request(i):
    return await client.request_key(keys[i % 1024], "echo", payload)
loop.run_until_complete(node.start())
def step(i):
    loop.run_until_complete(drive(request, 512, 256))
"""

# name -> (code defining step(i), messages per step, steps n)
PATHS: dict[str, tuple[str, int, int]] = {
    "client-notify": (_CLIENT, 1, 2000),
    "node-notify": ("REQUEST = False\n" + _NODE, 100, 100),
    "node-request": ("REQUEST = True\n" + _NODE, 100, 100),
    "memory-rr": (_MEMORY, 512, 20),
}


def count(tree: Path, code: str, steps: int) -> int:
    """Instructions of one interpreter running ``code``, a warm-up, then ``steps`` steps."""
    program = f"{code}\nfor i in range(20):\n    step(i)\nfor i in range({steps}):\n    step(i)\n"
    env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONHASHSEED": "0"}
    callgrind = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null"]
    done = subprocess.run(
        [*callgrind, sys.executable, "-c", program],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    found = re.search(r"Collected : (\d+)", done.stderr)
    if found is None:
        raise RuntimeError(f"no instruction count from callgrind:\n{done.stderr[-2000:]}")
    return int(found.group(1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", action="append", required=True, metavar="NAME=DIR")
    parser.add_argument("paths", nargs="*", help=f"some of {', '.join(PATHS)} (default: all)")
    args = parser.parse_args()
    unknown = set(args.paths) - set(PATHS)
    if unknown:
        parser.error(f"unknown paths: {', '.join(sorted(unknown))}")
    trees = {}
    for spec in args.tree:
        name, _, path = spec.partition("=")
        tree = Path(path).resolve()
        if not (tree / "clstr" / "__init__.py").is_file():
            parser.error(f"{tree} holds no clstr package")
        trees[name] = tree
    print(f"{'instructions per message':26s}" + "".join(f"{n:>14s}" for n in trees))
    for path in args.paths or list(PATHS):
        code, per_step, steps = PATHS[path]
        cells = []
        for tree in trees.values():
            extra = count(tree, code, 2 * steps) - count(tree, code, steps)
            cells.append(extra / (steps * per_step))
        print(f"{path:26s}" + "".join(f"{c:14,.0f}" for c in cells))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
