"""Fraction of shards that move when a node joins, against the ideal 1/(N+1).

    python benchmarks/moved_fraction.py [--shards 1024] [--seeds 20]

For each N, N nodes get a new member; HRW (``assign_shards``) moves only
the shards the newcomer wins. Printed: the mean moved fraction over the
seeds, the ideal, and whether every moved shard went to the newcomer.
"""

from __future__ import annotations

import argparse
from statistics import mean

from clstr.hashing import assign_shards


def moved(n: int, num_shards: int, seed: str) -> tuple[float, bool]:
    nodes = [f"node-{i}" for i in range(n)]
    before = assign_shards(nodes, num_shards, seed)
    after = assign_shards([*nodes, "newcomer"], num_shards, seed)
    changed = [s for s in range(num_shards) if before[s] != after[s]]
    return len(changed) / num_shards, all(after[s] == "newcomer" for s in changed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=1024)
    parser.add_argument("--seeds", type=int, default=20)
    args = parser.parse_args()
    print(f"{args.shards} shards, {args.seeds} seeds")
    for n in (1, 2, 3, 4, 8, 16):
        runs = [moved(n, args.shards, f"seed-{i}") for i in range(args.seeds)]
        fraction = mean(f for f, _ in runs)
        only_new = all(ok for _, ok in runs)
        print(
            f"{n:>2} -> {n + 1:>2} nodes: moved {fraction:6.1%}  ideal {1 / (n + 1):6.1%}  "
            f"all to the newcomer: {only_new}"
        )


if __name__ == "__main__":
    main()
