"""Generate the clstr test vectors: shard_for_key.json, hrw.json and wire.json.

    python tests/vectors/generate.py

rewrites both files next to this script.

These vectors pin wire format v1. They must only change together with a
wire-format version bump: a changed vector means every deployed client and
node would route keys differently. If regenerating changes a file without
such a bump, the change (here or in clstr/hashing.py) is a bug.

The values are computed by the deliberately plain implementation below (one
BLAKE3 call per value, one loop per shard and node), written from the spec in
clstr/hashing.py's docstring and independent of the optimised code there, so
that the vectors check that code rather than echo it. This script imports
nothing from clstr.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import msgpack
from blake3 import blake3

HERE = Path(__file__).resolve().parent
WIRE_VERSION = 1
MASK64 = (1 << 64) - 1

# --- reference implementation -------------------------------------------------


def u64be(data: bytes) -> int:
    """The first 8 bytes of BLAKE3(data), as a big-endian unsigned integer."""
    return int.from_bytes(blake3(data).digest()[:8], "big")


def seed_prefix(seed: str) -> bytes:
    return seed.encode("utf-8") + b"\x00" if seed else b""


def ref_shard(key: bytes, num_shards: int, seed: str = "") -> int:
    return u64be(seed_prefix(seed) + key) % num_shards


def fmix64(k: int) -> int:
    """MurmurHash3's 64-bit finalizer."""
    k ^= k >> 33
    k = (k * 0xFF51AFD7ED558CCD) & MASK64
    k ^= k >> 33
    k = (k * 0xC4CEB9FE1A85EC53) & MASK64
    k ^= k >> 33
    return k


def shard_hash(shard: int, seed: str) -> int:
    return u64be(seed_prefix(seed) + b"shard:" + str(shard).encode("ascii"))


def node_hash(node: str, seed: str) -> int:
    return u64be(seed_prefix(seed) + b"node:" + node.encode("utf-8"))


def ref_score(shard: int, node: str, seed: str = "") -> int:
    return fmix64(shard_hash(shard, seed) ^ node_hash(node, seed))


def ref_ln(u: float) -> float:
    """ln(u), 0 < u < 1, by the exact sequence of double operations of the spec."""
    f, e = math.frexp(u)
    if f < float.fromhex("0x1.6a09e667f3bcdp-1"):
        f, e = f * 2.0, e - 1
    s = (f - 1.0) / (f + 1.0)
    z = s * s
    p = 1.0 / 25
    for k in range(11, -1, -1):
        p = p * z + 1.0 / (2 * k + 1)
    return e * float.fromhex("0x1.62e42fefa39efp-1") + (2.0 * s) * p


def ref_weighted_score(score: int, weight: float) -> float:
    u = ((score >> 12) + 0.5) / 2.0**52
    assert 0.0 < u < 1.0
    return weight / -ref_ln(u)


def ref_assign(
    nodes: Sequence[str],
    num_shards: int,
    seed: str = "",
    weights: Mapping[str, float] | None = None,
) -> dict[int, str]:
    """Shard -> owner: highest score wins, ties to the smallest node id."""
    distinct = sorted(set(nodes))
    node_weights = {n: float((weights or {}).get(n, 1.0)) for n in distinct}
    weighted = weights is not None and len(set(node_weights.values())) > 1
    assignment: dict[int, str] = {}
    for shard in range(num_shards):
        best_node: str | None = None
        best: float = -1.0
        for node in distinct:  # ascending, so a strict > keeps the smallest id on ties
            score = ref_score(shard, node, seed)
            value = ref_weighted_score(score, node_weights[node]) if weighted else score
            if best_node is None or value > best:
                best_node, best = node, value
        assert best_node is not None
        assignment[shard] = best_node
    return assignment


# --- vectors ----------------------------------------------------------------------

SHARD_KEYS: list[str | bytes] = [
    "",
    "a",
    "user-42",
    "tenant:acme/user:7",
    "hello world",
    "ключ",
    "日本語",
    "🔑🚀",
    "e\u0301",  # "e" + combining acute accent: not normalised, hashed as given
    "0123456789" * 10,
    "k" * 1025,  # one byte past BLAKE3's 1024-byte chunk: exercises the tree mode
    b"\x00\xff\xfe\x80",  # not UTF-8: only key_hex gives it
]
SHARD_SEEDS = ["", "clstr", "種子-seed"]
SHARD_COUNTS = [1, 7, 64, 256, 1024, 65536]
LONG_KEY_SHARD_COUNTS = [1024, 65536]  # keys over 256 bytes: fewer entries, smaller file

