"""Key -> shard hashing and rendezvous (HRW) placement of shards on nodes.

Everything here is part of wire format v1: every client and node, in any
language, must compute the same shard for a key and the same owner for a
shard. ``tests/vectors/*.json`` pin the results; they change only with a
wire-format version bump.

Key -> shard
------------
``shard_for_key(key, num_shards, seed)`` is::

    data  = seed.encode("utf-8") + b"\\0" + key     if seed else key
    shard = u64be(BLAKE3(data)[:8]) % num_shards

where a ``str`` key is UTF-8 encoded first and ``u64be`` reads 8 bytes as a
big-endian unsigned integer.

Shard -> owner (rendezvous hashing)
-----------------------------------
The owner of shard ``s`` among a set of live nodes is the node with the highest
score. Design decision: rather than one BLAKE3 digest per (shard, node) pair,
each shard and each node is hashed once and the pair is scored by a cheap
integer mix of the two hashes::

    prefix   = seed.encode("utf-8") + b"\\0"         if seed else b""
    hs       = u64be(BLAKE3(prefix + b"shard:" + str(s).encode())[:8])
    hn       = u64be(BLAKE3(prefix + b"node:" + node_id.encode("utf-8"))[:8])
    score    = fmix64(hs ^ hn)

``fmix64`` is MurmurHash3's 64-bit finalizer (all arithmetic mod 2**64)::

    k ^= k >> 33; k *= 0xff51afd7ed558ccd
    k ^= k >> 33; k *= 0xc4ceb9fe1a85ec53
    k ^= k >> 33

A full placement of S shards on N nodes costs S + N digests instead of S * N.
BLAKE3 makes ``hs`` and ``hn`` uniform and independent, and ``fmix64`` is a
bijection with full avalanche, so each node wins a shard with probability 1/N
and the winners of different shards are independent; an adversary who can
choose node ids can bias placement, which a cryptographic per-pair hash would
not prevent either (it could grind ids just the same).

Because the owner is an argmax over the live nodes, a node that joins takes
only the shards it now wins and a node that leaves gives up only the shards it
held; no other shard moves. Ties in score (which need two 64-bit collisions)
go to the smallest node id, comparing code points (the same order as
comparing UTF-8 bytes).

Weights
-------
With ``weights`` (capacity; a node missing from the mapping weighs 1.0), the
score is that of weighted rendezvous hashing, in IEEE-754 doubles::

    u       = ((score >> 12) + 0.5) * 2**-52      # exact: 2**-53 <= u <= 1 - 2**-53
    score_w = w / -ln(u)                          # ln as in _ln below

so a node's expected share of shards is proportional to its weight. ``u``
keeps the top 52 bits of the integer score: ``m + 0.5`` with ``m < 2**52``
needs 53 significant bits, so ``u`` is exact, never 0 and never 1 (53 bits,
as before, let ``(2**53 - 1 + 0.5) / 2**53`` round to 1.0, whose log is 0).
``ln`` is not the platform's ``log`` (libms differ in the last bit, which
would make rare near-ties land on different nodes in different languages)
but :func:`_ln`, a fixed sequence of correctly rounded double operations
(``frexp``, ``+ - * /``) that every IEEE-754 implementation computes to the
same bits. When every node has the same weight the integer score is used, so
equal weights place shards exactly as no weights do.
"""

from __future__ import annotations

import functools
import math
import sys
from array import array
from collections.abc import Collection, Mapping, Sequence
from typing import Final

from blake3 import blake3

from clstr.errors import ConfigurationError, ShardOutOfRangeError

__all__ = [
    "MAX_SHARDS",
    "validate_num_shards",
    "ShardMapper",
    "ShardCache",
    "shard_for_key",
    "hrw_score",
    "owner_of",
    "shards_for_node",
    "assign_shards",
]

MAX_SHARDS: Final = 1 << 20
"""The largest ``num_shards`` accepted (shard ids are ``0..MAX_SHARDS-1``)."""

_M64: Final = (1 << 64) - 1
_C1: Final = 0xFF51AFD7ED558CCD
_C2: Final = 0xC4CEB9FE1A85EC53
_TWO_POW_MINUS_52: Final = 2.0**-52
# The double nearest ln(2), and the one nearest sqrt(1/2) (hex: exact).
_LN2: Final = float.fromhex("0x1.62e42fefa39efp-1")
_SQRT_HALF: Final = float.fromhex("0x1.6a09e667f3bcdp-1")
# 1/(2k+1) for k = 11 down to 0: the atanh series' coefficients after the
# highest, 1/25 (each the double nearest the quotient).
_ATANH: Final = tuple(1.0 / (2 * k + 1) for k in range(11, -1, -1))
_LANE_BITS: Final = 128
_BIG_ENDIAN: Final = sys.byteorder == "big"
# Bound once: looking the classmethod up on int costs as much as the call.
_from_bytes: Final = int.from_bytes

