"""Wire format v1: envelopes and replies as msgpack maps, and typed payloads.

The byte layout is documented in docs/protocol.md. Nothing here ever
unpickles or evaluates: a peer's bytes become plain msgpack values and, for
typed payloads, dataclass instances built field by field.
"""

from __future__ import annotations

import dataclasses
import threading
import time
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Final, NoReturn, TypeVar

import msgpack

from ._clock import monotonic
from .envelope import _NO_HEADERS, CLSTR_HEADERS, RESERVED_HEADER_PREFIX, Envelope, _envelope
from .errors import (
    BadRequestError,
    LimitExceededError,
    PayloadError,
    RequestError,
    error_for_code,
)

__all__ = [
    "WIRE_VERSION",
    "Limits",
    "DEFAULT_LIMITS",
    "encode_request",
    "decode_request",
    "encode_reply",
    "encode_error_reply",
    "decode_reply",
    "message_type",
    "encode_payload",
    "decode_payload",
]

WIRE_VERSION: Final = 1

_RESERVED_LEN: Final = len(RESERVED_HEADER_PREFIX)

T = TypeVar("T")


@dataclass(frozen=True, slots=True, kw_only=True)
class Limits:
    """Size limits checked before sending and again when decoding.

    The payload limit itself comes from the transport (NATS's ``max_payload``,
    1 MiB by default); ``max_message_bytes`` is a ceiling the decoder applies
    to any message whatever the server allows.
    """

    max_key_bytes: int = 1024
    max_type_bytes: int = 256
    max_header_count: int = 64
    max_headers_bytes: int = 16 * 1024
    max_id_bytes: int = 128
    max_message_bytes: int = 64 * 1024 * 1024
    #: Strings (type, key, id, headers) of at most this many bytes in all break
    #: no limit: the smallest of the limits above but the message's (derived).
    _strings_fit: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        fits = min(
            self.max_key_bytes,
            self.max_type_bytes,
            self.max_header_count,
            self.max_headers_bytes,
            self.max_id_bytes,
        )
        object.__setattr__(self, "_strings_fit", fits)


DEFAULT_LIMITS: Final = Limits()


def check_limits(env: Envelope, limits: Limits) -> None:
    """Raise :class:`LimitExceededError` when ``env`` breaks one of ``limits``."""
    # UTF-8 takes at most 4 bytes a character: short strings need no encoding.
    if len(env.type) * 4 > limits.max_type_bytes and len(env.type.encode()) > limits.max_type_bytes:
        raise LimitExceededError(
            f"message type is {len(env.type.encode())} bytes, over the limit of "
            f"{limits.max_type_bytes}; use a shorter type name"
        )
    if (
        env.id is not None
        and len(env.id) * 4 > limits.max_id_bytes
        and len(env.id.encode()) > limits.max_id_bytes
    ):
        # Ids are kept in every node's reply cache: unbounded ones would let a
        # peer fill its memory.
        raise LimitExceededError(
            f"request id is {len(env.id.encode())} bytes, over the limit of "
            f"{limits.max_id_bytes}; use a short unique id (a UUID is 32 hex digits)"
        )
    if (
        env.key is not None
        and len(env.key) * 4 > limits.max_key_bytes
        and len(env.key.encode()) > limits.max_key_bytes
    ):
        raise LimitExceededError(
            f"key is {len(env.key.encode())} bytes, over the limit of {limits.max_key_bytes}; "
            "hash long keys yourself and send the digest"
        )
    if env.headers:
        if len(env.headers) > limits.max_header_count:
            raise LimitExceededError(
                f"{len(env.headers)} headers, over the limit of {limits.max_header_count}"
            )
        size = sum(len(k.encode()) + len(v.encode()) for k, v in env.headers.items())
        if size > limits.max_headers_bytes:
            raise LimitExceededError(
                f"headers take {size} bytes, over the limit of {limits.max_headers_bytes}"
            )


def encode_request(
    env: Envelope, *, ttl: float | None = None, created_at: float | None = None
) -> bytes:
    """Encode ``env`` as a v1 request body.

    The TTL on the wire is the time *left* now, so the sender's deadline and
    the receiver's are one and the same (less the time in flight). ``ttl``
    (seconds) overrides it without building a copy of the envelope, and so
    does ``created_at`` (epoch seconds) for the ``ts`` field.
    """
    data = env.data
    body: dict[str, Any] = {"v": WIRE_VERSION, "t": env.type, "d": data}
    key = env.key
    if key is not None:
        body["k"] = key
    if env.headers:
        body["h"] = dict(env.headers)
    if ttl is None and env.deadline is not None:
        ttl = env.deadline - monotonic()  # (env.remaining())
    if ttl is not None:
        # At least 1 ms: 0 means "no TTL" on the wire.
        ttl_ms = int(ttl * 1000)
        body["ttl"] = ttl_ms if ttl_ms > 1 else 1
    body["ts"] = int((env.created_at if created_at is None else created_at) * 1000)
    if env.id is not None:
        body["id"] = env.id
    if env.stream:
        body["s"] = env.stream
    return _pack(body, len(data))