HRW_NODE_SETS = [
    ["node-a"],
    ["node-a", "node-b", "node-c"],
    [f"node-{i}" for i in range(8)] + ["узел-8", "ノード-9"],
]
HRW_SEEDS = ["", "cluster-1"]
HRW_SHARD_COUNTS = [16, 64]
HRW_WEIGHTED: list[tuple[list[str], str, int, dict[str, float]]] = [
    # node-c is missing from the mapping, so it weighs 1.0.
    (["node-a", "node-b", "node-c"], "", 64, {"node-a": 2.0, "node-b": 0.5}),
    (["node-a", "node-b", "node-c"], "cluster-1", 64, {"node-a": 3.0}),
    # All equal: the placement is exactly the unweighted one.
    (["node-a", "node-b", "node-c"], "", 64, {"node-a": 2.5, "node-b": 2.5, "node-c": 2.5}),
]
SCORE_SHARDS = [0, 1, 15, 63, 1000, (1 << 20) - 1]
SCORE_NODES = ["node-a", "ノード-9"]


def shard_vectors() -> dict[str, Any]:
    vectors = []
    for key in SHARD_KEYS:
        key_bytes = key.encode("utf-8") if isinstance(key, str) else key
        for seed in SHARD_SEEDS:
            digest8 = blake3(seed_prefix(seed) + key_bytes).digest()[:8]
            counts = SHARD_COUNTS if len(key_bytes) <= 256 else LONG_KEY_SHARD_COUNTS
            for num_shards in counts:
                vectors.append(
                    {
                        "key": key if isinstance(key, str) else None,
                        "key_hex": key_bytes.hex(),
                        "seed": seed,
                        "num_shards": num_shards,
                        "digest8_hex": digest8.hex(),
                        "shard": ref_shard(key_bytes, num_shards, seed),
                    }
                )
    return {
        "description": (
            "clstr shard_for_key test vectors. shard = u64be(BLAKE3(data)[0:8]) % num_shards, "
            "data = utf8(seed) + 0x00 + key if seed else key; a str key is hashed as its "
            "UTF-8 bytes (key_hex). key is null where the bytes are not UTF-8. digest8_hex is "
            "BLAKE3(data)[0:8]. Change only with a wire-format version bump."
        ),
        "wire_version": WIRE_VERSION,
        "vectors": vectors,
    }


# Integer scores at the edges of the weighted transform (the top 52 bits all
# ones or all zeros, where a 53-bit u once rounded to 1.0) and a few between.
WEIGHTED_SCORES = [
    0,
    1,
    (1 << 12) - 1,
    1 << 63,
    (1 << 64) - 1,
    (1 << 64) - (1 << 11),
    0x0123456789ABCDEF,
    0xFEDCBA9876543210,
    0x5A5A5A5A5A5A5A5A,
    0xB504F333F9DE6484,
]


def hrw_vectors() -> dict[str, Any]:
    scores = []
    for seed in HRW_SEEDS:
        for shard in SCORE_SHARDS:
            for node in SCORE_NODES:
                score = ref_score(shard, node, seed)
                scores.append(
                    {
                        "shard": shard,
                        "node": node,
                        "seed": seed,
                        "shard_hash_hex": f"{shard_hash(shard, seed):016x}",
                        "node_hash_hex": f"{node_hash(node, seed):016x}",
                        "score": score,
                        "score_hex": f"{score:016x}",
                    }
                )
    cases: list[tuple[list[str], str, int, dict[str, float] | None]] = [
        (nodes, seed, num_shards, None)
        for nodes in HRW_NODE_SETS
        for seed in HRW_SEEDS
        for num_shards in HRW_SHARD_COUNTS
    ]
    cases += HRW_WEIGHTED
    weighted = []
    for score in WEIGHTED_SCORES:
        u = ((score >> 12) + 0.5) / 2.0**52
        for weight in (1.0, 0.5, 3.0, 1e-3, 1e6):
            weighted.append(
                {
                    "score_hex": f"{score:016x}",
                    "weight": weight,
                    "u_hex": u.hex(),
                    "ln_u_hex": ref_ln(u).hex(),
                    "weighted_hex": ref_weighted_score(score, weight).hex(),
                }
            )
    assignments = [
        {
            "nodes": nodes,
            "seed": seed,
            "num_shards": num_shards,
            "weights": weights,
            "assignment": {
                str(shard): owner
                for shard, owner in ref_assign(nodes, num_shards, seed, weights).items()
            },
        }
        for nodes, seed, num_shards, weights in cases
    ]
    return {
        "description": (
            "clstr rendezvous (HRW) placement test vectors. prefix = utf8(seed) + 0x00 if seed "
            "else empty; hs = u64be(BLAKE3(prefix + 'shard:' + decimal(shard))[0:8]); "
            "hn = u64be(BLAKE3(prefix + 'node:' + utf8(node))[0:8]); "
            "score = fmix64(hs ^ hn) (MurmurHash3 64-bit finalizer). The owner of a shard is "
            "the node with the highest score, ties to the smallest node id. With weights "
            "(missing node = 1.0) that are not all equal: "
            "u = ((score >> 12) + 0.5) * 2**-52, score_w = w / -ln(u), ln computed by the "
            "exact sequence of IEEE-754 double operations in docs/protocol.md; "
            "weighted_scores pins u, ln(u) and score_w bit for bit (as float.hex). "
            "score_hex repeats score for JSON parsers that lose integer precision above 2**53. "
            "Change only with a wire-format version bump."
        ),
        "wire_version": WIRE_VERSION,
        "scores": scores,
        "weighted_scores": weighted,
        "assignments": assignments,
    }