# The packed placement below reads 64-bit lanes through array("Q"), whose item
# is a C unsigned long long: 8 bytes on every platform CPython supports.
if array("Q").itemsize != 8:  # pragma: no cover
    raise ImportError("clstr.hashing needs array('Q') items of 8 bytes")


def validate_num_shards(num_shards: int) -> int:
    """Return ``num_shards`` if it is an ``int`` in ``1..MAX_SHARDS``.

    Raises:
        ConfigurationError: ``num_shards`` is not an ``int`` (``bool`` is
            refused too) or is outside ``1..MAX_SHARDS``.
    """
    if isinstance(num_shards, bool) or not isinstance(num_shards, int):
        raise ConfigurationError(
            f"num_shards must be an int in 1..{MAX_SHARDS}, got {type(num_shards).__name__} "
            f"{num_shards!r}"
        )
    if not 1 <= num_shards <= MAX_SHARDS:
        raise ConfigurationError(
            f"num_shards must be in 1..{MAX_SHARDS} (MAX_SHARDS), got {num_shards}"
        )
    return int(num_shards)


def _seed_prefix(seed: str) -> bytes:
    if not isinstance(seed, str):
        raise TypeError(f"seed must be a str, got {type(seed).__name__}")
    return seed.encode("utf-8") + b"\0" if seed else b""


@functools.lru_cache(maxsize=64)
def _seed_hasher(seed: str) -> blake3:
    """A hasher that has absorbed the seed prefix. Callers must only ``copy()`` it.

    Copying it and absorbing the key gives BLAKE3(prefix + key) without
    building the concatenation; a cache hit costs less than encoding the seed
    again. An unhashable seed fails in the cache lookup, with a TypeError too.
    """
    return blake3(_seed_prefix(seed))


# Idle hashers that have absorbed nothing, for unseeded keys: constructing a
# BLAKE3 hasher costs more than hashing a short key (and so does copying one),
# so a key is hashed by one taken from here, which is reset and put back.
# list.pop and append are atomic, so a hasher is in one caller's hands at a
# time (another thread, or a re-entrant call from a finalizer, finds another
# or makes one); the pool holds at most as many as were ever in use at once.
_FREE: Final[list[blake3]] = []


def _key_bytes(key: object) -> bytes:
    """The slow path of key coercion: str and bytes subclasses, and errors."""
    if isinstance(key, str):
        return key.encode("utf-8")
    if isinstance(key, bytes):
        return bytes(key)
    raise TypeError(
        f"key must be str or bytes, got {type(key).__name__}; convert it explicitly "
        "(for example str(user_id)) so that every client hashes the same bytes"
    )


class ShardMapper:
    """Maps keys to shards for one ``(num_shards, seed)``, with all set-up done once.

    ``mapper.shard(key)`` (or ``mapper(key)``) equals
    ``shard_for_key(key, num_shards, seed)``; prefer a mapper on hot paths.

    Raises:
        ConfigurationError: ``num_shards`` is not an ``int`` in ``1..MAX_SHARDS``.
        TypeError: ``seed`` is not a ``str``.
    """

    __slots__ = ("_hasher", "_num_shards", "_seed")

    def __init__(self, num_shards: int, seed: str = "") -> None:
        self._num_shards: int = validate_num_shards(num_shards)
        # None without a seed: a pooled hasher is cheaper than a copy.
        self._hasher: blake3 | None = _seed_hasher(seed) if seed != "" else None
        self._seed: str = seed

    @property
    def num_shards(self) -> int:
        """The number of shards keys are spread over."""
        return self._num_shards

    @property
    def seed(self) -> str:
        """The seed mixed into every key hash ("" for none)."""
        return self._seed

    def shard(self, key: str | bytes) -> int:
        """Return the shard of ``key``, in ``0..num_shards-1``.

        Raises:
            TypeError: ``key`` is neither ``str`` nor ``bytes``.
            UnicodeEncodeError: a ``str`` key holds a lone surrogate.
        """
        # Exact-class checks first: they are the cheap common case.
        cls = key.__class__
        # (mypy does not narrow on __class__, which is cheaper than type() or isinstance.)
        data: bytes = key.encode() if cls is str else key if cls is bytes else _key_bytes(key)  # type: ignore[union-attr,assignment]
        primed = self._hasher
        if primed is not None:
            return _from_bytes(primed.copy().update(data).digest(8)) % self._num_shards
        # (Written out here and in shard_for_key: a helper call would cost a
        # tenth of the whole.)
        free = _FREE
        try:
            hasher = free.pop()
        except IndexError:
            hasher = blake3()
        digest = hasher.update(data).digest(8)
        hasher.reset()
        free.append(hasher)
        return _from_bytes(digest) % self._num_shards

    __call__ = shard

    def __repr__(self) -> str:
        return f"ShardMapper(num_shards={self._num_shards}, seed={self._seed!r})"


