"""docs/protocol.md is complete and true: a second implementation can be written
from it. Each test reads the page (or the vectors it points to) and checks it
against what the code does."""

from __future__ import annotations

import json
import re
from pathlib import Path

import msgpack
import pytest

import clstr
from clstr import NoHandlerError, shard_for_key
from clstr.codec import DEFAULT_LIMITS, decode_reply, decode_request, encode_request
from clstr.envelope import _envelope
from clstr.errors import BadRequestError, RequestError, error_for_code
from clstr.hashing import _C1, _C2, _LN2, _SQRT_HALF
from clstr.node._replies import NOT_STORED
from clstr.protocol import fingerprint

ROOT = Path(__file__).resolve().parent.parent
PAGE = (ROOT / "docs" / "protocol.md").read_text()
WIRE = json.loads((ROOT / "tests" / "vectors" / "wire.json").read_text())


def _hex_blocks() -> list[bytes]:
    blocks = re.findall(r"```\n((?:[0-9a-f]{2}[ \n])+)```", PAGE)
    return [bytes.fromhex(b.replace("\n", " ")) for b in blocks]


def _section(title: str) -> str:
    start = PAGE.index(title)
    end = PAGE.find("\n## ", start + 1)
    return PAGE[start : end if end != -1 else None]


def _error_table() -> dict[str, tuple[str, str]]:
    """code -> (exception, kept for retries?) from the page's error-code table."""
    rows = re.findall(
        r"^\| `([a-z_]+)` \| `(\w+)` \| [^|]+ \| (yes|no) \|", _section("### Error codes"), re.M
    )
    return {code: (exc, kept) for code, exc, kept in rows}


class TestWorkedExample:
    def test_request_and_replies_decode_as_documented(self) -> None:
        """The request bytes decode to the envelope the page describes; the replies
        to the documented payload and error."""
        request, ok_reply, error_reply = _hex_blocks()
        env = decode_request(request, received=0.0)
        assert (env.type, env.key, dict(env.headers), env.id) == (
            "Greet",
            "user-42",
            {"tenant": "acme"},
            "req-1",
        )
        assert env.ttl == 4.95
        assert env.created_at == 1_795_000_000
        assert msgpack.unpackb(env.data) == {"name": "ada"}
        assert len(request) == 79
        assert msgpack.unpackb(decode_reply(ok_reply)) == {
            "text": "hello ada",
            "node": "node-2",
            "visits": 1,
        }
        with pytest.raises(NoHandlerError, match="no handler for message type 'Greet'"):
            decode_reply(error_reply)

    def test_shard_and_fingerprint_of_the_example_are_the_documented_ones(self) -> None:
        """user-42 is in shard 22 of 64, and the request's fingerprint there is the
        one the idempotency section gives."""
        request = _hex_blocks()[0]
        assert shard_for_key("user-42", 64) == 22
        assert "`clstr.shard.22`" in PAGE
        env = decode_request(request, shard=22)
        documented = re.search(r"fingerprint\s+`([0-9a-f]{32})` on shard 22", PAGE)
        assert documented is not None
        assert fingerprint(env).hex() == documented.group(1)

    async def test_the_error_reply_is_what_a_router_node_sends(self) -> None:
        """A clstr node whose Router serves only counter.add answers the documented
        request (at a wall clock that makes it fresh) with the documented error
        reply, byte for byte."""
        request, _, error_reply = _hex_blocks()[:3]
        router = clstr.Router()

        async def add(env: clstr.Envelope) -> bytes:
            return b""

        router.mount("counter.add", add)
        network = clstr.MemoryNetwork()
        node = clstr.Node(
            clstr.MemoryTransport(network),
            router,
            num_shards=64,
            wall_clock=lambda: 1_795_000_001.0,
        )
        async with node:
            requester = clstr.MemoryTransport(network)
            assert await requester.request("clstr.shard.22", request, 5) == error_reply


class TestErrorCodes:
    def test_the_table_lists_exactly_the_codes_that_travel(self) -> None:
        """Every code a node can send is in the table with its exception, and nothing
        else: the client-side codes (no_owner, request_timeout, deadline) are not."""
        table = _error_table()
        wire_codes = set(clstr.errors._BY_CODE) - {"no_owner", "request_timeout", "deadline"}
        assert set(table) == wire_codes
        for code, (exc_name, _) in table.items():
            assert getattr(clstr, exc_name).code == code

    def test_kept_column_matches_what_the_node_keeps(self) -> None:
        """A code is documented as kept for retries exactly when the node stores it."""
        for code, (_, kept) in _error_table().items():
            assert (kept == "yes") == (code not in NOT_STORED), code

    def test_every_code_decodes_to_its_class(self) -> None:
        """Each documented code turns back into its exception class at the client."""
        for code, (exc_name, _) in _error_table().items():
            exc = error_for_code(code, exc_name, "m")
            assert type(exc).__name__ == (
                "RemoteHandlerError" if code == "handler_error" else exc_name
            )