# --- wire bodies ----------------------------------------------------------------


def fingerprint(t: str, key: str | None, shard: int, data: bytes) -> str:
    """The idempotency fingerprint of docs/protocol.md, in hex."""
    tb = t.encode("utf-8")
    kb = b"" if key is None else key.encode("utf-8")
    key_len = 0 if key is None else len(kb) + 1
    head = (
        len(tb).to_bytes(4, "big") + tb + key_len.to_bytes(4, "big") + kb + shard.to_bytes(4, "big")
    )
    return blake3(head + data).digest()[:16].hex()


# (name, fields in wire order, shard it is sent to (the key's), num_shards)
WIRE_REQUESTS: list[tuple[str, dict[str, Any], int]] = [
    ("minimal", {"v": 1, "t": "ping"}, 64),
    (
        "keyed",
        {"v": 1, "t": "Greet", "d": msgpack.packb({"name": "ada"}), "k": "user-42", "ts": 0},
        64,
    ),
    (
        "everything",
        {
            "v": 1,
            "t": "Greet",
            "d": msgpack.packb({"name": "ada"}),
            "k": "user-42",
            "h": {"tenant": "acme"},
            "ttl": 4950,
            "ts": 1795000000000,
            "id": "req-1",
        },
        64,
    ),
    ("empty key", {"v": 1, "t": "x", "k": ""}, 16),
    (
        "unicode",
        {"v": 1, "t": "größe", "d": b"\x00\xff", "k": "種-ключ", "ts": 1, "id": "é"},
        16,
    ),
    ("node info", {"v": 1, "t": "clstr.node.info", "ts": 1795000000000}, 8),
    (
        # The reserved headers a node accepts (docs/protocol.md, Trace context);
        # headers stay out of the fingerprint: it is the "everything" one's.
        "trace context",
        {
            "v": 1,
            "t": "Greet",
            "d": msgpack.packb({"name": "ada"}),
            "k": "user-42",
            "h": {
                "tenant": "acme",
                "x-clstr-traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                "x-clstr-tracestate": "congo=t61rcWkgMzE",
                "x-clstr-attempt": "2",
            },
            "ttl": 4950,
            "ts": 1795000000000,
            "id": "req-1",
        },
        64,
    ),
]

WIRE_BAD: list[tuple[str, bytes]] = [
    ("not msgpack", b"\xc1"),
    ("not a map", msgpack.packb([1, "ping"])),
    ("version 2", msgpack.packb({"v": 2, "t": "x"})),
    ("no version", msgpack.packb({"t": "x"})),
    ("no type", msgpack.packb({"v": 1})),
    ("empty type", msgpack.packb({"v": 1, "t": ""})),
    ("payload as str", msgpack.packb({"v": 1, "t": "x", "d": "text"})),
    ("negative ttl", msgpack.packb({"v": 1, "t": "x", "ttl": -1})),
    ("boolean ttl", msgpack.packb({"v": 1, "t": "x", "ttl": True})),
    ("header value not str", msgpack.packb({"v": 1, "t": "x", "h": {"a": 1}})),
    ("reserved header", msgpack.packb({"v": 1, "t": "x", "h": {"X-CLSTR-trace": "1"}})),
    (
        "trace header not in lower case",
        msgpack.packb({"v": 1, "t": "x", "h": {"X-Clstr-Traceparent": "1"}}),
    ),
    ("type of 257 bytes", msgpack.packb({"v": 1, "t": "t" * 257})),
]