class ShardCache(dict[str | bytes, int]):
    """``ShardMapper.shard`` with a memo of the keys seen lately, for hot paths
    where keys repeat (a client's requests, a node's check of each message's
    key): ``cache[key]`` is a dict look-up instead of a BLAKE3 digest, with no
    Python call when the key is known. At most ``size`` keys are kept; past
    that the memo starts over, so memory stays bounded whatever the keys.
    ``cache(key)`` is the same look-up.

    Raises (on a key not seen yet) what :meth:`ShardMapper.shard` raises; an
    unhashable key raises the dict's ``TypeError``.
    """

    __slots__ = ("_mapper", "_size")

    def __init__(self, mapper: ShardMapper, size: int = 4096) -> None:
        super().__init__()
        self._mapper = mapper
        self._size = size

    def __missing__(self, key: str | bytes) -> int:
        shard = self._mapper.shard(key)
        if len(self) >= self._size:
            self.clear()
        self[key] = shard
        return shard

    __call__ = dict.__getitem__


def shard_for_key(key: str | bytes, num_shards: int, seed: str = "") -> int:
    """Return the shard of ``key``, in ``0..num_shards-1`` (see the module docs).

    The result depends only on the key's bytes (UTF-8 for ``str``), the seed
    and ``num_shards``: the same in every process, host and language.

    Raises:
        TypeError: ``key`` is neither ``str`` nor ``bytes``, or ``seed`` is not
            a ``str``.
        ConfigurationError: ``num_shards`` is not an ``int`` in ``1..MAX_SHARDS``.
        UnicodeEncodeError: a ``str`` key holds a lone surrogate.
    """
    # The body repeats ShardMapper.shard instead of calling it: building a
    # mapper per call would cost more than the hash itself. Without a seed a
    # pooled hasher (see _FREE) instead of a new one per key: 0.65x -> 0.85x
    # of a bare BLAKE3 loop (docs/benchmarks.md).
    if not (num_shards.__class__ is int and 0 < num_shards <= MAX_SHARDS):
        validate_num_shards(num_shards)
    cls = key.__class__
    # (mypy does not narrow on __class__, which is cheaper than type() or isinstance.)
    data: bytes = key.encode() if cls is str else key if cls is bytes else _key_bytes(key)  # type: ignore[union-attr,assignment]
    # == "" rather than truthiness, so that a falsy non-str seed (None, b"")
    # reaches _seed_hasher and is refused.
    if seed != "":
        return _from_bytes(_seed_hasher(seed).copy().update(data).digest(8)) % num_shards
    free = _FREE
    try:
        hasher = free.pop()
    except IndexError:
        hasher = blake3()
    digest = hasher.update(data).digest(8)
    hasher.reset()
    free.append(hasher)
    return _from_bytes(digest) % num_shards


# --- rendezvous placement ---------------------------------------------------


def _u64(data: bytes) -> int:
    return _from_bytes(blake3(data).digest(8))


def _fmix64(k: int) -> int:
    k ^= k >> 33
    k = (k * _C1) & _M64
    k ^= k >> 33
    k = (k * _C2) & _M64
    return k ^ (k >> 33)


def _ln(u: float) -> float:
    """ln(u) for 0 < u < 1, bit-identical in every IEEE-754 implementation.

    Only exact steps and correctly rounded double operations, in this order
    (no fused multiply-add; in Go, wrap each product in ``float64()``)::

        f, e = frexp(u)                      # u = f * 2**e, 0.5 <= f < 1 (exact)
        if f < SQRT_HALF: f = 2*f; e = e - 1  # f in [sqrt(1/2), sqrt(2)) (exact)
        s = (f - 1) / (f + 1);  z = s * s
        p = 1/25;  for c in 1/23, 1/21, ..., 1/3, 1: p = p * z + c
        ln(u) = e * LN2 + (2*s) * p          # LN2, SQRT_HALF: the doubles nearest

    ``ln f = 2 atanh(s)``; with ``|s| <= 0.1716`` the 13 terms leave an error
    far below a double's last bit, so it differs from ``math.log`` by at most
    one or two ulps, and the same bits come out everywhere.
    """
    f, e = math.frexp(u)
    if f < _SQRT_HALF:
        f *= 2.0
        e -= 1
    s = (f - 1.0) / (f + 1.0)
    z = s * s
    p = 1.0 / 25
    for c in _ATANH:
        p = p * z + c
    return e * _LN2 + (2.0 * s) * p


