"""Hostile input: property tests of the codec, and a fuzz run against live nodes.

The property tests (hypothesis) prove the wire format round-trips and that
the decoders fail only with their own errors, whatever bytes they get. The
fuzz run publishes random and mutated messages onto a live node's shard
subjects over a real nats-server, with and without a reply subject, and
checks that the node stays up, answers every message that has a reply
subject (``bad_request`` exactly when the bytes do not decode) and counts
the rejects in its metric. A second run on the memory transport measures,
in process, that the node holds no memory once the run is over.

``CLSTR_FUZZ_CASES`` sets the number of messages over NATS (default
100 000); ``CLSTR_FUZZ_MEMORY_CASES`` those of the memory-measured run
(default 40 000); ``CLSTR_FUZZ_SEED`` the seed (default 1). Run with ``-s``
for the figures.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import logging
import os
import random
import string
import time
import tracemalloc
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import msgpack
import pytest
import structlog
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from clstr import (
    BadRequestError,
    Envelope,
    MemoryNetwork,
    Node,
    PayloadError,
    PrometheusMetrics,
    RemoteHandlerError,
    RequestError,
    Transport,
)
from clstr.codec import (
    DEFAULT_LIMITS,
    decode_payload,
    decode_reply,
    decode_request,
    encode_error_reply,
    encode_payload,
    encode_reply,
    encode_request,
)
from clstr.errors import error_for_code
from clstr.hashing import shard_for_key
from clstr.testing import NatsServer
from clstr.transports.nats import NatsOptions, NatsTransport

from _support import eventually

FUZZ_CASES = int(os.environ.get("CLSTR_FUZZ_CASES", "100000"))
MEMORY_CASES = int(os.environ.get("CLSTR_FUZZ_MEMORY_CASES", "40000"))
FUZZ_SEED = int(os.environ.get("CLSTR_FUZZ_SEED", "1"))
NUM_SHARDS = 4
CHUNK = 500  # messages in flight at once: well under the node's max_pending
REPLY_SUBJECT = "fuzz.reply"
# After WARM_UP messages, TRACED more run under tracemalloc: what is still
# held after them must stay under MEMORY_BOUND, and the live objects after the
# whole run under OBJECT_BOUND more than after warm-up. The reply cache (of
# REPLY_CACHE entries) fills with the ids of valid mutants along the way.
WARM_UP = 20_000
TRACED = 10_000
REPLY_CACHE = 1_000
MEMORY_BOUND = 1024 * 1024
# msgpack interns the str keys of the maps it decodes, and the fuzzer's random keys
# grow the interpreter's interned-string table: when it runs out of room it is
# reallocated as one block (the old one, allocated before tracing began, is freed
# unseen), a few hundred KiB to MiB depending on what the process has interned so
# far. That block is the interpreter's, not state the node holds, which shows as
# many small blocks: blocks this large are left out of the bound (and counted).
TABLE_BLOCK = 256 * 1024
OBJECT_BOUND = 10 * REPLY_CACHE

PROPERTY_SETTINGS = settings(
    max_examples=300,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)

# -- strategies ---------------------------------------------------------------

texts = st.text(max_size=40)
names = st.text(min_size=1, max_size=40)
headers = st.dictionaries(
    st.text(min_size=1, max_size=20).filter(lambda h: not h.lower().startswith("x-clstr-")),
    st.text(max_size=40),
    max_size=5,
)
msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=20,
)


@dataclass
class Point:
    x: int
    y: int


@dataclass
class Shape:
    name: str
    points: list[Point] = field(default_factory=list)
    tags: dict[str, str] = field(default_factory=dict)
    scale: float = 1.0
    note: str | None = None


int64s = st.integers(-(2**63), 2**63 - 1)
shapes = st.builds(
    Shape,
    name=texts,
    points=st.lists(st.builds(Point, x=int64s, y=int64s), max_size=5),
    tags=st.dictionaries(texts, texts, max_size=4),
    scale=st.floats(allow_nan=False),
    note=st.none() | texts,
)


class TestCodecProperties:
    """The wire format round-trips, and decoders fail only with their own errors."""

    @PROPERTY_SETTINGS
    @given(
        msg_type=names,
        data=st.binary(max_size=200),
        key=st.none() | texts,
        hdrs=headers,
        ttl=st.none() | st.floats(min_value=0.01, max_value=3600),
        created_at=st.floats(min_value=0, max_value=4e9),
        request_id=st.none() | texts,
    )
    def test_request_round_trip(
        self,
        msg_type: str,
        data: bytes,
        key: str | None,
        hdrs: dict[str, str],
        ttl: float | None,
        created_at: float,
        request_id: str | None,
    ) -> None:
        """Every envelope within the limits decodes to what was encoded."""
        env = Envelope(
            msg_type, data, key=key, headers=hdrs, ttl=ttl, created_at=created_at, id=request_id
        )
        back = decode_request(encode_request(env), shard=3, received=1000.0)
        assert (back.type, back.data, back.key, dict(back.headers), back.id, back.shard) == (
            msg_type,
            data,
            key,
            hdrs,
            request_id,
            3,
        )
        assert back.created_at == pytest.approx(created_at, abs=0.001)
        if ttl is None:
            assert back.ttl is None
            assert back.deadline is None
        else:
            assert back.ttl is not None
            assert 0 < back.ttl <= ttl + 0.001
            assert back.deadline == pytest.approx(1000.0 + back.ttl)

    @PROPERTY_SETTINGS
    @given(data=st.binary(max_size=500))
    def test_reply_round_trip(self, data: bytes) -> None:
        """An ok reply gives back its payload."""
        assert decode_reply(encode_reply(data)) == data

    @PROPERTY_SETTINGS
    @given(
        code=st.sampled_from(
            [
                "no_owner",
                "not_owner",
                "expired",
                "timeout",
                "overloaded",
                "bad_request",
                "key_required",
                "no_handler",
                "handler_error",
                "something_new",
            ]
        ),
        type_name=texts,
        message=texts,
    )
    def test_error_reply_round_trip(self, code: str, type_name: str, message: str) -> None:
        """An error reply raises the exception of its code (a plain one for unknown codes)."""
        expected = type(error_for_code(code, type_name, message))
        with pytest.raises(RequestError) as caught:
            decode_reply(encode_error_reply(code, type_name, message))
        assert type(caught.value) is expected
        if expected is RemoteHandlerError:
            assert isinstance(caught.value, RemoteHandlerError)
            assert caught.value.remote_message == message

    @PROPERTY_SETTINGS
    @given(shape=shapes)
    def test_typed_payload_round_trip(self, shape: Shape) -> None:
        """A dataclass payload (nested, optional, dict fields) round-trips."""
        assert decode_payload(encode_payload(shape), Shape) == shape

    @PROPERTY_SETTINGS
    @given(big=st.integers(min_value=2**64) | st.integers(max_value=-(2**63) - 1))
    def test_integers_beyond_64_bits_are_a_payload_error(self, big: int) -> None:
        """msgpack has no integers past 64 bits: encoding one raises PayloadError."""
        with pytest.raises(PayloadError):
            encode_payload(Point(x=0, y=big))

    @PROPERTY_SETTINGS
    @given(value=msgpack_values)
    def test_plain_payload_round_trip(self, value: Any) -> None:
        """Plain msgpack values round-trip through encode_payload/decode_payload."""
        assert decode_payload(encode_payload(value), object) == value

    @PROPERTY_SETTINGS
    @given(data=st.binary(max_size=300))
    def test_request_decoder_fails_only_with_bad_request(self, data: bytes) -> None:
        """Arbitrary bytes decode to an envelope or raise BadRequestError, nothing else."""
        with contextlib.suppress(BadRequestError):
            decode_request(data)

    @PROPERTY_SETTINGS
    @given(
        body=st.dictionaries(
            st.sampled_from(["v", "t", "d", "k", "h", "ttl", "ts", "id"]), msgpack_values
        )
    )
    def test_request_decoder_checks_every_field_type(self, body: dict[str, Any]) -> None:
        """A map with any values in the known fields decodes only when every type is right."""
        body.setdefault("v", 1)
        try:
            env = decode_request(msgpack.packb(body, use_bin_type=True))
        except BadRequestError:
            return
        assert isinstance(env.type, str)
        assert env.type
        assert isinstance(env.data, bytes)
        assert env.key is None or isinstance(env.key, str)
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in env.headers.items())
        assert env.id is None or isinstance(env.id, str)

    @PROPERTY_SETTINGS
    @given(data=st.binary(max_size=300))
    def test_reply_decoder_fails_only_with_request_errors(self, data: bytes) -> None:
        """Arbitrary reply bytes give a payload or raise a RequestError, nothing else."""
        with contextlib.suppress(RequestError):
            decode_reply(data)

    @PROPERTY_SETTINGS
    @given(data=st.binary(max_size=300))
    def test_payload_decoder_fails_only_with_payload_error(self, data: bytes) -> None:
        """Arbitrary payload bytes give a Shape or raise PayloadError, nothing else."""
        with contextlib.suppress(PayloadError):
            decode_payload(data, Shape)


# -- the fuzzer -------------------------------------------------------------------

_FIELDS = ("v", "t", "d", "k", "h", "ttl", "ts", "id")
_ALPHABET = string.ascii_letters + string.digits + "-_.:é漢🙂"
_POOL_SIZE = 512

#: The msgpack types a value can have on the wire.
MSGPACK_TYPES = ("nil", "bool", "int", "float", "str", "bin", "array", "map", "ext")
#: The types each request field accepts (nil: the field is absent).
FIELD_TYPES = {
    "v": {"int"},
    "t": {"str"},
    "d": {"nil", "bin"},
    "k": {"nil", "str"},
    "h": {"nil", "map"},
    "ttl": {"nil", "int"},
    "ts": {"nil", "int"},
    "id": {"nil", "str"},
}
#: Every (field, type) pair the decoder must refuse.
WRONG_PAIRS = frozenset(
    (name, kind) for name in _FIELDS for kind in MSGPACK_TYPES if kind not in FIELD_TYPES[name]
)
#: Where bad_utf8 puts a string that is not UTF-8.
UTF8_TARGETS = ("t", "k", "id", "header name", "header value")


class Fuzzer:
    """Makes random and mutated request bodies, reproducibly from a seed.

    Kinds: valid envelopes; byte-level mutants of valid ones (bit flips,
    inserted, deleted and overwritten bytes, truncation, splices); each field
    given a value of every wrong msgpack type; huge declared lengths; deeply
    nested payloads; non-UTF-8 types, keys, ids, header names and header
    values; random bytes. ``wrong_types`` counts the (field, msgpack type)
    pairs made, ``bad_utf8_targets`` where the bad strings went.
    """

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.kinds: Counter[str] = Counter()
        self.wrong_types: Counter[tuple[str, str]] = Counter()
        self.bad_utf8_targets: Counter[str] = Counter()
        self._pool: list[bytes] = []

    def _text(self, lo: int = 0, hi: int = 24) -> str:
        return "".join(self.rng.choices(_ALPHABET, k=self.rng.randint(lo, hi)))

    def valid(self) -> bytes:
        """A well-formed request: a fresh one now and then, else one of a pool."""
        if len(self._pool) < _POOL_SIZE or self.rng.random() < 0.1:
            body = self._fresh()
            if len(self._pool) < _POOL_SIZE:
                self._pool.append(body)
            else:
                self._pool[self.rng.randrange(_POOL_SIZE)] = body
            return body
        return self.rng.choice(self._pool)

    def _fresh(self) -> bytes:
        rng = self.rng
        env = Envelope(
            self._text(1, 30),
            rng.randbytes(rng.randint(0, 64)),
            key=self._text(1, 30) if rng.random() < 0.8 else None,
            headers={self._text(1, 8): self._text(0, 8) for _ in range(rng.randint(0, 3))},
            ttl=rng.choice([None, 5.0, 30.0]),
            id=self._text(8, 16) if rng.random() < 0.5 else None,
        )
        return encode_request(env)

    def _wrong_value(self) -> tuple[str, Any]:
        """A value of any msgpack type, and that type."""
        rng = self.rng
        return rng.choice(
            [
                ("nil", None),
                ("bool", True),
                ("bool", False),
                ("int", 0),
                ("int", -1),
                ("int", 2**64 - 1),
                ("int", -(2**63)),
                ("float", rng.random()),
                ("float", float("inf")),
                ("float", float("nan")),
                ("str", self._text()),
                ("bin", rng.randbytes(8)),
                ("array", [1, "a", None]),
                ("map", {"a": 1}),
                ("map", {"x": {"y": [1, 2]}}),
                ("ext", msgpack.ExtType(rng.randint(0, 127), rng.randbytes(4))),
                ("ext", msgpack.Timestamp(0, 0)),
            ]
        )

    def wrong_type(self) -> bytes:
        body: dict[str, Any] = msgpack.unpackb(self.valid(), raw=False)
        for name in self.rng.sample(_FIELDS, self.rng.randint(1, 3)):
            kind, body[name] = self._wrong_value()
            self.wrong_types[name, kind] += 1
        return msgpack.packb(body, use_bin_type=True)  # type: ignore[no-any-return]

    def mutant(self) -> bytes:
        rng = self.rng
        data = bytearray(self.valid())
        for _ in range(rng.randint(1, 4)):
            op = rng.randrange(6)
            pos = rng.randrange(len(data) + 1)
            if op == 0 and data:  # flip a bit
                i = min(pos, len(data) - 1)
                data[i] ^= 1 << rng.randrange(8)
            elif op == 1:  # insert bytes
                data[pos:pos] = rng.randbytes(rng.randint(1, 8))
            elif op == 2:  # delete bytes
                del data[pos : pos + rng.randint(1, 8)]
            elif op == 3 and data:  # overwrite with an interesting byte
                data[min(pos, len(data) - 1)] = rng.choice(
                    [0x00, 0x7F, 0x80, 0xC0, 0xC1, 0xC4, 0xD9, 0xDB, 0xDC, 0xDD, 0xDE, 0xDF, 0xFF]
                )
            elif op == 4:  # truncate
                del data[pos:]
            else:  # splice with another message
                other = self.valid()
                data[pos:] = other[rng.randrange(len(other) + 1) :]
        return bytes(data)

    def huge_length(self) -> bytes:
        rng = self.rng
        # str32, bin32, array32, map32 headers claiming ~4 GiB, then a few bytes.
        head = rng.choice([b"\xdb", b"\xc6", b"\xdd", b"\xdf", b"\xc9"])
        claim = head + rng.choice([b"\xff\xff\xff\xff", b"\x7f\xff\xff\xff", b"\x00\x10\x00\x00"])
        if rng.random() < 0.5:
            return claim + rng.randbytes(rng.randint(0, 16))
        # Inside a map, as the value of a known field.
        return b"\x82\xa1v\x01\xa1" + rng.choice([b"t", b"d", b"k", b"h"]) + claim

    def deep(self) -> bytes:
        rng = self.rng
        depth = rng.choice([100, 1000, 5000, 20_000])
        opener = rng.choice([b"\x91", b"\x81\xa1a"])  # [x] or {"a": x}
        nested = opener * depth + b"\xc0"
        return b"\x83\xa1v\x01\xa1t\xa1x\xa1d" + nested

    def bad_utf8(self) -> bytes:
        """A request with one string that is not UTF-8: the type, key, id, or a
        header's name or value."""
        rng = self.rng
        junk = rng.choice([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\x80"])
        raw = b"ok" + junk + b"!"
        bad = bytes([0xA0 | len(raw)]) + raw  # a fixstr holding it
        target = rng.choice(UTF8_TARGETS)
        self.bad_utf8_targets[target] += 1
        head = b"\xa1v\x01"  # "v": 1
        if target == "t":
            return b"\x82" + head + b"\xa1t" + bad
        if target in ("k", "id"):
            name = target.encode()
            return b"\x83" + head + b"\xa1t\xa1x" + bytes([0xA0 | len(name)]) + name + bad
        pair = bad + b"\xa1v" if target == "header name" else b"\xa1n" + bad
        return b"\x83" + head + b"\xa1t\xa1x\xa1h\x81" + pair

    def random_bytes(self) -> bytes:
        return self.rng.randbytes(self.rng.randint(0, 200))

    def make(self) -> bytes:
        roll = self.rng.random()
        for bound, kind, make in (
            (0.10, "valid", self.valid),
            (0.45, "mutant", self.mutant),
            (0.65, "wrong_type", self.wrong_type),
            (0.72, "huge_length", self.huge_length),
            (0.78, "deep", self.deep),
            (0.85, "bad_utf8", self.bad_utf8),
            (1.01, "random", self.random_bytes),
        ):
            if roll < bound:
                self.kinds[kind] += 1
                return make()
        raise AssertionError("unreachable")

    def messages(self, count: int) -> Iterator[bytes]:
        for _ in range(count):
            yield self.make()


def decodes(data: bytes) -> bool:
    """Whether the node's decoder accepts ``data`` (the oracle for ``bad_request``)."""
    try:
        decode_request(data, limits=DEFAULT_LIMITS)
    except BadRequestError:
        return False
    return True


def subject_for(data: bytes, rng: random.Random) -> str:
    """The shard subject to send ``data`` to: its key's shard when it decodes with a
    key (anywhere else is ``wrong_shard``, tested on its own), else any shard."""
    try:
        key = decode_request(data, limits=DEFAULT_LIMITS).key
    except BadRequestError:
        key = None
    shard = rng.randrange(NUM_SHARDS) if key is None else shard_for_key(key, NUM_SHARDS)
    return f"clstr.shard.{shard}"


@dataclass
class Tally:
    """What came back, and what was expected."""

    sent: int = 0
    with_reply: int = 0
    expected_bad: int = 0
    expected_bad_with_reply: int = 0
    replies: Counter[str] = field(default_factory=Counter)
    received: int = 0
    wrong: list[str] = field(default_factory=list)


async def echo(env: Envelope) -> bytes:
    """Answers every well-formed message."""
    return b"ok"


Publish = Callable[[str, bytes, str | None], Awaitable[None]]


async def fuzz(
    count: int,
    fuzzer: Fuzzer,
    node: Node,
    spy: Transport,
    publish: Publish,
    tally: Tally,
    *,
    on_chunk: Callable[[int], None] | None = None,
) -> None:
    """Publish ``count`` fuzzed messages to ``node`` in chunks; check every reply."""
    arrived = asyncio.Event()
    state = {"wanted": 0}

    def on_reply(data: bytes, reply: str | None) -> None:
        tally.received += 1
        try:
            decode_reply(data)
            tally.replies["ok"] += 1
        except RequestError as exc:
            tally.replies[exc.code] += 1
        if tally.received >= state["wanted"]:
            arrived.set()

    sub = await spy.subscribe(REPLY_SUBJECT, on_reply)
    messages = fuzzer.messages(count)
    rng = random.Random(fuzzer.rng.random())
    done = 0
    try:
        while done < count:
            batch = min(CHUNK, count - done)
            for _ in range(batch):
                data = next(messages)
                if len(data) > node.transport.max_payload:
                    data = data[: node.transport.max_payload]
                bad = not decodes(data)
                reply = REPLY_SUBJECT if rng.random() < 0.9 else None
                tally.sent += 1
                tally.expected_bad += bad
                if reply is not None:
                    tally.with_reply += 1
                    tally.expected_bad_with_reply += bad
                await publish(subject_for(data, rng), data, reply)
            done += batch
            state["wanted"] = tally.with_reply
            if tally.received < tally.with_reply:
                arrived.clear()
                await asyncio.wait_for(arrived.wait(), timeout=30)
            assert node.state.value == "running"
            if on_chunk is not None:
                on_chunk(done)
    finally:
        await sub.unsubscribe()


def rejected(registry: CollectorRegistry, reason: str) -> float:
    return (
        registry.get_sample_value("clstr_cluster_envelopes_rejected_total", {"reason": reason})
        or 0.0
    )


def check(tally: Tally, node: Node, registry: CollectorRegistry) -> None:
    """Every message with a reply subject was answered, bad ones with bad_request."""
    assert tally.received == tally.with_reply
    assert tally.replies["bad_request"] == tally.expected_bad_with_reply
    # id_reused: the fuzzer sends other messages under ids it used before.
    assert set(tally.replies) <= {"ok", "bad_request", "expired", "id_reused"}
    assert rejected(registry, "bad_request") == tally.expected_bad
    assert node.stats.rejected.get("bad_request", 0) == tally.expected_bad


def check_coverage(fuzzer: Fuzzer) -> None:
    """The run made every kind of message: each (field, wrong msgpack type) pair, and a
    non-UTF-8 string in every place one can go."""
    missing = sorted(pair for pair in WRONG_PAIRS if not fuzzer.wrong_types[pair])
    assert not missing, f"(field, wrong type) pairs never generated: {missing}"
    assert set(fuzzer.bad_utf8_targets) == set(UTF8_TARGETS)
    assert len(fuzzer.kinds) == 7
    assert all(fuzzer.kinds.values())


@pytest.fixture
def quiet_logs() -> None:
    """Log warnings only: a debug line per rejected message would swamp the run (the
    conftest puts the configuration back)."""
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))


