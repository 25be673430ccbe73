"""Node start-up (group ``node_startup``): a clstr node owning 1024 shards
against a raw nats-py process making 1024 queue subscriptions.

Each run spawns a fresh process per side and times it from spawn to ready
(all subscriptions routed by the server), then reads its resident memory.
The workers also report where their start-up went (import, connect,
subscribe) and their memory once connected.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Final

from ._children import Child
from ._group import Context, Group, Workers, own_processes, side_order
from ._protocol import JSON, emit, quiet_logs, serve
from ._specs import BenchError, Spec

_SPECS: Final = (
    Spec(
        "node_startup_time",
        "node_startup",
        "node owning 1024 shards: process spawn -> all subscriptions ready",
        "raw nats-py process: 1024 queue subscriptions + flush",
        "ms",
        False,
    ),
    Spec(
        "node_rss",
        "node_startup",
        "node owning 1024 shards: RSS once ready",
        "raw nats-py process with 1024 subscriptions",
        "MiB",
        False,
    ),
)


def _rss_mib() -> float:
    """This process's resident set size in MiB (Linux /proc; else the peak)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


async def startup_clstr(cfg: JSON) -> None:
    """A clstr node owning every shard; ready once all its subscriptions are."""
    begun = time.perf_counter()
    from clstr import Envelope, Node
    from clstr.transports.nats import NatsOptions, NatsTransport

    quiet_logs()
    imported = time.perf_counter()
    transport = await NatsTransport.connect(cfg["url"], NatsOptions(name="bench-startup-clstr"))
    connected = time.perf_counter()
    rss_connected = _rss_mib()

    async def handler(env: Envelope) -> bytes:
        return env.data

    node = Node(transport, handler, num_shards=cfg["shards"], prefix="startup", node_id="n1")
    try:
        await node.start()
        ready = time.perf_counter()
        emit(
            {
                "ready": True,
                "rss_mib": _rss_mib(),
                "rss_connected_mib": rss_connected,
                "import_ms": (imported - begun) * 1e3,
                "connect_ms": (connected - imported) * 1e3,
                "subscribe_ms": (ready - connected) * 1e3,
                "subscriptions": len(node.shards),
            }
        )
        await serve({})
    finally:
        await node.stop()
        await transport.close()


async def startup_raw(cfg: JSON) -> None:
    """A raw nats-py process with one queue subscription per shard (never imports clstr)."""
    begun = time.perf_counter()
    import nats

    imported = time.perf_counter()
    nc = await nats.connect(cfg["url"], name="bench-startup-raw")
    connected = time.perf_counter()
    rss_connected = _rss_mib()

    async def on_message(msg: Any) -> None:
        await msg.respond(msg.data)

    try:
        subs = [
            await nc.subscribe(f"startupraw.shard.{s}", queue="startupraw", cb=on_message)
            for s in range(cfg["shards"])
        ]
        await nc.flush()
        ready = time.perf_counter()
        emit(
            {
                "ready": True,
                "rss_mib": _rss_mib(),
                "rss_connected_mib": rss_connected,
                "import_ms": (imported - begun) * 1e3,
                "connect_ms": (connected - imported) * 1e3,
                "subscribe_ms": (ready - connected) * 1e3,
                "subscriptions": len(subs),
            }
        )
        await serve({})
    finally:
        await nc.drain()


_ROLES: Final = {"clstr": startup_clstr, "raw": startup_raw}


async def _measure(context: Context, _workers: Workers, run_index: int) -> None:
    shards = context.sizes.startup_shards
    cfg = {"url": context.url, "shards": shards}
    readies: dict[str, JSON] = {}
    for side in side_order(run_index):
        context.progress.begin(f"node_startup: {side} {context.run_text(run_index)}")
        child = Child(_ROLES[side], cfg, context.options, label=f"startup-{side}")
        try:
            spawned = time.perf_counter()
            ready = await child.start()
            ready["wall_ms"] = (time.perf_counter() - spawned) * 1e3
        finally:
            await child.close()
        if ready["subscriptions"] != shards:
            raise BenchError(f"startup-{side} reported {ready['subscriptions']} subscriptions")
        readies[side] = ready
        context.progress.advance()
    clstr, raw = readies["clstr"], readies["raw"]
    out = context.out
    out.add("node_startup_time", clstr["wall_ms"], raw["wall_ms"])
    out.add("node_rss", clstr["rss_mib"], raw["rss_mib"])
    for side in ("clstr", "raw"):
        ready = readies[side]
        out.note_run(
            "node_startup_time",
            **{f"{side}_{k}": ready[k] for k in ("import_ms", "connect_ms", "subscribe_ms")},
        )
        out.note_run("node_rss", **{f"{side}_rss_connected_mib": ready["rss_connected_mib"]})


GROUP: Final = Group(
    name="node_startup",
    specs=_SPECS,
    steps=2,
    stage=own_processes(needs_nats=True),
    measure=_measure,
)
