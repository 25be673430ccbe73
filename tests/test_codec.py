"""Wire format v1, typed payloads, envelopes and limits."""

from __future__ import annotations

import dataclasses
import inspect
import re
import time
from dataclasses import dataclass, field
from typing import ClassVar

import msgpack
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from clstr import (
    BadRequestError,
    Client,
    Envelope,
    EnvelopeExpiredError,
    HandlerTimeoutError,
    LimitExceededError,
    MemoryTransport,
    NoHandlerError,
    OverloadedError,
    PayloadError,
    RemoteHandlerError,
    RequestError,
    ReservedHeaderError,
    decode_payload,
    encode_payload,
    errors,
    message_type,
    with_header,
    with_ttl,
)
from clstr.codec import (
    DEFAULT_LIMITS,
    Limits,
    check_limits,
    decode_reply,
    decode_request,
    encode_error_reply,
    encode_reply,
    encode_request,
)
from clstr.envelope import _envelope, _Unfrozen
from clstr.errors import ConfigurationError, KeyRequiredError, NotOwnerError


@dataclass
class Point:
    x: int
    y: float = 0.0


@dataclass
class Shape:
    message_type: ClassVar[str] = "geo.shape"

    name: str
    points: list[Point] = field(default_factory=list)
    tags: dict[str, Point] = field(default_factory=dict)
    parent: Point | None = None


class TestEnvelope:
    def test_fast_builder_makes_the_same_frozen_envelope(self) -> None:
        """The codec's envelope builder sets every field (a field added to Envelope
        must be added there too) and the result is a real, frozen Envelope."""
        names = [f.name for f in dataclasses.fields(Envelope)]
        assert list(inspect.signature(_Unfrozen).parameters) == names
        values = ("t", b"d", 3, "k", {"a": "b"}, 2.0, 1.5, "id", 9.0, 4)
        built = _envelope(*values)
        assert type(built) is Envelope
        assert built == Envelope(*values)
        assert [getattr(built, n) for n in names] == list(values)
        with pytest.raises(dataclasses.FrozenInstanceError):
            built.key = "other"  # type: ignore[misc]

    def test_ttl_sets_a_local_deadline(self) -> None:
        """An envelope with a TTL has a monotonic deadline that many seconds ahead."""
        before = time.monotonic()
        env = Envelope("t", ttl=2.0)
        assert env.deadline is not None
        assert before + 2.0 <= env.deadline <= time.monotonic() + 2.0
        remaining = env.remaining()
        assert remaining is not None
        assert 0 < remaining <= 2.0
        assert not env.expired()

    def test_without_ttl_never_expires(self) -> None:
        """An envelope without TTL has no deadline and never expires."""
        env = Envelope("t")
        assert env.remaining() is None
        assert not env.expired()

    def test_past_deadline_is_expired(self) -> None:
        """An envelope whose deadline has passed reports expired and negative time left."""
        env = Envelope("t", ttl=1.0, deadline=time.monotonic() - 1)
        assert env.expired()
        remaining = env.remaining()
        assert remaining is not None
        assert remaining < 0

    def test_with_header_and_with_ttl_copy(self) -> None:
        """with_header/with_ttl return new envelopes and leave the original as it was."""
        env = Envelope("t")
        changed = env.with_header("a", "1").with_ttl(3)
        assert changed.headers == {"a": "1"}
        assert changed.ttl == 3
        assert env.headers == {}
        assert env.ttl is None

    @pytest.mark.parametrize("name", ["x-clstr-key", "X-CLSTR-anything"])
    def test_reserved_header_refused(self, name: str) -> None:
        """Header names with the x-clstr- prefix (any case) raise ReservedHeaderError."""
        with pytest.raises(ReservedHeaderError, match="reserved prefix"):
            Envelope("t").with_header(name, "v")
        with pytest.raises(ReservedHeaderError):
            with_header(name, "v")

    @pytest.mark.parametrize("name", ["x-clstr-owner", "X-Clstr-Owner"])
    def test_reserved_header_refused_by_the_constructor(self, name: str) -> None:
        """An Envelope built with a reserved header name, directly or as a copy with
        new headers, raises ReservedHeaderError: with_header is not the only way in."""
        with pytest.raises(ReservedHeaderError, match="reserved prefix"):
            Envelope("t", headers={"ok": "1", name: "node-7"})
        with pytest.raises(ReservedHeaderError):
            dataclasses.replace(Envelope("t"), headers={name: "node-7"})

    def test_header_values_must_be_str(self) -> None:
        """A header value that is not a str is refused when the envelope is built."""
        with pytest.raises(TypeError, match="must be str"):
            Envelope("t", headers={"n": 1})  # type: ignore[dict-item]

    def test_options_apply_in_order(self) -> None:
        """Envelope options are plain functions applied left to right."""
        env = Envelope("t")
        for option in (with_header("a", "1"), with_header("a", "2"), with_ttl(1)):
            env = option(env)
        assert env.headers == {"a": "2"}
        assert env.ttl == 1

    @pytest.mark.parametrize("ttl", [0, -1])
    def test_non_positive_ttl_refused(self, ttl: float) -> None:
        """A TTL of zero or less is a configuration error, not an instant expiry."""
        with pytest.raises(ConfigurationError):
            Envelope("t", ttl=ttl)
        with pytest.raises(ConfigurationError):
            with_ttl(ttl)


