"""Benchmark clstr.hashing hot paths against bare BLAKE3 digests.

Run from the repo root: PYTHONPATH=. python bench_hashing.py
"""

from __future__ import annotations

import timeit
from collections.abc import Callable

from blake3 import blake3

from clstr.hashing import ShardMapper, assign_shards, shard_for_key

N_KEYS = 10_000
KEYS_B = [f"user-{i}".encode() for i in range(N_KEYS)]
KEYS_S = [f"user-{i}" for i in range(N_KEYS)]


def best(fn: Callable[[], object], number: int, repeat: int = 9) -> float:
    return min(timeit.repeat(fn, number=number, repeat=repeat))


def bare() -> None:
    for k in KEYS_B:
        blake3(k).digest()


def sfk_bytes() -> None:
    f = shard_for_key
    for k in KEYS_B:
        f(k, 1024)


def sfk_str() -> None:
    f = shard_for_key
    for k in KEYS_S:
        f(k, 1024)


def sfk_str_seed() -> None:
    f = shard_for_key
    for k in KEYS_S:
        f(k, 1024, "seed")


def mapper_bytes() -> None:
    f = ShardMapper(1024).shard
    for k in KEYS_B:
        f(k)


def mapper_str() -> None:
    f = ShardMapper(1024).shard
    for k in KEYS_S:
        f(k)


def mapper_str_seed() -> None:
    f = ShardMapper(1024, "seed").shard
    for k in KEYS_S:
        f(k)


def main() -> None:
    t_bare = best(bare, 10)
    print(f"bare blake3(key).digest():     {t_bare / (10 * N_KEYS) * 1e9:4.0f} ns/key")
    for fn in (sfk_bytes, sfk_str, sfk_str_seed, mapper_bytes, mapper_str, mapper_str_seed):
        t = best(fn, 10)
        print(
            f"{fn.__name__:30s} {t / (10 * N_KEYS) * 1e9:4.0f} ns/key"
            f"  rate vs bare = {t_bare / t:.2f}x"
        )

    nodes = [f"node-{i}" for i in range(64)]
    raw = [b"shard:%d:%s" % (s, n.encode()) for s in range(1024) for n in nodes]

    def raw_digests() -> None:
        for x in raw:
            blake3(x).digest()

    t_raw = best(raw_digests, 1, 7)
    t_assign = best(lambda: assign_shards(nodes, 1024), 1, 7)
    t_w = best(lambda: assign_shards(nodes, 1024, weights={"node-0": 2.0}), 1, 7)
    print(f"65536 raw digests:              {t_raw * 1e3:6.2f} ms")
    print(f"assign_shards 1024x64:          {t_assign * 1e3:6.2f} ms  = {t_assign / t_raw:.2f}x")
    print(f"assign_shards 1024x64 weighted: {t_w * 1e3:6.2f} ms  = {t_w / t_raw:.2f}x")
    for n in (1, 3, 10, 256):
        ns = [f"node-{i}" for i in range(n)]
        t = best(lambda ns=ns: assign_shards(ns, 1024), 1, 5)
        print(f"assign_shards 1024x{n:<4d}         {t * 1e3:6.2f} ms")


if __name__ == "__main__":
    main()