@pytest.mark.usefixtures("quiet_logs")
class TestFuzzLiveNode:
    """A live node takes a flood of hostile messages and stays up, answering each."""

    async def test_memory_transport(self) -> None:
        """A fuzz run on the memory transport, with the node's memory measured in process."""
        count = MEMORY_CASES
        network = MemoryNetwork()
        registry = CollectorRegistry()
        node = Node(
            network.connect("node"),
            echo,
            node_id="fuzzed",
            num_shards=NUM_SHARDS,
            metrics=PrometheusMetrics(registry),
            reply_cache_size=REPLY_CACHE,
        )
        fuzzer = Fuzzer(FUZZ_SEED)
        tally = Tally()
        raw = network.connect("fuzzer")

        async def publish(subject: str, data: bytes, reply: str | None) -> None:
            await raw.publish(subject, data, reply=reply)

        # tracemalloc slows allocation down a lot: trace a window of the run
        # after warm-up, and count live objects over the whole of it.
        start = min(WARM_UP, count // 2)
        window = (start, min(start + TRACED, count))
        measured: dict[str, int] = {}

        def on_chunk(done: int) -> None:
            if done >= window[0] and "objects" not in measured:
                gc.collect()
                measured["objects"] = len(gc.get_objects())
                measured["cached_before"] = len(node._reply_cache)
                tracemalloc.start()
            elif done >= window[1] and tracemalloc.is_tracing():
                gc.collect()
                blocks = [t.size for t in tracemalloc.take_snapshot().traces]
                tables = [size for size in blocks if size >= TABLE_BLOCK]
                measured["traced"] = sum(blocks) - sum(tables)
                measured["tables"] = len(tables)
                measured["cached_after"] = len(node._reply_cache)
                tracemalloc.stop()

        started = time.perf_counter()
        try:
            async with node:
                await fuzz(count, fuzzer, node, raw, publish, tally, on_chunk=on_chunk)
                await eventually(lambda: node.queued == 0 and node.running == 0)
                on_chunk(count)
                gc.collect()
                objects = len(gc.get_objects()) - measured["objects"]
        finally:
            tracemalloc.stop()
            await raw.close()
        elapsed = time.perf_counter() - started
        print(
            f"\nfuzz (memory transport): {tally.sent} messages in {elapsed:.1f}s, "
            f"{tally.with_reply} with a reply subject, replies {dict(tally.replies)}, "
            f"kinds {dict(fuzzer.kinds)}; after warm-up: {measured['traced'] / 1024:+.0f} KiB "
            f"held over {window[1] - window[0]} traced messages, besides {measured['tables']} "
            f"block(s) of the interned-string table (the reply cache went from "
            f"{measured['cached_before']} to {measured['cached_after']} of {REPLY_CACHE} "
            f"entries), {objects:+d} live objects from then to the end of the run"
        )
        check(tally, node, registry)
        check_coverage(fuzzer)
        assert measured["traced"] < MEMORY_BOUND
        assert measured["tables"] <= 2
        assert objects < OBJECT_BOUND

    async def test_over_nats(self, clstr_nats_server: NatsServer) -> None:
        """The fuzz run over a real nats-server (CLSTR_FUZZ_CASES, 100 000 by default)
        onto a live node's shard subjects, 90% of them with a reply subject."""
        count = FUZZ_CASES
        registry = CollectorRegistry()
        options = NatsOptions(name="fuzzed")
        node_transport = await NatsTransport.connect(clstr_nats_server.url, options)
        raw = await NatsTransport.connect(
            clstr_nats_server.url, dataclasses.replace(options, name="fuzzer")
        )
        node = Node(
            node_transport,
            echo,
            node_id="fuzzed",
            num_shards=NUM_SHARDS,
            metrics=PrometheusMetrics(registry),
        )
        fuzzer = Fuzzer(FUZZ_SEED + 1)
        tally = Tally()

        async def publish(subject: str, data: bytes, reply: str | None) -> None:
            await raw.publish(subject, data, reply=reply)

        started = time.perf_counter()
        try:
            async with node:
                await fuzz(count, fuzzer, node, raw, publish, tally)
                await eventually(lambda: node.queued == 0 and node.running == 0)
        finally:
            await raw.close()
            await node_transport.close()
        elapsed = time.perf_counter() - started
        print(
            f"\nfuzz (nats-server): {tally.sent} messages in {elapsed:.1f}s "
            f"({tally.sent / elapsed:,.0f}/s), {tally.with_reply} with a reply subject, "
            f"replies {dict(tally.replies)}, kinds {dict(fuzzer.kinds)}, "
            f"all {len(WRONG_PAIRS)} (field, wrong type) pairs, each made at least "
            f"{min(fuzzer.wrong_types[p] for p in WRONG_PAIRS)} times, "
            f"bad UTF-8 in {dict(fuzzer.bad_utf8_targets)}"
        )
        check(tally, node, registry)
        check_coverage(fuzzer)