class TestRequestWire:
    @pytest.mark.parametrize("size", [0, 100, 64 * 1024, 64 * 1024 + 1, 1024 * 1024])
    def test_small_and_big_bodies_encode_alike(self, size: int) -> None:
        """Small bodies use the reusable packer, big ones (past 64 KiB) a packer of
        their own: the bytes are what msgpack.packb makes either way."""
        env = Envelope("t", data=b"\x01" * size, key="k", created_at=1.5)
        body = encode_request(env)
        expected = {"v": 1, "t": "t", "d": b"\x01" * size, "k": "k", "ts": 1500}
        assert body == msgpack.packb(expected, use_bin_type=True)
        assert decode_request(body).data == env.data

    def test_round_trip_keeps_every_field(self) -> None:
        """encode_request then decode_request gives back type, data, key, headers, ttl, ts, id."""
        env = Envelope(
            "Greet",
            b"\x01\x02",
            key="user-1",
            headers={"tenant": "acme"},
            ttl=5.0,
            created_at=1_795_000_000.123,
            id="req-1",
        )
        received = time.monotonic()
        back = decode_request(encode_request(env), shard=7, received=received)
        assert (back.type, back.data, back.key, back.headers, back.id, back.shard) == (
            "Greet",
            b"\x01\x02",
            "user-1",
            {"tenant": "acme"},
            "req-1",
            7,
        )
        assert back.created_at == pytest.approx(1_795_000_000.123, abs=0.001)
        assert back.ttl is not None
        assert 4.9 < back.ttl <= 5.0
        assert back.deadline == pytest.approx(received + back.ttl)

    def test_deadline_counts_from_receipt_not_sender_clock(self) -> None:
        """The decoded deadline is receipt time plus TTL, whatever the sender's timestamp says."""
        env = Envelope("t", ttl=2.0, created_at=0.0)  # sender's clock claims 1970
        back = decode_request(encode_request(env), received=100.0)
        assert back.deadline == pytest.approx(100.0 + 2.0, abs=0.01)

    def test_unknown_fields_are_ignored(self) -> None:
        """A newer sender may add fields: the decoder ignores keys it does not know."""
        body = msgpack.packb({"v": 1, "t": "x", "future": [1, 2, 3]}, use_bin_type=True)
        assert decode_request(body).type == "x"

    @pytest.mark.parametrize(
        ("body", "reason"),
        [
            (b"", "not valid msgpack"),
            (b"\xc1", "not valid msgpack"),
            (msgpack.packb([1, 2]), "must be a msgpack map"),
            (msgpack.packb({"v": 2, "t": "x"}), "unsupported wire version"),
            (msgpack.packb({"v": 1}), "no message type"),
            (msgpack.packb({"v": 1, "t": 5}), "'t' must be str"),
            (msgpack.packb({"v": 1, "t": "x", "d": "text"}), "'d' must be bytes"),
            (msgpack.packb({"v": 1, "t": "x", "k": 1}), "'k' must be str"),
            (msgpack.packb({"v": 1, "t": "x", "h": {"a": 1}}), "'h' must map str to str"),
            (msgpack.packb({"v": 1, "t": "x", "ttl": -5}), "'ttl' must be >= 0"),
            (msgpack.packb({"v": 1, "t": "x", "ttl": True}), "'ttl' must be int"),
            (msgpack.packb({"v": 1, "t": "x" * 300}), "message type is 300 bytes"),
            (b"\x82\xa1v\x01\xa1t\xa1\xff", "not valid msgpack"),  # invalid UTF-8 in t
        ],
    )
    def test_malformed_request_is_bad_request(self, body: bytes, reason: str) -> None:
        """Each malformed body raises BadRequestError that says what is wrong."""
        with pytest.raises(BadRequestError, match=re.escape(reason)):
            decode_request(body)

    @pytest.mark.parametrize("name", ["x-clstr-owner", "X-CLSTR-OWNER"])
    def test_reserved_header_on_the_wire_is_bad_request(self, name: str) -> None:
        """A peer's request with a reserved header name is refused as bad_request
        (a node answers it so), not let through as if clstr had set it."""
        body = msgpack.packb({"v": 1, "t": "x", "h": {"user": "u", name: "n1"}})
        with pytest.raises(BadRequestError, match="reserved prefix"):
            decode_request(body)

    def test_oversized_message_is_refused_before_parsing(self) -> None:
        """A body over max_message_bytes is refused without being unpacked."""
        with pytest.raises(BadRequestError, match="over the limit"):
            decode_request(b"\x00" * 101, limits=Limits(max_message_bytes=100))


