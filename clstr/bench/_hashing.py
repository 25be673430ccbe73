"""Hashing (groups ``shard_for_key`` and ``hrw_assign``): clstr's key-to-shard
mapping and HRW shard assignment against bare loops of the BLAKE3 digests
they are built on. ``benchmarks/bench_hashing.py`` breaks these figures down
further, with the same functions.
"""

from __future__ import annotations

from typing import Final

from ._group import Context, Workers
from ._local import InProcessGroup
from ._protocol import JSON
from ._specs import Spec
from ._timing import best_time

_HRW_SHARDS: Final = 1024
_HRW_NODES: Final = 64

_BARE_DIGESTS: Final = "bare loop of blake3(key).digest()"
_SHARD_FOR_KEY_SPECS: Final = (
    Spec(
        "shard_for_key_rate",
        "shard_for_key",
        "shard_for_key(key, 1024) rate",
        _BARE_DIGESTS,
        "keys/s",
        True,
        0.8,  # issue 17's floor (0.7 before); round 3 measured 0.87x / 0.94x
    ),
    Spec(
        "shard_mapper_rate",
        "shard_for_key",
        "ShardMapper(1024).shard(key) rate",
        _BARE_DIGESTS,
        "keys/s",
        True,
        0.8,  # issue 17's floor (0.7 before); round 3 measured 0.87x / 0.94x
    ),
)
_HRW_SPECS: Final = (
    Spec(
        "hrw_assign_time",
        "hrw_assign",
        "assign_shards: 1024 shards over 64 nodes",
        "65,536 raw BLAKE3 digests (one per shard x node)",
        "ms",
        False,
        1.0,
    ),
)


def measure_shard_for_key(n_keys: int, repeat: int) -> dict[str, float]:
    """Seconds per key of a bare BLAKE3 digest, ``shard_for_key`` and ``ShardMapper.shard``.

    The three loops hash the same ``bytes`` keys (``user-<i>``) into 1024
    shards; each figure is the best of ``repeat`` passes, after one pass of
    warm-up. Also reports the ``str``-key variants.
    """
    from blake3 import blake3

    from clstr.hashing import ShardMapper, shard_for_key

    keys_b = [f"user-{i}".encode() for i in range(n_keys)]
    keys_s = [k.decode() for k in keys_b]
    mapper = ShardMapper(1024).shard

    def bare() -> None:
        for k in keys_b:
            blake3(k).digest()

    def sfk_bytes() -> None:
        f = shard_for_key
        for k in keys_b:
            f(k, 1024)

    def sfk_str() -> None:
        f = shard_for_key
        for k in keys_s:
            f(k, 1024)

    def mapper_bytes() -> None:
        for k in keys_b:
            mapper(k)

    def mapper_str() -> None:
        for k in keys_s:
            mapper(k)

    loops = {
        "bare": bare,
        "shard_for_key": sfk_bytes,
        "shard_for_key_str": sfk_str,
        "mapper": mapper_bytes,
        "mapper_str": mapper_str,
    }
    for fn in loops.values():
        fn()
    return {name: best_time(fn, 1, repeat) / n_keys for name, fn in loops.items()}


def measure_hrw(repeat: int) -> dict[str, float]:
    """Seconds of ``assign_shards`` (1024 shards x 64 nodes) and of 65,536 raw digests.

    Each is the best of ``repeat`` timings after one warm-up call.
    """
    from blake3 import blake3

    from clstr.hashing import assign_shards

    nodes = [f"node-{i}" for i in range(_HRW_NODES)]
    raw = [b"shard:%d:%s" % (s, n.encode()) for s in range(_HRW_SHARDS) for n in nodes]

    def raw_digests() -> None:
        for x in raw:
            blake3(x).digest()

    def assign() -> None:
        assign_shards(nodes, _HRW_SHARDS)

    raw_digests()
    assign()
    return {"assign": best_time(assign, 1, repeat), "raw": best_time(raw_digests, 1, repeat)}


async def shard_for_key_op(cmd: JSON) -> JSON:
    """:func:`measure_shard_for_key` in the worker."""
    return measure_shard_for_key(cmd["n"], cmd["repeat"])


async def hrw_op(cmd: JSON) -> JSON:
    """:func:`measure_hrw` in the worker."""
    return measure_hrw(cmd["repeat"])


async def _measure_shard_for_key(context: Context, workers: Workers, run_index: int) -> None:
    sizes = context.sizes
    context.progress.begin(f"shard_for_key {context.run_text(run_index)}")
    t = await workers["local"].call(
        {"op": "shard_for_key", "n": sizes.hash_keys, "repeat": sizes.hash_repeat}
    )
    context.progress.advance()
    out = context.out
    out.add("shard_for_key_rate", 1 / t["shard_for_key"], 1 / t["bare"])
    out.add("shard_mapper_rate", 1 / t["mapper"], 1 / t["bare"])
    out.note("shard_for_key_rate", str_keys_per_s=1 / t["shard_for_key_str"])
    out.note("shard_mapper_rate", str_keys_per_s=1 / t["mapper_str"])


async def _measure_hrw(context: Context, workers: Workers, run_index: int) -> None:
    context.progress.begin(f"hrw_assign {context.run_text(run_index)}")
    t = await workers["local"].call({"op": "hrw_assign", "repeat": context.sizes.hrw_repeat})
    context.progress.advance()
    context.out.add("hrw_assign_time", t["assign"] * 1e3, t["raw"] * 1e3)


SHARD_FOR_KEY: Final = InProcessGroup(
    name="shard_for_key",
    specs=_SHARD_FOR_KEY_SPECS,
    steps=1,
    measure=_measure_shard_for_key,
    op=shard_for_key_op,
)
HRW_ASSIGN: Final = InProcessGroup(
    name="hrw_assign",
    specs=_HRW_SPECS,
    steps=1,
    measure=_measure_hrw,
    op=hrw_op,
)
