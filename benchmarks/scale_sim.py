"""Scale beyond one machine, simulated: 100, 1,000 and 10,000 nodes over 4096 shards.

    python benchmarks/scale_sim.py [--nodes 100,1000,10000] [--shards 4096]

No servers: the figures come from the code paths a real cluster runs, with
the transport left out. Placement is ``clstr.hashing.assign_shards`` (what
every KvMembership computes for a member set); what a change costs in KV
operations is what each node's ``ShardKeys.plan`` (clstr/membership/_shards.py)
asks for, run for every node with the bucket as it is before the change; the
watch deliveries and the heartbeat load follow from how the buckets are
watched (every node watches both), and are printed with their formula.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from clstr.hashing import assign_shards
from clstr.membership._shards import Holder, ShardKeys
from clstr.node import MemberInfo

HEARTBEAT_INTERVAL = 1.0


class _Host:
    """Just enough of a node for ShardKeys.plan: its id."""

    def __init__(self, node_id: str) -> None:
        self.node_id = node_id


def _keys_of(node_id: str, holders: dict[int, str]) -> ShardKeys:
    keys = ShardKeys(_Host(node_id), None, None)  # type: ignore[arg-type]
    keys.holders = {s: Holder(n, 1) for s, n in holders.items()}
    keys.held = {s: 1 for s, n in holders.items() if n == node_id}
    keys._in_our_name = set(keys.held)
    return keys


def kv_ops(before: dict[int, str], nodes: list[str]) -> tuple[int, int]:
    """(releases, takes) the nodes' plans ask of the shards bucket when the member
    set becomes ``nodes``: first each old holder gives back what it should lose
    (a conditional delete each), then each node takes what is free and its own
    (a create each). A crashed holder's keys are taken by an update instead."""
    desired = assign_shards(nodes, len(before))
    members = {n: MemberInfo(n) for n in nodes}
    holders = dict(before)
    releases = 0
    for node_id in sorted(set(before.values()) & set(nodes)):
        mine = frozenset(s for s, n in desired.items() if n == node_id)
        losing, _, stale = _keys_of(node_id, holders).plan(mine, members)
        releases += len(losing) + len(stale)
        for shard in losing:
            holders.pop(shard, None)
    takes = 0
    for node_id in nodes:
        mine = frozenset(s for s, n in desired.items() if n == node_id)
        _, gaining, _ = _keys_of(node_id, holders).plan(mine, members)
        takes += len(gaining)
    return releases, takes


def simulate(count: int, shards: int) -> dict[str, Any]:
    nodes = [f"n{i:05d}" for i in range(count)]
    started = time.perf_counter()
    before = assign_shards(nodes, shards)
    placement = time.perf_counter() - started
    joined = assign_shards([*nodes, "newcomer"], shards)
    moved_join = sum(1 for s in range(shards) if before[s] != joined[s])
    leaver = nodes[count // 2]
    left = assign_shards([n for n in nodes if n != leaver], shards)
    moved_leave = sum(1 for s in range(shards) if before[s] != left[s])
    join_deletes, join_creates = kv_ops(before, [*nodes, "newcomer"])
    return {
        "nodes": count,
        "placement_s": placement,
        "moved_join": moved_join,
        "ideal_join": shards / (count + 1),
        "moved_leave": moved_leave,
        "ideal_leave": shards / count,
        "join_kv_writes": join_deletes + join_creates,
        "join_watch_deliveries": (join_deletes + join_creates) * (count + 1),
        "heartbeat_writes_per_s": count / HEARTBEAT_INTERVAL,
        "heartbeat_deliveries_per_s": count * count / HEARTBEAT_INTERVAL,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--nodes", default="100,1000,10000")
    parser.add_argument("--shards", type=int, default=4096)
    args = parser.parse_args()
    print(
        "| nodes | placement (all shards) | moved on join (ideal S/(N+1)) | moved on leave "
        "(ideal S/N) | KV writes per join (2 x moved) | watch deliveries per join (writes x N) "
        "| heartbeat writes/s (N/interval) | heartbeat deliveries/s (N^2/interval) |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for count in (int(n) for n in args.nodes.split(",")):
        r = simulate(count, args.shards)
        print(
            f"| {r['nodes']:,} | {r['placement_s']:.2f} s | {r['moved_join']} "
            f"({r['ideal_join']:.1f}) | {r['moved_leave']} ({r['ideal_leave']:.1f}) "
            f"| {r['join_kv_writes']:,} | {r['join_watch_deliveries']:,} "
            f"| {r['heartbeat_writes_per_s']:,.0f} | {r['heartbeat_deliveries_per_s']:,.0f} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