class TestReplyWire:
    def test_ok_reply_round_trip(self) -> None:
        """A success reply decodes to its payload."""
        assert decode_reply(encode_reply(b"abc")) == b"abc"

    @pytest.mark.parametrize("size", [0, 1, 255, 256, 65535, 65536, 70000])
    def test_ok_reply_is_plain_msgpack_of_every_bin_size(self, size: int) -> None:
        """encode_reply's shortcut is the msgpack packb makes, and decode_reply's
        shortcut reads it back at every bin width (8, 16 and 32 bit lengths)."""
        data = bytes(range(256)) * (size // 256) + bytes(size % 256)
        body = encode_reply(data)
        assert body == msgpack.packb({"v": 1, "ok": True, "d": data}, use_bin_type=True)
        assert decode_reply(body) == data

    def test_ok_reply_with_trailing_bytes_is_refused(self) -> None:
        """A reply that starts like an ok reply but does not end where its bin does
        is not taken for one: the full decoder refuses it."""
        with pytest.raises(BadRequestError, match="not valid msgpack"):
            decode_reply(encode_reply(b"abc") + b"\x00")
        with pytest.raises(BadRequestError, match="over the limit"):
            decode_reply(encode_reply(b"x" * 200), limits=Limits(max_message_bytes=100))

    @pytest.mark.parametrize(
        "cls",
        [
            EnvelopeExpiredError,
            HandlerTimeoutError,
            NoHandlerError,
            OverloadedError,
            BadRequestError,
            KeyRequiredError,
            NotOwnerError,
        ],
    )
    def test_error_code_maps_to_its_exception(self, cls: type[RequestError]) -> None:
        """Every wire error code comes back as its own exception class."""
        with pytest.raises(cls, match="details"):
            decode_reply(encode_error_reply(cls.code, cls.__name__, "details"))

    def test_handler_error_carries_remote_type_and_message(self) -> None:
        """handler_error keeps the remote exception's type name and message."""
        with pytest.raises(RemoteHandlerError) as info:
            decode_reply(encode_error_reply("handler_error", "KeyError", "'x'"))
        assert (info.value.remote_type, info.value.remote_message) == ("KeyError", "'x'")

    def test_every_request_error_code_maps_back_to_its_class(self) -> None:
        """Each RequestError class of clstr.errors has a code of its own that
        error_for_code (what decode_reply uses) turns back into that very class."""
        classes = [
            value
            for value in vars(errors).values()
            if isinstance(value, type) and issubclass(value, RequestError)
        ]
        assert len(classes) >= 12
        assert len({cls.code for cls in classes}) == len(classes)
        for cls in classes:
            assert type(errors.error_for_code(cls.code, cls.__name__, "m")) is cls

    def test_unknown_code_is_a_plain_request_error(self) -> None:
        """A code from a newer peer becomes RequestError naming the code."""
        with pytest.raises(RequestError, match="'brand_new'"):
            decode_reply(encode_error_reply("brand_new", "X", "y"))


class TestTypedPayloads:
    def test_message_type_attribute_or_class_name(self) -> None:
        """The message type is the message_type attribute, else the class name."""
        assert message_type(Shape) == "geo.shape"
        assert message_type(Shape("s")) == "geo.shape"
        assert message_type(Point(1)) == "Point"

    def test_nested_dataclasses_round_trip(self) -> None:
        """Nested dataclasses, lists, dicts and optionals survive encode/decode."""
        shape = Shape("tri", [Point(1, 2.5), Point(3)], {"c": Point(0)}, parent=Point(9, 9.0))
        assert decode_payload(encode_payload(shape), Shape) == shape

    def test_unknown_fields_ignored_missing_fields_named(self) -> None:
        """Extra fields are ignored; a missing required field is named in the error."""
        data = msgpack.packb({"x": 1, "z": "extra"})
        assert decode_payload(data, Point) == Point(1)
        with pytest.raises(PayloadError, match=r"missing field\(s\) \['x'\]"):
            decode_payload(msgpack.packb({"y": 1.0}), Point)

    def test_wrong_field_type_is_named(self) -> None:
        """A field of the wrong type raises PayloadError with the field's path."""
        with pytest.raises(PayloadError, match=r"Shape\.points\[0\]\.x: expected int"):
            decode_payload(msgpack.packb({"name": "s", "points": [{"x": "1"}]}), Shape)

    def test_int_accepted_for_float_but_bool_is_not_int(self) -> None:
        """An int is a fine float; a bool is not an int."""
        assert decode_payload(msgpack.packb({"x": 1, "y": 2}), Point) == Point(1, 2.0)
        with pytest.raises(PayloadError):
            decode_payload(msgpack.packb({"x": True}), Point)

    def test_plain_values_and_bytes(self) -> None:
        """Plain msgpack values decode as themselves; bytes passes data through."""
        assert decode_payload(encode_payload({"a": [1, 2]}), dict) == {"a": [1, 2]}
        assert decode_payload(b"raw", bytes) == b"raw"
        assert decode_payload(b"", type(None)) is None

    def test_unencodable_value_is_payload_error(self) -> None:
        """An object msgpack cannot hold raises PayloadError, not a bare TypeError."""
        with pytest.raises(PayloadError, match="cannot encode"):
            encode_payload(object())

    def test_garbage_is_payload_error(self) -> None:
        """Bytes that are not msgpack raise PayloadError."""
        with pytest.raises(PayloadError):
            decode_payload(b"\xc1", Point)


class TestLimits:
    def test_long_key_refused(self) -> None:
        """A key over max_key_bytes raises LimitExceededError."""
        with pytest.raises(LimitExceededError, match="key is 1025 bytes"):
            check_limits(Envelope("t", key="k" * 1025), DEFAULT_LIMITS)

    def test_long_request_id_refused(self) -> None:
        """A request id over max_id_bytes is refused (ids fill the nodes' reply caches)."""
        with pytest.raises(LimitExceededError, match="request id is 129 bytes"):
            check_limits(Envelope("t", id="i" * 129), DEFAULT_LIMITS)
        body = msgpack.packb({"v": 1, "t": "x", "id": "i" * 129})
        with pytest.raises(BadRequestError, match="request id"):
            decode_request(body)

    def test_too_many_headers_refused(self) -> None:
        """More headers than max_header_count raises LimitExceededError."""
        headers = {f"h{i}": "v" for i in range(65)}
        with pytest.raises(LimitExceededError, match="65 headers"):
            check_limits(Envelope("t", headers=headers), DEFAULT_LIMITS)

    def test_large_headers_refused(self) -> None:
        """Headers over max_headers_bytes raise LimitExceededError."""
        with pytest.raises(LimitExceededError, match="headers take"):
            check_limits(Envelope("t", headers={"a": "v" * 20_000}), DEFAULT_LIMITS)


class TestLimitShortcuts:
    """decode_request and the client check a message's strings only when they
    could break a limit: these pin the shortcuts to the full check."""

    sizes = st.integers(1, 60)
    limits = st.builds(
        Limits,
        max_key_bytes=sizes,
        max_type_bytes=sizes,
        max_header_count=sizes,
        max_headers_bytes=sizes,
        max_id_bytes=sizes,
    )
    # Characters of 1 to 4 UTF-8 bytes, so that lengths in bytes and in
    # characters part ways.
    text = st.text(
        st.sampled_from("aé€𝄞") | st.characters(blacklist_categories=("Cs",)), max_size=20
    )

    @staticmethod
    def _breaks(env: Envelope, limits: Limits) -> bool:
        try:
            check_limits(env, limits)
        except LimitExceededError:
            return True
        return False

    @given(
        limits=limits,
        msg_type=text.filter(bool),
        key=st.none() | text,
        req_id=st.none() | text,
        headers=st.dictionaries(
            text.filter(lambda name: not name.lower().startswith("x-clstr-")), text, max_size=3
        ),
        data=st.binary(max_size=40),
    )
    @settings(max_examples=500, deadline=None)
    def test_decode_refuses_exactly_what_check_limits_refuses(
        self,
        limits: Limits,
        msg_type: str,
        key: str | None,
        req_id: str | None,
        headers: dict[str, str],
        data: bytes,
    ) -> None:
        """decode_request refuses a request as bad_request exactly when
        check_limits says one of its strings breaks a limit, short or long."""
        env = Envelope(type=msg_type, data=data, key=key, headers=headers, id=req_id)
        body = encode_request(env)
        if self._breaks(env, limits):
            with pytest.raises(BadRequestError):
                decode_request(body, limits=limits)
        else:
            assert decode_request(body, limits=limits).key == key

    @given(
        limits=limits,
        msg_type=text.filter(bool),
        key=text.filter(bool),
        req_id=st.none() | text,
        data=st.binary(max_size=40),
    )
    # Four 4-byte characters: within the limit counted in characters, over it in bytes.
    @example(
        limits=Limits(
            max_key_bytes=10,
            max_type_bytes=10,
            max_header_count=10,
            max_headers_bytes=10,
            max_id_bytes=10,
        ),
        msg_type="𝄞𝄞𝄞𝄞",
        key="a",
        req_id=None,
        data=b"",
    )
    @settings(max_examples=500, deadline=None)
    def test_client_refuses_exactly_what_check_limits_refuses(
        self, limits: Limits, msg_type: str, key: str, req_id: str | None, data: bytes
    ) -> None:
        """A client without options refuses to build a request exactly when
        check_limits says its type, key or id breaks a limit."""
        client = Client(MemoryTransport(), num_shards=8, limits=limits)
        env = Envelope(type=msg_type, data=data, key=key, id=req_id)
        if self._breaks(env, limits):
            with pytest.raises(LimitExceededError):
                client.build_request(0, msg_type, data, key=key, request_id=req_id)
        else:
            built, _ = client.build_request(0, msg_type, data, key=key, request_id=req_id)
            assert built.key == key
