"""The ledger's figures: events/s on one node and on three, the latency of
``create_event``, and the time from an owner's crash to its accounts served again.

    python benchmarks/bench_ledger.py [--seconds 5] [--runs 3] [--writers 32]
                                      [--accounts 256] [--kills 3] [--snapshot-every 1]

Starts an embedded nats-server (JetStream) and ``clstr ledger serve`` node
processes (KV membership, heartbeat TTL 2 s), and drives them from this
process: ``--writers`` concurrent ``create_event(+1)`` calls over ``--accounts``
accounts for ``--seconds``, ``--runs`` times; each row prints the median run.
The raw primitive the ledger wraps runs in the same process against the same
server with the same writers: per event, a JetStream publish conditional on the
account subject's last sequence plus a KV update (what an event costs in
JetStream, without clstr around it). Then, with three nodes, ``--kills`` times:
SIGKILL the owner of an account, time until a write to that account succeeds,
start a replacement node. Everything shares the machine's cores with the load
generator.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

NUM_SHARDS = 64
BUCKET = "bench"
HEARTBEAT_TTL = 2.0


async def load(
    call: object, writers: int, accounts: int, seconds: float
) -> tuple[float, list[float]]:
    """``writers`` tasks calling ``call(account)`` for ``seconds``; events/s and latencies."""
    assert callable(call)
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def writer(n: int) -> None:
        k = n
        while time.perf_counter() < deadline:
            k += writers
            started = time.perf_counter()
            await call(f"acct-{k % accounts}")
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(writer(n) for n in range(writers)))
    return len(latencies) / (time.perf_counter() - started), latencies


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


async def raw_jetstream(url: str, args: argparse.Namespace) -> list[tuple[float, list[float]]]:
    """Per event: a conditional publish on the account's subject, then a KV update."""
    import nats

    nc = await nats.connect(url)
    js = nc.jetstream()
    await js.add_stream(name="RAW", subjects=["raw.>"], allow_direct=True)
    kv = await js.create_key_value(bucket="raw_state", history=1)
    last: dict[str, int] = {}
    revision: dict[str, int] = {}

    async def event(account: str) -> None:
        ack = await js.publish(
            f"raw.{account}",
            b"x" * 150,
            headers={"Nats-Expected-Last-Subject-Sequence": str(last.get(account, 0))},
        )
        last[account] = ack.seq
        state = b"s" * 600
        if account in revision:
            revision[account] = await kv.update(account, state, last=revision[account])
        else:
            revision[account] = await kv.create(account, state)

    # One writer per account at a time, as an account's lane does.
    locks: dict[str, asyncio.Lock] = {}

    async def locked(account: str) -> None:
        async with locks.setdefault(account, asyncio.Lock()):
            await event(account)

    runs = [await load(locked, args.writers, args.accounts, args.seconds) for _ in range(args.runs)]
    await nc.close()
    return runs


async def ledger_runs(
    url: str, nodes: list[str], args: argparse.Namespace
) -> list[tuple[float, list[float]]]:
    from clstr import Client, RetryPolicy
    from clstr.ledger import LedgerClient
    from clstr.transports.nats import NatsTransport

    transport = await NatsTransport.connect(url)
    client = Client(
        transport, num_shards=NUM_SHARDS, timeout=10, retry=RetryPolicy(attempt_timeout=2.0)
    )
    ledger = LedgerClient(client)

    async def credit(account: str) -> None:
        await ledger.create_event(BUCKET, account, 1)

    # Warm up: every account exists and is live on its owner.
    await asyncio.gather(*(credit(f"acct-{n}") for n in range(args.accounts)))
    runs = [await load(credit, args.writers, args.accounts, args.seconds) for _ in range(args.runs)]
    await client.close()
    await transport.close()
    return runs