_local = threading.local()
_unpackb: Final = msgpack.unpackb
# A Packer keeps the largest buffer it ever needed: bigger messages get one of
# their own, so that one huge message does not pin its size for good.
_REUSE_MAX: Final = 64 * 1024


def _pack(body: object, size: int) -> bytes:
    """msgpack of ``body`` (``size``: a rough size of its variable part).

    Small ones use this thread's reusable Packer: ``packb`` builds one per
    call, more than half its cost. Per thread, as a Packer is not safe to share.
    """
    if size > _REUSE_MAX:
        return msgpack.packb(body, use_bin_type=True)  # type: ignore[no-any-return]
    try:
        packer: msgpack.Packer = _local.packer
    except AttributeError:
        packer = _local.packer = msgpack.Packer(use_bin_type=True)
    return packer.pack(body)  # type: ignore[no-any-return]


def _unpack_map(data: bytes, limits: Limits, what: str) -> dict[Any, Any]:
    if len(data) > limits.max_message_bytes:
        raise BadRequestError(
            f"{what} is {len(data)} bytes, over the limit of {limits.max_message_bytes}"
        )
    try:
        # (msgpack's defaults are raw=False and strict_map_key=True: passing
        # them costs a keyword parse per message.)
        body = _unpackb(data)
    except Exception as exc:
        raise BadRequestError(f"{what} is not valid msgpack: {exc}") from exc
    if body.__class__ is not dict:
        raise BadRequestError(f"{what} must be a msgpack map, got {type(body).__name__}")
    version = body.get("v")
    if version.__class__ is not int or version != WIRE_VERSION:
        raise BadRequestError(f"{what}: unsupported wire version {version!r}, expected 1")
    return body


def _field(body: Mapping[Any, Any], name: str, type_: type) -> Any:
    value = body.get(name)
    if value is not None and (not isinstance(value, type_) or isinstance(value, bool)):
        raise BadRequestError(
            f"field {name!r} must be {type_.__name__}, got {type(value).__name__}"
        )
    return value


def decode_request(
    data: bytes,
    *,
    shard: int = 0,
    limits: Limits = DEFAULT_LIMITS,
    received: float | None = None,
) -> Envelope:
    """Decode a v1 request body into an :class:`Envelope`.

    The deadline is based on ``received`` (local monotonic time, default now)
    plus the TTL on the wire, never on the sender's clock. Raises
    :class:`BadRequestError` saying what is wrong with the bytes, a header
    name with the reserved ``x-clstr-`` prefix included (but for clstr's own,
    :data:`~clstr.envelope.CLSTR_HEADERS`).
    """
    body = _unpack_map(data, limits, "request")
    get = body.get
    msg_type = get("t")
    payload = get("d")
    key = get("k")
    headers = get("h")
    ttl_ms = get("ttl")
    ts_ms = get("ts")
    req_id = get("id")
    window = get("s")
    # msgpack makes exact types (and bool is no int here): one test for the
    # common case; _explain says what is wrong otherwise.
    if (
        msg_type.__class__ is not str
        or not msg_type
        or (payload is not None and payload.__class__ is not bytes)
        or (key is not None and key.__class__ is not str)
        or (headers is not None and not _str_map(headers))
        or (ttl_ms is not None and (ttl_ms.__class__ is not int or ttl_ms < 0))
        or (ts_ms is not None and ts_ms.__class__ is not int)
        or (req_id is not None and req_id.__class__ is not str)
        or (window is not None and (window.__class__ is not int or window < 0))
    ):
        _explain(body)
    ttl = ttl_ms / 1000 if ttl_ms else None
    deadline = None
    if ttl is not None:
        deadline = (monotonic() if received is None else received) + ttl
    payload = payload or b""
    env = _envelope(
        msg_type,
        payload,
        shard,
        key,
        headers or _NO_HEADERS,
        ttl,
        ts_ms / 1000 if ts_ms is not None else time.time(),
        req_id,
        deadline,
        window or 0,
    )
    # Every string is in the message, apart from the payload: when that part
    # is short, no string can break a limit and none needs a look.
    if len(data) - len(payload) > limits._strings_fit:
        try:
            check_limits(env, limits)
        except LimitExceededError as exc:
            raise BadRequestError(str(exc)) from exc
    if headers:
        # Only clstr's own reserved names may pass (trace context: a peer must
        # not pass for clstr otherwise); after the limits, which count them too,
        # so the names to look at are few.
        for name in headers:
            if name[:_RESERVED_LEN].lower() == RESERVED_HEADER_PREFIX and name not in CLSTR_HEADERS:
                raise BadRequestError(
                    f"header {name!r} uses the reserved prefix {RESERVED_HEADER_PREFIX!r}, "
                    "which user headers may not; rename it (clstr's own are exactly "
                    f"{', '.join(sorted(CLSTR_HEADERS))}, in lower case)"
                )
    return env