WIRE_ERRORS = [
    ("bad_request", "BadRequestError"),
    ("wrong_shard", "WrongShardError"),
    ("no_handler", "NoHandlerError"),
    ("key_required", "KeyRequiredError"),
    ("expired", "EnvelopeExpiredError"),
    ("overloaded", "OverloadedError"),
    ("not_owner", "NotOwnerError"),
    ("id_reused", "IdempotencyKeyReusedError"),
    ("timeout", "HandlerTimeoutError"),
    ("handler_error", "ValueError"),
    ("reply_too_large", "ReplyTooLargeError"),
    ("interrupted", "RequestInterruptedError"),
]


def _jsonable(fields: Mapping[str, Any]) -> dict[str, Any]:
    return {k: (v.hex() if isinstance(v, bytes) else v) for k, v in fields.items()}


def wire_vectors() -> dict[str, Any]:
    requests = []
    for name, fields, num_shards in WIRE_REQUESTS:
        key = fields.get("k")
        shard = ref_shard(key.encode("utf-8"), num_shards) if key is not None else 0
        requests.append(
            {
                "name": name,
                "hex": msgpack.packb(fields, use_bin_type=True).hex(),
                "fields": _jsonable(fields),
                "num_shards": num_shards,
                "shard": shard,
                "fingerprint_hex": fingerprint(fields["t"], key, shard, fields.get("d", b"")),
            }
        )
    replies = [
        {
            "name": "ok",
            "hex": msgpack.packb({"v": 1, "ok": True, "d": b"hello"}, use_bin_type=True).hex(),
            "ok": True,
            "d_hex": b"hello".hex(),
        },
        {
            "name": "ok, empty",
            "hex": msgpack.packb({"v": 1, "ok": True, "d": b""}, use_bin_type=True).hex(),
            "ok": True,
            "d_hex": "",
        },
    ]
    for code, type_name in WIRE_ERRORS:
        message = f"what went wrong ({code}) and what to do"
        body = {"v": 1, "ok": False, "e": {"code": code, "type": type_name, "msg": message}}
        replies.append(
            {
                "name": code,
                "hex": msgpack.packb(body, use_bin_type=True).hex(),
                "ok": False,
                "code": code,
                "type": type_name,
                "msg": message,
            }
        )
    return {
        "description": (
            "clstr wire v1 vectors (docs/protocol.md). requests: a msgpack request body "
            "(hex) and its fields (bin fields as hex), the shard its key belongs to among "
            "num_shards (no seed; 0 without a key), and its idempotency fingerprint on that "
            "shard. bad_requests: bodies a node must answer bad_request. replies: reply "
            "bodies and what they decode to. Hashing and placement: shard_for_key.json, "
            "hrw.json. Change only with a wire-format version bump."
        ),
        "wire_version": WIRE_VERSION,
        "requests": requests,
        "bad_requests": [{"name": n, "hex": b.hex()} for n, b in WIRE_BAD],
        "replies": replies,
    }


ENTITY_CASES = [
    ("Cart", "cart-42"),
    ("Cart", "ключ/with/slashes"),
    ("counter", "page:home"),
    ("clstr.singleton", "totals"),
    ("Größe", "é"),
]


def entity_vectors() -> dict[str, Any]:
    vectors = []
    for entity_type, entity_id in ENTITY_CASES:
        key = f"{entity_type}/{entity_id}"
        for seed in ("", "cluster-1"):
            for num_shards in (1, 16, 1024):
                vectors.append(
                    {
                        "entity_type": entity_type,
                        "entity_id": entity_id,
                        "seed": seed,
                        "num_shards": num_shards,
                        "key": key,
                        "shard": ref_shard(key.encode("utf-8"), num_shards, seed),
                    }
                )
    return {
        "description": (
            "clstr entity address vectors (docs/entities.md). An entity's routing key is "
            "utf8(entity_type) + '/' + utf8(entity_id) (the type holds no '/'; the id may); "
            "its shard is that key's shard (shard_for_key.json). A singleton named N is "
            "placed as the entity of type 'clstr.singleton' with id N. "
            "Change only with a wire-format version bump."
        ),
        "wire_version": WIRE_VERSION,
        "vectors": vectors,
    }


def render(data: Mapping[str, Any]) -> str:
    """The exact file text for ``data`` (stable, so regenerating is a no-op)."""
    return json.dumps(data, ensure_ascii=False, indent=1) + "\n"


FILES = {
    "shard_for_key.json": shard_vectors,
    "hrw.json": hrw_vectors,
    "wire.json": wire_vectors,
    "entities.json": entity_vectors,
}


def main() -> None:
    for name, build in FILES.items():
        path = HERE / name
        path.write_text(render(build()), encoding="utf-8")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