def report(name: str, runs: list[tuple[float, list[float]]]) -> float:
    rates = [rate for rate, _ in runs]
    median_run = sorted(runs, key=lambda r: r[0])[len(runs) // 2]
    latencies = median_run[1]
    p50, p99 = statistics.median(latencies) * 1000, quantile(latencies, 0.99) * 1000
    print(
        f"{name:<34} {statistics.median(rates):>8,.0f} events/s  "
        f"(runs {', '.join(f'{r:,.0f}' for r in rates)}); create_event p50 "
        f"{p50:.1f} ms, p99 {p99:.1f} ms",
        flush=True,
    )
    return statistics.median(rates)


async def edge_overhead(url: str, requests: int = 2000, rounds: int = 5) -> None:
    """Node-info round trips through an EdgeClient (one endpoint) against a plain
    Client on the same cluster, interleaved rounds, best of each."""
    from clstr import Client
    from clstr.client import EdgeClient
    from clstr.protocol import NODE_INFO_TYPE
    from clstr.transports.nats import NatsTransport

    transport = await NatsTransport.connect(url)
    client = Client(transport, num_shards=NUM_SHARDS)
    edge = EdgeClient([url], num_shards=NUM_SHARDS)
    await edge.start()
    best = {"Client": 0.0, "EdgeClient": 0.0}
    for _ in range(rounds):
        for name, sender in (("Client", client), ("EdgeClient", edge)):
            started = time.perf_counter()
            for n in range(requests):
                await sender.request_shard(n % NUM_SHARDS, NODE_INFO_TYPE, b"")
            best[name] = max(best[name], requests / (time.perf_counter() - started))
    ratio = best["EdgeClient"] / best["Client"]
    print(
        f"edge client: {best['EdgeClient']:,.0f} sequential requests/s against "
        f"{best['Client']:,.0f} for a plain Client (ratio {ratio:.2f})"
    )
    await edge.close()
    await client.close()
    await transport.close()


async def crash_recovery(url: str, processes: dict[str, object], args: argparse.Namespace) -> None:
    from clstr import Client, RequestError, RetryPolicy
    from clstr.hashing import shard_for_key
    from clstr.ledger import ACCOUNT_TYPE, LedgerClient, account_entity_id
    from clstr.protocol import entity_key
    from clstr.transports.nats import NatsTransport

    transport = await NatsTransport.connect(url)
    client = Client(
        transport,
        num_shards=NUM_SHARDS,
        timeout=30,
        retry=RetryPolicy(attempt_timeout=1.0, max_backoff=0.05),
    )
    ledger = LedgerClient(client)
    times = []
    for kill in range(args.kills):
        account = f"acct-{kill}"
        shard = shard_for_key(
            entity_key(ACCOUNT_TYPE, account_entity_id(BUCKET, account)), NUM_SHARDS
        )
        info = await client.shard(shard).node_info()
        victim = processes.pop(info.node_id)
        started = time.perf_counter()
        await victim.kill()  # type: ignore[attr-defined]
        while True:
            try:
                await ledger.create_event(BUCKET, account, 1, timeout=30)
                break
            except RequestError:
                continue
        times.append(time.perf_counter() - started)
        print(
            f"  kill {kill + 1}: {info.node_id} -> {account} served again after {times[-1]:.2f} s",
            flush=True,
        )
        processes[f"r{kill}"] = await start_node(url, f"r{kill}", args)
    print(
        f"crash -> accounts served again (heartbeat TTL {HEARTBEAT_TTL:g} s): median "
        f"{statistics.median(times):.2f} s, max {max(times):.2f} s over {len(times)} kills"
    )
    await client.close()
    await transport.close()


async def start_node(url: str, node_id: str, args: argparse.Namespace) -> object:
    from clstr.cli._ledger_serve import serve_argv
    from clstr.testing import NodeProcess

    argv = serve_argv(
        node_id,
        url,
        num_shards=NUM_SHARDS,
        heartbeat_ttl=HEARTBEAT_TTL,
        extra_args=("--snapshot-every", str(args.snapshot_every)),
    )
    process = NodeProcess.from_argv(node_id, argv)
    await process.start()
    await process.wait_ready()
    return process


async def settled(url: str, nodes: int) -> None:
    """Wait until ``nodes`` nodes own every shard between them."""
    from clstr.observe import gather_view
    from clstr.transports.nats import NatsTransport

    transport = await NatsTransport.connect(url)
    try:
        while True:
            view = await gather_view(
                transport, num_shards=NUM_SHARDS, prefix="clstr", expected_nodes=nodes
            )
            if view.complete and len(view.nodes) == nodes:
                return
            await asyncio.sleep(0.2)
    finally:
        await transport.close()


async def main(args: argparse.Namespace) -> None:
    import structlog

    from clstr.testing import NatsServer

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))
    print(
        f"{args.writers} writers, {args.accounts} accounts, {args.seconds:g} s x {args.runs} runs, "
        f"snapshot every {args.snapshot_every} event(s), {NUM_SHARDS} shards"
    )
    async with NatsServer(jetstream=True) as server:
        report("raw JetStream (publish + KV update)", await raw_jetstream(server.url, args))
        processes: dict[str, object] = {}
        try:
            processes["n1"] = await start_node(server.url, "n1", args)
            await settled(server.url, 1)
            report("ledger, 1 node", await ledger_runs(server.url, ["n1"], args))
            for node_id in ("n2", "n3"):
                processes[node_id] = await start_node(server.url, node_id, args)
            await settled(server.url, 3)
            report("ledger, 3 nodes", await ledger_runs(server.url, ["n1", "n2", "n3"], args))
            await edge_overhead(server.url)
            if args.kills:
                await crash_recovery(server.url, processes, args)
        finally:
            for process in processes.values():
                await process.stop()  # type: ignore[attr-defined]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--writers", type=int, default=32)
    parser.add_argument("--accounts", type=int, default=256)
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--snapshot-every", type=int, default=1)
    asyncio.run(main(parser.parse_args()))