def _weighted(score: int, weight: float) -> float:
    """The weighted rendezvous score of an integer ``score`` (see the module docs)."""
    return weight / -_ln(((score >> 12) + 0.5) * _TWO_POW_MINUS_52)


def _check_shard(shard: int) -> int:
    if isinstance(shard, bool) or not isinstance(shard, int):
        raise TypeError(f"shard must be an int, got {type(shard).__name__}")
    if not 0 <= shard < MAX_SHARDS:
        raise ShardOutOfRangeError(f"shard must be in 0..{MAX_SHARDS - 1}, got {shard}")
    return int(shard)


def _shard_hash(prefix: bytes, shard: int) -> int:
    return _u64(b"%sshard:%d" % (prefix, shard))


def _node_hash(prefix: bytes, node_id: str) -> int:
    return _u64(prefix + b"node:" + node_id.encode("utf-8"))


def hrw_score(shard: int, node_id: str, seed: str = "") -> int:
    """Return the unweighted rendezvous score of ``node_id`` for ``shard``.

    The score is a 64-bit unsigned integer, ``fmix64(hs ^ hn)`` (see the module
    docs); the owner of a shard is the node with the highest score. Exposed so
    that other implementations can check themselves against it.

    Raises:
        TypeError: ``shard`` is not an ``int`` or ``seed`` is not a ``str``.
        ShardOutOfRangeError: ``shard`` is outside ``0..MAX_SHARDS-1``.
        ConfigurationError: ``node_id`` is empty or not a ``str``.
    """
    prefix = _seed_prefix(seed)
    (node,) = _nodes([node_id])
    return _fmix64(_shard_hash(prefix, _check_shard(shard)) ^ _node_hash(prefix, node))


def _nodes(node_ids: Collection[str]) -> list[str]:
    """Validate a node set; return its distinct ids, sorted (the tie-break order)."""
    if isinstance(node_ids, str | bytes):
        raise ConfigurationError(
            f"node_ids must be a collection of node ids, not a single {type(node_ids).__name__}"
        )
    distinct = set(node_ids)
    for node in distinct:
        if not isinstance(node, str):
            raise ConfigurationError(f"node ids must be str, got {type(node).__name__}")
        if not node:
            raise ConfigurationError("node ids must be non-empty strings")
        try:
            node.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ConfigurationError(f"node id {node!r} is not valid UTF-8 text") from exc
    if not distinct:
        raise ConfigurationError("the node set is empty: at least one live node is needed")
    return sorted(distinct)


def _node_weights(nodes: Sequence[str], weights: Mapping[str, float] | None) -> list[float] | None:
    """Validate ``weights``; return them aligned with ``nodes``, or None when all equal."""
    if weights is None:
        return None
    if not isinstance(weights, Mapping):
        raise ConfigurationError(
            f"weights must be a mapping of node id to weight, got {type(weights).__name__}"
        )
    for node, weight in weights.items():
        if isinstance(weight, bool) or not isinstance(weight, int | float):
            raise ConfigurationError(
                f"weight of node {node!r} must be a number, got {type(weight).__name__}"
            )
        if not (math.isfinite(weight) and weight > 0):
            raise ConfigurationError(
                f"weight of node {node!r} must be finite and > 0, got {weight!r}"
            )
    aligned = [float(weights.get(node, 1.0)) for node in nodes]
    # Equal weights fall back to the integer score: the float transform maps
    # scores that differ only in their low 11 bits to one value.
    if all(w == aligned[0] for w in aligned):
        return None
    return aligned