def _str_map(value: object) -> bool:
    return type(value) is dict and all(type(k) is str and type(v) is str for k, v in value.items())


def _explain(body: Mapping[Any, Any]) -> NoReturn:
    """Raise the BadRequestError that says what is wrong with a request's fields."""
    if not _field(body, "t", str):
        raise BadRequestError("request has no message type (field 't')")
    _field(body, "d", bytes)
    _field(body, "k", str)
    if _field(body, "h", dict) is not None and not _str_map(body["h"]):
        raise BadRequestError("field 'h' must map str to str")
    ttl_ms = _field(body, "ttl", int)
    _field(body, "ts", int)
    _field(body, "id", str)
    window = _field(body, "s", int)
    if window is not None and window < 0:
        raise BadRequestError(f"field 's' (stream window) must be >= 0, got {window}")
    raise BadRequestError(f"field 'ttl' must be >= 0, got {ttl_ms}")


# msgpack of {"v": 1, "ok": true, "d": <bin>} up to the bin's header: a reply is
# this, the bin header and the data (what packb makes, at half the cost).
_OK_REPLY_HEAD: Final = b"\x83\xa1v\x01\xa2ok\xc3\xa1d"
_OK_HEAD_SIZE: Final = len(_OK_REPLY_HEAD)
# bin 8, bin 16, bin 32: the marker and how many bytes give the length.
_BIN_WIDTHS: Final = {b"\xc4": 1, b"\xc5": 2, b"\xc6": 4}


def encode_reply(data: bytes) -> bytes:
    """Encode a successful reply carrying ``data``."""
    size = len(data)
    if size < 0x100:
        head = b"\xc4" + size.to_bytes(1, "big")
    elif size < 0x10000:
        head = b"\xc5" + size.to_bytes(2, "big")
    else:
        head = b"\xc6" + size.to_bytes(4, "big")
    return _OK_REPLY_HEAD + head + bytes(data)


def encode_error_reply(code: str, type_name: str, message: str) -> bytes:
    """Encode an error reply with a wire ``code`` (see :mod:`clstr.errors`)."""
    return _pack(
        {"v": WIRE_VERSION, "ok": False, "e": {"code": code, "type": type_name, "msg": message}},
        len(message),
    )


def error_reply_for(exc: RequestError) -> bytes:
    """Encode the error reply that stands for ``exc``."""
    return encode_error_reply(exc.code, type(exc).__name__, str(exc))


def decode_reply(data: bytes, *, limits: Limits = DEFAULT_LIMITS) -> bytes:
    """Decode a reply: return its payload, or raise the error it carries.

    Raises the :class:`RequestError` subclass for the reply's code, or
    :class:`BadRequestError` when the reply itself is malformed.
    """
    if data[:_OK_HEAD_SIZE] == _OK_REPLY_HEAD and len(data) <= limits.max_message_bytes:
        # What encode_reply makes (every clstr node): the bin's bounds, without
        # a general msgpack decode.
        marker = data[_OK_HEAD_SIZE : _OK_HEAD_SIZE + 1]
        width = _BIN_WIDTHS.get(marker)
        if width is not None:
            start = _OK_HEAD_SIZE + 1 + width
            size = int.from_bytes(data[_OK_HEAD_SIZE + 1 : start], "big")
            if start + size == len(data):
                return bytes(data[start:])
    body = _unpack_map(data, limits, "reply")
    if body.get("ok") is True:
        payload = body.get("d", b"")
        if not isinstance(payload, bytes):
            raise BadRequestError("reply field 'd' must be bin")
        return payload
    err = body.get("e")
    if not isinstance(err, dict):
        raise BadRequestError("error reply has no error map (field 'e')")
    code, type_name, msg = (str(err.get(k, "")) for k in ("code", "type", "msg"))
    raise error_for_code(code, type_name, msg)


# -- typed payloads ---------------------------------------------------------


def message_type(obj: object) -> str:
    """The message type of a payload class or instance.

    The ``message_type`` class attribute when there is one, else the class name.
    """
    cls = obj if isinstance(obj, type) else type(obj)
    declared = getattr(cls, "message_type", None)
    if isinstance(declared, str) and declared:
        return declared
    return cls.__name__


