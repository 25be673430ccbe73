"""The hashing hot paths in detail: every key flavour, and HRW over several node counts.

The headline figures (``shard_for_key`` and ``ShardMapper.shard`` against a
bare ``blake3(key).digest()`` loop, and ``assign_shards`` for 1024 shards x
64 nodes against 65,536 raw digests) are part of ``clstr bench`` and come
from the same functions (:mod:`clstr.bench`); this script adds the
breakdown behind them. Run from anywhere: ``python benchmarks/bench_hashing.py``.
"""

from __future__ import annotations

from clstr.bench import best_time, measure_hrw, measure_shard_for_key
from clstr.hashing import ShardMapper, assign_shards, shard_for_key

N_KEYS = 10_000


def main() -> None:
    per_key = measure_shard_for_key(N_KEYS, repeat=9)
    bare = per_key["bare"]
    print(f"bare blake3(key).digest():      {bare * 1e9:4.0f} ns/key")
    for name, seconds in per_key.items():
        if name != "bare":
            print(f"{name:30s}  {seconds * 1e9:4.0f} ns/key  rate vs bare = {bare / seconds:.2f}x")

    keys = [f"user-{i}" for i in range(N_KEYS)]
    seeded = ShardMapper(1024, "seed").shard

    def sfk_seeded() -> None:
        for k in keys:
            shard_for_key(k, 1024, "seed")

    def mapper_seeded() -> None:
        for k in keys:
            seeded(k)

    for label, fn in (
        ("shard_for_key str, seeded", sfk_seeded),
        ("mapper str, seeded", mapper_seeded),
    ):
        seconds = best_time(fn, 1, 9) / N_KEYS
        print(f"{label:30s}  {seconds * 1e9:4.0f} ns/key  rate vs bare = {bare / seconds:.2f}x")

    hrw = measure_hrw(repeat=7)
    print(f"65536 raw digests:               {hrw['raw'] * 1e3:6.2f} ms")
    print(
        f"assign_shards 1024x64:           {hrw['assign'] * 1e3:6.2f} ms"
        f"  = {hrw['assign'] / hrw['raw']:.2f}x"
    )
    nodes = [f"node-{i}" for i in range(64)]
    weighted = best_time(lambda: assign_shards(nodes, 1024, weights={"node-0": 2.0}), 1, 7)
    print(
        f"assign_shards 1024x64 weighted:  {weighted * 1e3:6.2f} ms  = {weighted / hrw['raw']:.2f}x"
    )
    for n in (1, 3, 10, 256):
        ns = [f"node-{i}" for i in range(n)]
        t = best_time(lambda ns=ns: assign_shards(ns, 1024), 1, 5)
        print(f"assign_shards 1024x{n:<4d}          {t * 1e3:6.2f} ms")


if __name__ == "__main__":
    main()