class TestConstants:
    def test_fmix64_and_ln_constants_are_the_codes(self) -> None:
        """The page's fmix64 multipliers and the ln constants are the ones hashing uses."""
        placement = _section("## Shard placement (HRW)")
        assert f"k *= {_C1:#018x}" in placement
        assert f"k *= {_C2:#018x}" in placement
        assert f"SQRT_HALF = {_SQRT_HALF.hex()}" in placement
        assert f"LN2 = {_LN2.hex()}" in placement

    def test_limits_table_matches_the_defaults(self) -> None:
        """Each limit in the page's table is the default in clstr.Limits."""
        rows = re.findall(r"^\| [^|]+ \| (\d+) [^|]*\| `(\w+)` \|", _section("## Limits"), re.M)
        assert {field for _, field in rows} == {
            "max_type_bytes",
            "max_key_bytes",
            "max_id_bytes",
            "max_header_count",
            "max_headers_bytes",
            "max_message_bytes",
        }
        for value, field in rows:
            assert getattr(DEFAULT_LIMITS, field) == int(value), field


class TestTraceContext:
    def test_the_table_names_exactly_the_reserved_headers_a_node_accepts(self) -> None:
        """The trace context table lists clstr.envelope.CLSTR_HEADERS, no more, no less."""
        from clstr.envelope import CLSTR_HEADERS

        section = PAGE[PAGE.index("### Trace context") : PAGE.index("### Deadlines and clocks")]
        names = set(re.findall(r"^\| `(x-clstr-[a-z]+)` \|", section, re.M))
        assert names == CLSTR_HEADERS

    def test_the_example_context_decodes(self) -> None:
        """The page's example traceparent is one a W3C propagator reads back: the trace
        and span ids the page names, sampled."""
        from opentelemetry import trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        value = re.search(r'"x-clstr-traceparent":\s+"([^"]+)"', PAGE)
        assert value is not None
        context = TraceContextTextMapPropagator().extract({"traceparent": value.group(1)})
        span = trace.get_current_span(context).get_span_context()
        assert f"{span.trace_id:032x}" == "0af7651916cd43dd8448eb211c80319c"
        assert f"{span.span_id:016x}" == "b7ad6b7169203331"
        assert span.trace_flags.sampled


class TestWireVectors:
    def test_requests_decode_to_their_fields_and_encode_back(self) -> None:
        """Each request vector decodes to its fields, clstr encodes the same bytes,
        the key is in the stated shard and the fingerprint is the stated one (clstr
        always writes d and ts: the vectors with both encode back byte for byte)."""
        for v in WIRE["requests"]:
            data = bytes.fromhex(v["hex"])
            fields = v["fields"]
            env = decode_request(data, shard=v["shard"], received=0.0)
            assert env.type == fields["t"]
            assert env.key == fields.get("k")
            assert env.data == bytes.fromhex(fields.get("d", ""))
            assert dict(env.headers) == fields.get("h", {})
            assert env.id == fields.get("id")
            if env.key is not None:
                assert shard_for_key(env.key, v["num_shards"]) == v["shard"]
            assert fingerprint(env).hex() == v["fingerprint_hex"], v["name"]
            if "d" in fields and "ts" in fields:  # what clstr always writes
                ttl = fields.get("ttl", 0) / 1000 or None
                # As the client builds it: clstr's own trace headers pass unchecked.
                again = _envelope(
                    env.type,
                    env.data,
                    env.shard,
                    env.key,
                    env.headers,
                    ttl,
                    env.created_at,
                    env.id,
                    None,
                    0,
                )
                assert encode_request(again, ttl=ttl).hex() == v["hex"], v["name"]

    def test_bad_requests_are_refused(self) -> None:
        """Each bad_request vector is refused by the decoder (a node answers bad_request)."""
        for v in WIRE["bad_requests"]:
            with pytest.raises(BadRequestError):
                decode_request(bytes.fromhex(v["hex"]))

    def test_replies_decode_as_stated(self) -> None:
        """Ok replies give their payload, error replies the exception of their code."""
        codes = set()
        for v in WIRE["replies"]:
            data = bytes.fromhex(v["hex"])
            if v["ok"]:
                assert decode_reply(data) == bytes.fromhex(v["d_hex"])
                continue
            with pytest.raises(RequestError) as caught:
                decode_reply(data)
            assert caught.value.code == v["code"]
            codes.add(v["code"])
        assert codes == set(_error_table())


class TestEntityVectors:
    def test_entity_keys_and_shards_match(self) -> None:
        """entity_key and the runner's placement give each vector's key and shard."""
        from clstr.protocol import entity_key

        vectors = json.loads((ROOT / "tests" / "vectors" / "entities.json").read_text())
        for v in vectors["vectors"]:
            key = entity_key(v["entity_type"], v["entity_id"])
            assert key == v["key"]
            assert shard_for_key(key, v["num_shards"], v["seed"]) == v["shard"], v
        assert {v["entity_type"] for v in vectors["vectors"]} >= {"clstr.singleton", "Cart"}