def _owners(
    shards: Sequence[int],
    nodes: Sequence[str],
    prefix: bytes,
    weights: Sequence[float] | None,
) -> list[str]:
    """The owner of each of ``shards``: the one code path of every placement query.

    ``nodes`` must be distinct, validated and sorted, so that ``list.index``
    (first maximum) gives ties to the smallest id.
    """
    n = len(nodes)
    if n == 1:
        return [nodes[0]] * len(shards)
    # fmix64 opens with k ^= k >> 33, which distributes over the xor of the
    # two hashes: mix each side once here instead of once per pair.
    node_keys = [h ^ (h >> 33) for h in (_node_hash(prefix, node) for node in nodes)]
    # Score every node for a shard at once: node i's 64-bit value sits in
    # bits [128*i, 128*i + 64) of one big int, so a 64x64-bit product stays
    # inside its 128-bit lane and one big-int operation does the work of n
    # scalar ones (2-3x faster than the best per-pair loop at 64 nodes).
    lane = _LANE_BITS // 8  # bytes
    ones = _from_bytes((b"\1" + bytes(lane - 1)) * n, "little")
    mask = _M64 * ones
    packed_nodes = _from_bytes(
        b"".join(key.to_bytes(lane, "little") for key in node_keys), "little"
    )
    nbytes = n * lane
    c1, c2, u64, weighted_score = _C1, _C2, _u64, _weighted
    owners: list[str] = []
    append = owners.append
    for shard in shards:
        hs = u64(b"%sshard:%d" % (prefix, shard))
        k = ((((hs ^ (hs >> 33)) * ones) ^ packed_nodes) * c1) & mask
        k = (((k ^ (k >> 33)) & mask) * c2) & mask
        # The last shift drags the next lane's bits into this lane's upper
        # half only; the [::2] below keeps the lower halves.
        k ^= k >> 33
        scores = array("Q", k.to_bytes(nbytes, "little"))
        if _BIG_ENDIAN:  # pragma: no cover
            scores.byteswap()
        if weights is None:
            low = scores[::2]
            append(nodes[low.index(max(low))])
        else:
            weighted = [weighted_score(s, w) for s, w in zip(scores[::2], weights, strict=True)]
            append(nodes[weighted.index(max(weighted))])
    return owners


def owner_of(
    shard: int,
    node_ids: Collection[str],
    seed: str = "",
    *,
    weights: Mapping[str, float] | None = None,
) -> str:
    """Return the node that owns ``shard`` among ``node_ids`` (rendezvous hashing).

    Every caller with the same node set, seed and weights gets the same owner,
    whatever the order or repetition of ``node_ids``. ``owner_of`` does not
    know ``num_shards``; the caller keeps ``shard`` below it.

    Raises:
        TypeError: ``shard`` is not an ``int`` or ``seed`` is not a ``str``.
        ShardOutOfRangeError: ``shard`` is outside ``0..MAX_SHARDS-1``.
        ConfigurationError: the node set is empty, is a single string, or holds
            an empty or non-``str`` id; or a weight is not a finite number > 0.
    """
    shard = _check_shard(shard)
    prefix = _seed_prefix(seed)
    nodes = _nodes(node_ids)
    return _owners([shard], nodes, prefix, _node_weights(nodes, weights))[0]


def assign_shards(
    node_ids: Collection[str],
    num_shards: int,
    seed: str = "",
    *,
    weights: Mapping[str, float] | None = None,
) -> dict[int, str]:
    """Return ``{shard: owner}`` for every shard in ``0..num_shards-1``.

    Equals ``owner_of(s, node_ids, seed, weights=weights)`` for every ``s``, but
    hashes each shard and each node only once.

    Raises:
        ConfigurationError: ``num_shards`` is not an ``int`` in
            ``1..MAX_SHARDS``; the node set is empty, is a single string, or
            holds an empty or non-``str`` id; or a weight is not a finite
            number > 0.
        TypeError: ``seed`` is not a ``str``.
    """
    shards = range(validate_num_shards(num_shards))
    prefix = _seed_prefix(seed)
    nodes = _nodes(node_ids)
    owners = _owners(shards, nodes, prefix, _node_weights(nodes, weights))
    return dict(zip(shards, owners, strict=True))


def shards_for_node(
    node_id: str,
    node_ids: Collection[str],
    num_shards: int,
    seed: str = "",
    *,
    weights: Mapping[str, float] | None = None,
) -> list[int]:
    """Return the shards ``node_id`` owns among ``node_ids``, sorted ascending.

    Over all nodes of a set the results partition ``range(num_shards)`` and
    agree with :func:`assign_shards`. A ``node_id`` outside ``node_ids`` owns
    nothing (an empty list).

    Raises:
        ConfigurationError: as :func:`assign_shards`.
        TypeError: ``seed`` is not a ``str``.
    """
    return [
        shard
        for shard, owner in assign_shards(node_ids, num_shards, seed, weights=weights).items()
        if owner == node_id
    ]
