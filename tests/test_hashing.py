"""Tests for clstr.hashing: key -> shard and rendezvous placement of shards on nodes."""

from __future__ import annotations

import importlib.util
import json
import math
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clstr import hashing
from clstr.errors import ClstrError, ConfigurationError, ShardOutOfRangeError
from clstr.hashing import (
    MAX_SHARDS,
    ShardMapper,
    assign_shards,
    hrw_score,
    owner_of,
    shard_for_key,
    shards_for_node,
    validate_num_shards,
)

VECTORS = Path(__file__).parent / "vectors"


def _load_generator() -> ModuleType:
    # generate.py is a script, not a package module: load it by path. It holds
    # the plain reference implementation the vectors come from.
    spec = importlib.util.spec_from_file_location("clstr_vectors_generate", VECTORS / "generate.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ref = _load_generator()


def _load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((VECTORS / name).read_text(encoding="utf-8"))
    return data


SHARD_VECTORS = _load("shard_for_key.json")
HRW_VECTORS = _load("hrw.json")

FAST = settings(max_examples=40, deadline=None)

node_ids = st.text(min_size=1, max_size=6)
node_sets = st.lists(node_ids, min_size=1, max_size=10, unique=True)
seeds = st.sampled_from(["", "s", "cluster-1", "種"]) | st.text(max_size=4)
shard_counts = st.integers(min_value=1, max_value=96)
keys = st.text(max_size=20) | st.binary(max_size=20)


def _key_of(vector: Mapping[str, Any]) -> bytes:
    return bytes.fromhex(vector["key_hex"])


class TestVectors:
    """clstr.hashing reproduces the committed wire-format vectors."""

    def test_files_match_reference_implementation(self) -> None:
        """The JSON files are exactly what generate.py's plain implementation produces."""
        for name, build in ref.FILES.items():
            text = (VECTORS / name).read_text(encoding="utf-8")
            assert text == ref.render(build()), f"{name} is stale: run tests/vectors/generate.py"

    def test_key_hex_is_the_utf8_of_key(self) -> None:
        """Every text key's key_hex is its UTF-8 encoding, so other languages can check bytes."""
        for vector in SHARD_VECTORS["vectors"]:
            if vector["key"] is not None:
                assert vector["key"].encode("utf-8") == _key_of(vector)

    def test_shard_for_key_matches(self) -> None:
        """shard_for_key gives each vector's shard for the text key and for its bytes."""
        for v in SHARD_VECTORS["vectors"]:
            assert shard_for_key(_key_of(v), v["num_shards"], v["seed"]) == v["shard"], v
            if v["key"] is not None:
                assert shard_for_key(v["key"], v["num_shards"], v["seed"]) == v["shard"], v

    def test_shard_mapper_matches(self) -> None:
        """ShardMapper.shard and ShardMapper.__call__ give each vector's shard."""
        for v in SHARD_VECTORS["vectors"]:
            mapper = ShardMapper(v["num_shards"], v["seed"])
            assert mapper.shard(_key_of(v)) == v["shard"], v
            assert mapper(_key_of(v)) == v["shard"], v

    def test_scores_match(self) -> None:
        """hrw_score gives each vector's 64-bit score."""
        for v in HRW_VECTORS["scores"]:
            assert hrw_score(v["shard"], v["node"], v["seed"]) == v["score"], v
            assert int(v["score_hex"], 16) == v["score"]

    def test_weighted_scores_match_bit_for_bit(self) -> None:
        """The weighted transform gives each vector's u, ln(u) and weighted score to the
        last bit, the top-most integer scores included (where u once rounded to 1.0)."""
        from clstr.hashing import _ln, _weighted

        for v in HRW_VECTORS["weighted_scores"]:
            score = int(v["score_hex"], 16)
            u = ((score >> 12) + 0.5) * 2.0**-52
            assert 0.0 < u < 1.0
            assert u.hex() == v["u_hex"], v
            assert _ln(u).hex() == v["ln_u_hex"], v
            assert _weighted(score, v["weight"]).hex() == v["weighted_hex"], v
        assert {v["score_hex"] for v in HRW_VECTORS["weighted_scores"]} >= {"f" * 16, "0" * 16}

    def test_ln_is_within_two_ulps_of_the_platform_log(self) -> None:
        """The exact ln agrees with math.log to two ulps over the whole range of u."""
        from clstr.hashing import _ln

        for m in [0, 1, 2**26, 2**51, 2**52 - 1, *range(12345, 2**52, 2**40 + 17)]:
            u = (m + 0.5) * 2.0**-52
            assert abs(_ln(u) - math.log(u)) <= 2 * math.ulp(math.log(u)), u

    def test_assignments_match(self) -> None:
        """assign_shards, owner_of and shards_for_node reproduce each vector's assignment."""
        for v in HRW_VECTORS["assignments"]:
            expected = {int(shard): owner for shard, owner in v["assignment"].items()}
            weights = v["weights"]
            assert assign_shards(v["nodes"], v["num_shards"], v["seed"], weights=weights) == (
                expected
            )
            for shard, owner in expected.items():
                assert owner_of(shard, v["nodes"], v["seed"], weights=weights) == owner
            for node in v["nodes"]:
                mine = shards_for_node(
                    node, v["nodes"], v["num_shards"], v["seed"], weights=weights
                )
                assert mine == sorted(s for s, o in expected.items() if o == node)

    def test_vectors_cover_the_required_cases(self) -> None:
        """The vectors hold the seeds, shard counts, key kinds and node sets clients need."""
        shard_vectors = SHARD_VECTORS["vectors"]
        assert {v["num_shards"] for v in shard_vectors} >= {1, 7, 64, 256, 1024, 65536}
        assert {v["seed"] != "" for v in shard_vectors} == {True, False}
        assert any(v["key"] == "" for v in shard_vectors)
        assert any(v["key"] and not v["key"].isascii() for v in shard_vectors)
        assert any(len(_key_of(v)) > 1024 for v in shard_vectors)
        assignments = HRW_VECTORS["assignments"]
        assert {len(a["nodes"]) for a in assignments} >= {1, 3, 10}
        assert {a["num_shards"] for a in assignments} >= {16, 64}
        assert any(a["weights"] for a in assignments)


class TestReferenceAgreement:
    """The optimised placement equals the plain reference for arbitrary inputs."""

    @FAST
    @given(nodes=node_sets, num_shards=shard_counts, seed=seeds)
    def test_unweighted(self, nodes: list[str], num_shards: int, seed: str) -> None:
        """assign_shards equals the one-loop-per-pair reference implementation."""
        assert assign_shards(nodes, num_shards, seed) == ref.ref_assign(nodes, num_shards, seed)

    @FAST
    @given(
        nodes=node_sets,
        num_shards=shard_counts,
        seed=seeds,
        raw_weights=st.lists(st.floats(min_value=0.01, max_value=100.0), min_size=1, max_size=10),
    )
    def test_weighted(
        self, nodes: list[str], num_shards: int, seed: str, raw_weights: list[float]
    ) -> None:
        """Weighted assign_shards equals the reference, including nodes missing from weights."""
        weights = dict(zip(nodes, raw_weights, strict=False))
        assert assign_shards(nodes, num_shards, seed, weights=weights) == ref.ref_assign(
            nodes, num_shards, seed, weights
        )

    @FAST
    @given(shard=st.integers(0, MAX_SHARDS - 1), node=node_ids, seed=seeds)
    def test_score(self, shard: int, node: str, seed: str) -> None:
        """hrw_score equals the reference score."""
        assert hrw_score(shard, node, seed) == ref.ref_score(shard, node, seed)

    @FAST
    @given(key=keys, num_shards=st.integers(1, MAX_SHARDS), seed=seeds)
    def test_shard_for_key(self, key: str | bytes, num_shards: int, seed: str) -> None:
        """shard_for_key and ShardMapper equal the reference, in range, for str and bytes keys."""
        data = key.encode("utf-8") if isinstance(key, str) else key
        expected = ref.ref_shard(data, num_shards, seed)
        assert 0 <= expected < num_shards
        assert shard_for_key(key, num_shards, seed) == expected
        assert ShardMapper(num_shards, seed).shard(key) == expected


class TestSingleOwner:
    """Every shard has exactly one owner, and every way of asking agrees on it."""

    @FAST
    @given(nodes=node_sets, num_shards=shard_counts, seed=seeds)
    def test_shards_for_node_partitions_the_shards(
        self, nodes: list[str], num_shards: int, seed: str
    ) -> None:
        """shards_for_node over all nodes covers range(num_shards) once and equals assign_shards."""
        assignment = assign_shards(nodes, num_shards, seed)
        assert sorted(assignment) == list(range(num_shards))
        seen: list[int] = []
        for node in nodes:
            mine = shards_for_node(node, nodes, num_shards, seed)
            assert mine == sorted(mine)
            assert all(assignment[s] == node for s in mine)
            seen += mine
        assert sorted(seen) == list(range(num_shards))

    @FAST
    @given(nodes=node_sets, num_shards=shard_counts, seed=seeds, data=st.data())
    def test_order_and_duplicates_do_not_matter(
        self, nodes: list[str], num_shards: int, seed: str, data: st.DataObject
    ) -> None:
        """Listing the same nodes in another order, or repeated, gives the same placement."""
        shuffled = data.draw(st.permutations(nodes))
        repeated = shuffled + shuffled[: len(shuffled) // 2]
        expected = assign_shards(nodes, num_shards, seed)
        assert assign_shards(repeated, num_shards, seed) == expected
        assert assign_shards(frozenset(nodes), num_shards, seed) == expected

    @FAST
    @given(nodes=node_sets, num_shards=shard_counts, seed=seeds)
    def test_owner_of_agrees_with_assign_shards(
        self, nodes: list[str], num_shards: int, seed: str
    ) -> None:
        """owner_of(s) is assign_shards()[s] for every shard."""
        assignment = assign_shards(nodes, num_shards, seed)
        assert {s: owner_of(s, nodes, seed) for s in range(num_shards)} == assignment

    def test_node_outside_the_set_owns_nothing(self) -> None:
        """shards_for_node of a node that is not in the set is an empty list."""
        assert shards_for_node("node-z", ["node-a", "node-b"], 64) == []

    def test_single_node_owns_everything(self) -> None:
        """A single node owns every shard, with or without weights."""
        everything = dict.fromkeys(range(32), "only")
        assert assign_shards(["only"], 32) == everything
        assert assign_shards(["only"], 32, weights={"only": 5.0}) == everything


class TestMinimalMovement:
    """Membership changes move only the shards they must."""

    @FAST
    @given(
        nodes=st.lists(node_ids, min_size=2, max_size=10, unique=True),
        num_shards=shard_counts,
        seed=seeds,
        weighted=st.booleans(),
    )
    def test_join_moves_only_shards_to_the_joiner(
        self, nodes: list[str], num_shards: int, seed: str, weighted: bool
    ) -> None:
        """When a node joins, every shard that changes owner now belongs to the joiner."""
        joiner, before_nodes = nodes[0], nodes[1:]
        weights = {node: 1.0 + i for i, node in enumerate(nodes)} if weighted else None
        before = assign_shards(before_nodes, num_shards, seed, weights=weights)
        after = assign_shards(nodes, num_shards, seed, weights=weights)
        moved = [s for s in range(num_shards) if before[s] != after[s]]
        assert all(after[s] == joiner for s in moved)
        assert moved == shards_for_node(joiner, nodes, num_shards, seed, weights=weights)

    @FAST
    @given(
        nodes=st.lists(node_ids, min_size=2, max_size=10, unique=True),
        num_shards=shard_counts,
        seed=seeds,
        weighted=st.booleans(),
    )
    def test_leave_moves_only_the_leavers_shards(
        self, nodes: list[str], num_shards: int, seed: str, weighted: bool
    ) -> None:
        """When a node leaves, exactly the shards it held change owner."""
        leaver = nodes[0]
        weights = {node: 1.0 + i for i, node in enumerate(nodes)} if weighted else None
        before = assign_shards(nodes, num_shards, seed, weights=weights)
        after = assign_shards(nodes[1:], num_shards, seed, weights=weights)
        moved = [s for s in range(num_shards) if before[s] != after[s]]
        assert moved == [s for s in range(num_shards) if before[s] == leaver]
        assert leaver not in after.values()


class TestDistribution:
    """Shards spread evenly, or in proportion to weights."""

    @pytest.mark.parametrize("seed", ["", "a", "cluster-1", "cluster-2", "種子"])
    def test_even_within_25_percent(self, seed: str) -> None:
        """1024 shards over 8 nodes give every node 128 +/- 25% shards."""
        nodes = [f"node-{i}" for i in range(8)]
        counts = Counter(assign_shards(nodes, 1024, seed).values())
        assert set(counts) == set(nodes)
        assert all(96 <= count <= 160 for count in counts.values()), counts

    @pytest.mark.parametrize("seed", ["", "cluster-1"])
    def test_weight_two_gets_about_twice(self, seed: str) -> None:
        """Over 4096 shards a node of weight 2 gets about twice the share of a weight-1 node."""
        nodes = ["big", "n1", "n2", "n3"]
        counts = Counter(assign_shards(nodes, 4096, seed, weights={"big": 2.0}).values())
        # Expected: big 4096 * 2/5 = 1638.4, the others 819.2 each.
        assert 1450 <= counts["big"] <= 1830, counts
        small = [counts[n] for n in nodes[1:]]
        assert 1.6 <= counts["big"] / (sum(small) / 3) <= 2.4, counts


class TestWeights:
    """Weights change placement only when they differ."""

    @FAST
    @given(
        nodes=node_sets,
        num_shards=shard_counts,
        seed=seeds,
        weight=st.floats(min_value=1e-6, max_value=1e6),
    )
    def test_equal_weights_equal_unweighted(
        self, nodes: list[str], num_shards: int, seed: str, weight: float
    ) -> None:
        """All nodes with one weight, whatever its value, place shards exactly as no weights."""
        weights = dict.fromkeys(nodes, weight)
        assert assign_shards(nodes, num_shards, seed, weights=weights) == assign_shards(
            nodes, num_shards, seed
        )

    def test_equal_weights_take_the_integer_path(self) -> None:
        """Equal weights are dropped before scoring, so no float rounding can split a tie."""
        # White-box on purpose: the float path differs from the integer one only
        # when two scores share their top 53 bits, which no test can stage.
        assert hashing._node_weights(["a", "b"], {"a": 2.0, "b": 2.0}) is None
        assert hashing._node_weights(["a", "b"], {"a": 1.0}) is None
        assert hashing._node_weights(["a", "b"], {"a": 2.0}) == [2.0, 1.0]

    def test_missing_node_weighs_one(self) -> None:
        """A node absent from weights weighs 1.0, and weights of absent nodes are ignored."""
        nodes = ["a", "b", "c"]
        unweighted = assign_shards(nodes, 256)
        assert assign_shards(nodes, 256, weights={"a": 1.0}) == unweighted
        assert assign_shards(nodes, 256, weights={"zz": 7.0}) == unweighted
        assert assign_shards(nodes, 256, weights={"a": 2.0, "b": 1.0}) == assign_shards(
            nodes, 256, weights={"a": 2.0}
        )


class TestKeys:
    """Key hashing depends on exactly the key's bytes, the seed and num_shards."""

    @FAST
    @given(key=st.text(max_size=30), num_shards=st.integers(1, 4096), seed=seeds)
    def test_str_hashes_as_utf8(self, key: str, num_shards: int, seed: str) -> None:
        """A str key lands on the same shard as its UTF-8 bytes."""
        assert shard_for_key(key, num_shards, seed) == shard_for_key(
            key.encode("utf-8"), num_shards, seed
        )

    def test_subclasses_of_str_and_bytes_are_keys(self) -> None:
        """Subclasses of str and bytes hash like the plain values."""

        class Name(str):
            __slots__ = ()

        class Raw(bytes):
            pass

        assert shard_for_key(Name("user-1"), 1024) == shard_for_key("user-1", 1024)
        assert shard_for_key(Raw(b"user-1"), 1024, "s") == shard_for_key(b"user-1", 1024, "s")
        assert ShardMapper(1024)(Name("user-1")) == shard_for_key("user-1", 1024)

    def test_seed_changes_placement(self) -> None:
        """Two seeds map a batch of keys differently, so a seed isolates clusters."""
        batch = [f"user-{i}" for i in range(64)]
        assert [shard_for_key(k, 1024, "x") for k in batch] != [
            shard_for_key(k, 1024, "y") for k in batch
        ]
        assert [shard_for_key(k, 1024) for k in batch] != [
            shard_for_key(k, 1024, "x") for k in batch
        ]

    def test_mapper_exposes_its_settings(self) -> None:
        """A ShardMapper reports the num_shards and seed it was built with."""
        mapper = ShardMapper(64, "s")
        assert (mapper.num_shards, mapper.seed) == (64, "s")
        assert repr(mapper) == "ShardMapper(num_shards=64, seed='s')"


class TestErrors:
    """Bad input fails at once with the documented exception and a useful message."""

    @pytest.mark.parametrize("num_shards", [0, -1, MAX_SHARDS + 1, 1 << 64])
    def test_num_shards_out_of_range(self, num_shards: int) -> None:
        """num_shards outside 1..MAX_SHARDS is a ConfigurationError that states the range."""
        for call in (
            lambda: shard_for_key("k", num_shards),
            lambda: ShardMapper(num_shards),
            lambda: assign_shards(["a"], num_shards),
            lambda: shards_for_node("a", ["a"], num_shards),
            lambda: validate_num_shards(num_shards),
        ):
            with pytest.raises(ConfigurationError, match=rf"1\.\.{MAX_SHARDS}"):
                call()

    @pytest.mark.parametrize("num_shards", [True, 8.0, "8", None])
    def test_num_shards_not_an_int(self, num_shards: Any) -> None:
        """A non-int num_shards (bool included) is a ConfigurationError naming the type."""
        for call in (
            lambda: shard_for_key("k", num_shards),
            lambda: ShardMapper(num_shards),
            lambda: assign_shards(["a"], num_shards),
        ):
            with pytest.raises(ConfigurationError, match=type(num_shards).__name__):
                call()

    def test_num_shards_bounds_are_accepted(self) -> None:
        """1 and MAX_SHARDS are valid shard counts."""
        assert validate_num_shards(1) == 1
        assert validate_num_shards(MAX_SHARDS) == MAX_SHARDS
        assert shard_for_key("k", 1) == 0
        assert 0 <= shard_for_key("k", MAX_SHARDS) < MAX_SHARDS

    @pytest.mark.parametrize("key", [42, None, bytearray(b"k"), memoryview(b"k"), ["k"]])
    def test_key_not_str_or_bytes(self, key: Any) -> None:
        """A key that is neither str nor bytes is a TypeError that says what to pass."""
        with pytest.raises(TypeError, match="key must be str or bytes"):
            shard_for_key(key, 16)
        with pytest.raises(TypeError, match="key must be str or bytes"):
            ShardMapper(16).shard(key)

    @pytest.mark.parametrize("seed", [b"s", 1, None])
    def test_seed_not_str(self, seed: Any) -> None:
        """A seed that is not a str is a TypeError."""
        with pytest.raises(TypeError, match="seed must be a str"):
            shard_for_key("k", 16, seed)
        with pytest.raises(TypeError, match="seed must be a str"):
            assign_shards(["a"], 16, seed)

    def test_empty_node_set(self) -> None:
        """No live nodes is a ConfigurationError, from every placement function."""
        for call in (
            lambda: assign_shards([], 16),
            lambda: owner_of(0, []),
            lambda: shards_for_node("a", [], 16),
        ):
            with pytest.raises(ConfigurationError, match="empty"):
                call()

    @pytest.mark.parametrize(
        ("nodes", "match"),
        [
            (["a", ""], "non-empty"),
            (["a", 3], "must be str"),
            ("node-a", "not a single str"),
            (["a", "\ud800"], "not valid UTF-8"),
        ],
    )
    def test_bad_node_ids(self, nodes: Any, match: str) -> None:
        """Empty, non-str or unencodable node ids, or one bare string, are ConfigurationErrors."""
        with pytest.raises(ConfigurationError, match=match):
            assign_shards(nodes, 16)

    @pytest.mark.parametrize(
        "weight", [0, 0.0, -1.0, math.nan, math.inf, -math.inf, "2", None, True]
    )
    def test_bad_weight(self, weight: Any) -> None:
        """A weight that is not a finite number > 0 is a ConfigurationError naming the node."""
        with pytest.raises(ConfigurationError, match="weight of node 'b'"):
            assign_shards(["a", "b"], 16, weights={"b": weight})
        with pytest.raises(ConfigurationError, match="weight of node 'b'"):
            owner_of(0, ["a", "b"], weights={"b": weight})

    def test_weights_not_a_mapping(self) -> None:
        """weights given as something other than a mapping is a ConfigurationError."""
        with pytest.raises(ConfigurationError, match="mapping"):
            assign_shards(["a", "b"], 16, weights=[("a", 2.0)])  # type: ignore[arg-type]

    @pytest.mark.parametrize("shard", [-1, MAX_SHARDS])
    def test_shard_out_of_range(self, shard: int) -> None:
        """owner_of and hrw_score refuse a shard id outside 0..MAX_SHARDS-1."""
        with pytest.raises(ShardOutOfRangeError, match="shard must be in"):
            owner_of(shard, ["a", "b"])
        with pytest.raises(ShardOutOfRangeError, match="shard must be in"):
            hrw_score(shard, "a")

    @pytest.mark.parametrize("shard", [1.0, "1", None, False])
    def test_shard_not_an_int(self, shard: Any) -> None:
        """owner_of refuses a shard id that is not an int with a TypeError."""
        with pytest.raises(TypeError, match="shard must be an int"):
            owner_of(shard, ["a", "b"])

    def test_errors_are_value_errors_and_clstr_errors(self) -> None:
        """Configuration and range errors can be caught as ValueError or as ClstrError."""
        with pytest.raises(ValueError, match="num_shards"):
            shard_for_key("k", 0)
        with pytest.raises(ClstrError):
            owner_of(-1, ["a"])


class TestShardCache:
    def test_cache_agrees_with_the_mapper_and_stays_bounded(self) -> None:
        """ShardCache gives the mapper's shard for every key, repeated or not, and
        never holds more than its size."""
        from clstr.hashing import ShardCache

        mapper = ShardMapper(64, "s")
        cache = ShardCache(mapper, size=10)
        keys = [f"k{i}" for i in range(25)] * 3
        assert [cache[k] for k in keys] == [mapper.shard(k) for k in keys]
        assert [cache(k) for k in keys] == [mapper.shard(k) for k in keys]
        assert len(cache) <= 10


class TestPooledHashers:
    def test_threads_hashing_at_once_get_the_same_shards(self) -> None:
        """Threads hashing unseeded keys at once, switching every few bytecodes,
        each get the shards of a single-threaded run: no pooled hasher is shared."""
        import sys
        import threading

        keys = [f"user-{i}" for i in range(3000)]
        expected = [ref.ref_shard(k.encode(), 1024) for k in keys]
        mapper = ShardMapper(1024)
        results: list[list[int]] = []
        interval = sys.getswitchinterval()

        def run() -> None:
            results.append([shard_for_key(k, 1024) for k in keys])
            results.append([mapper.shard(k) for k in keys])

        sys.setswitchinterval(1e-6)
        try:
            threads = [threading.Thread(target=run) for _ in range(6)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        finally:
            sys.setswitchinterval(interval)
        assert len(results) == 12
        assert all(result == expected for result in results)