def _to_msgpack(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple | set | frozenset):
        return list(obj)
    raise TypeError(
        f"cannot encode {type(obj).__name__} as msgpack; use a dataclass or plain values"
    )


def encode_payload(obj: object) -> bytes:
    """Encode a typed payload: a dataclass (as a map of its fields, nested ones
    too) or plain msgpack values. Raises :class:`PayloadError`."""
    try:
        return msgpack.packb(obj, default=_to_msgpack, use_bin_type=True)  # type: ignore[no-any-return]
    except (TypeError, ValueError, OverflowError) as exc:
        raise PayloadError(f"cannot encode {type(obj).__name__} payload: {exc}") from exc


def decode_payload(data: bytes, cls: type[T]) -> T:
    """Decode a typed payload into ``cls``.

    ``cls`` may be a dataclass (built field by field, nested dataclasses,
    ``list[...]``, ``dict[str, ...]`` and optional fields included; unknown
    fields are ignored so that senders may add fields) or a plain type such
    as ``dict``, ``str``, ``int``. ``bytes`` returns the data as is; empty data
    is ``None`` (what a handler returning ``None`` sends). Raises
    :class:`PayloadError` naming the field that does not fit.
    """
    if cls is bytes:
        return data  # type: ignore[return-value]
    try:
        # An empty payload is what a handler returning None sends.
        value = msgpack.unpackb(data, raw=False, strict_map_key=False) if data else None
    except Exception as exc:
        raise PayloadError(f"payload for {cls.__name__} is not valid msgpack: {exc}") from exc
    result: T = _converter(cls)(value, cls.__name__)  # type: ignore[arg-type]
    return result


Converter = Callable[[Any, str], Any]


@lru_cache(maxsize=512)
def _converter(tp: Any) -> Converter:
    """Build (once per type) a function that checks and converts a decoded value."""
    if tp is Any or tp is object:
        return lambda v, path: v
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = [_converter(a) for a in typing.get_args(tp)]
        none_ok = type(None) in typing.get_args(tp)

        def union(v: Any, path: str) -> Any:
            if v is None and none_ok:
                return None
            errors = []
            for conv in options:
                try:
                    return conv(v, path)
                except PayloadError as exc:
                    errors.append(str(exc))
            raise PayloadError("; ".join(errors))

        return union
    if origin in (list, tuple, set, frozenset) or tp in (list, tuple, set, frozenset):
        args = typing.get_args(tp)
        item = _converter(args[0]) if args else _converter(Any)
        container = origin or tp

        def sequence(v: Any, path: str) -> Any:
            if not isinstance(v, list):
                raise PayloadError(f"{path}: expected a list, got {type(v).__name__}")
            return container(item(x, f"{path}[{i}]") for i, x in enumerate(v))

        return sequence
    if origin is dict or tp is dict:
        args = typing.get_args(tp)
        kconv, vconv = (_converter(args[0]), _converter(args[1])) if args else (None, None)

        def mapping(v: Any, path: str) -> Any:
            if not isinstance(v, dict):
                raise PayloadError(f"{path}: expected a map, got {type(v).__name__}")
            if kconv is None or vconv is None:
                return v
            return {kconv(k, path): vconv(x, f"{path}[{k!r}]") for k, x in v.items()}

        return mapping
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        hints = typing.get_type_hints(tp)
        fields = [
            (f.name, _converter(hints.get(f.name, Any)), f.init) for f in dataclasses.fields(tp)
        ]
        required = {
            f.name
            for f in dataclasses.fields(tp)
            if f.init
            and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
        }
        cls = tp

        def record(v: Any, path: str) -> Any:
            if not isinstance(v, dict):
                raise PayloadError(
                    f"{path}: expected a map for {cls.__name__}, got {type(v).__name__}"
                )
            missing = required - v.keys()
            if missing:
                raise PayloadError(f"{path}: missing field(s) {sorted(missing)}")
            kwargs = {
                name: conv(v[name], f"{path}.{name}")
                for name, conv, init in fields
                if init and name in v
            }
            try:
                return cls(**kwargs)
            except Exception as exc:  # __post_init__ checks may raise anything
                raise PayloadError(f"{path}: {exc}") from exc

        return record
    if tp is float:

        def number(v: Any, path: str) -> Any:
            if isinstance(v, bool) or not isinstance(v, int | float):
                raise PayloadError(f"{path}: expected float, got {type(v).__name__}")
            return float(v)

        return number
    if isinstance(tp, type):

        def plain(v: Any, path: str) -> Any:
            if not isinstance(v, tp) or (tp is int and isinstance(v, bool)):
                raise PayloadError(f"{path}: expected {tp.__name__}, got {type(v).__name__}")
            return v

        return plain
    # Literal, NewType, TypeVar and other typing forms: accept the decoded value.
    return lambda v, path: v
