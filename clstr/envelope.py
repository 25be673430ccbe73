"""The envelope: one message to a shard, with its type, payload, key and deadline."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Final

from ._clock import monotonic
from .errors import ConfigurationError, ReservedHeaderError

__all__ = [
    "RESERVED_HEADER_PREFIX",
    "TRACEPARENT_HEADER",
    "TRACESTATE_HEADER",
    "ATTEMPT_HEADER",
    "CLSTR_HEADERS",
    "Envelope",
    "EnvelopeOption",
    "with_header",
    "with_ttl",
]

#: Header names starting with this prefix belong to clstr; users may not set them.
RESERVED_HEADER_PREFIX = "x-clstr-"

# The reserved headers clstr itself sends (docs/protocol.md, Trace context): a
# node accepts exactly these names, in lower case; users still may not set them.
#: W3C Trace Context ``traceparent`` of the sender's span.
TRACEPARENT_HEADER: Final = "x-clstr-traceparent"
#: W3C Trace Context ``tracestate`` that goes with it (sent when not empty).
TRACESTATE_HEADER: Final = "x-clstr-tracestate"
#: Which attempt of a retried request this is, in decimal (sent from the second on).
ATTEMPT_HEADER: Final = "x-clstr-attempt"
#: Every reserved header name a node accepts.
CLSTR_HEADERS: Final = frozenset({TRACEPARENT_HEADER, TRACESTATE_HEADER, ATTEMPT_HEADER})

_NO_HEADERS: Mapping[str, str] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Envelope:
    """One message addressed to a shard.

    ``ttl`` is the time to live in seconds (``None``: no deadline). The
    deadline itself is kept on the local monotonic clock (``deadline``), set
    when the envelope is created or, on a node, when it is received: clocks of
    different hosts never meet. ``created_at`` is the sender's wall clock,
    used by nodes only to drop messages that are stale beyond a clock-skew
    allowance.

    ``stream`` asks for a streamed reply (a window of that many unacknowledged
    chunks at most); 0 asks for one reply.

    ``headers`` map str to str. A name with the reserved ``x-clstr-`` prefix
    raises :class:`ReservedHeaderError` wherever user headers enter: here,
    in :meth:`with_header`, and on a node, which answers such a message
    ``bad_request``.
    """

    type: str
    data: bytes = b""
    shard: int = 0
    key: str | None = None
    headers: Mapping[str, str] = field(default_factory=lambda: _NO_HEADERS)
    ttl: float | None = None
    created_at: float = field(default_factory=time.time)
    id: str | None = None
    deadline: float | None = field(default=None, compare=False)
    #: A streamed reply is asked for, with a credit window of this many chunks
    #: (0: one reply). See docs/protocol.md, Streams.
    stream: int = 0

    def __post_init__(self) -> None:
        if self.headers:
            check_headers(self.headers)
        if self.ttl is not None:
            if not self.ttl > 0:
                raise ConfigurationError(f"ttl must be > 0 seconds or None, got {self.ttl!r}")
            if self.deadline is None:
                object.__setattr__(self, "deadline", monotonic() + self.ttl)

    def with_header(self, name: str, value: str) -> Envelope:
        """Return a copy with header ``name`` set to ``value``.

        Raises :class:`ReservedHeaderError` for names with the ``x-clstr-`` prefix.
        """
        # The copy's __post_init__ checks the name and the value.
        return replace(self, headers={**self.headers, name: value})

    def with_ttl(self, seconds: float) -> Envelope:
        """Return a copy that expires ``seconds`` from now."""
        return replace(self, ttl=seconds, deadline=None)

    def remaining(self) -> float | None:
        """Seconds left before the deadline (may be negative), or ``None`` without one."""
        if self.deadline is None:
            return None
        return self.deadline - monotonic()

    def expired(self) -> bool:
        """Whether the deadline has passed."""
        return self.deadline is not None and monotonic() >= self.deadline

    def header(self, name: str, default: str | None = None) -> str | None:
        """The value of header ``name``, or ``default``."""
        return self.headers.get(name, default)


class _Unfrozen:
    """Builds an Envelope from fields the caller has already checked (codec,
    client): ``_envelope(type, data, shard, key, headers, ttl, created_at, id,
    deadline)`` returns an :class:`Envelope`.

    Skips Envelope's ``__init__`` and ``__post_init__``: ``ttl`` must be None
    or > 0, and ``deadline`` must be set whenever ``ttl`` is. ``frozen=True``
    makes ``__init__`` set each field through ``object.__setattr__`` (about
    1.1 µs an envelope). This class has Envelope's very slots: it takes plain
    stores, then turns the instance into an Envelope by ``__class__``
    assignment, which CPython allows between classes of the same layout
    (0.2 µs in all).
    """

    __slots__ = Envelope.__slots__

    def __init__(
        self,
        type: str,
        data: bytes,
        shard: int,
        key: str | None,
        headers: Mapping[str, str],
        ttl: float | None,
        created_at: float,
        id: str | None,
        deadline: float | None,
        stream: int = 0,
    ) -> None:
        self.type = type
        self.data = data
        self.shard = shard
        self.key = key
        self.headers = headers
        self.ttl = ttl
        self.created_at = created_at
        self.id = id
        self.deadline = deadline
        self.stream = stream
        self.__class__ = Envelope  # type: ignore[assignment]


#: See :class:`_Unfrozen`: calling it returns an :class:`Envelope`.
_envelope: Callable[
    [
        str,
        bytes,
        int,
        str | None,
        Mapping[str, str],
        float | None,
        float,
        str | None,
        float | None,
        int,
    ],
    Envelope,
] = _Unfrozen  # type: ignore[assignment]


def check_header_name(name: str) -> None:
    """Refuse header names that are not str or that use the reserved prefix."""
    if not isinstance(name, str):
        raise TypeError(f"header names must be str, got {type(name).__name__}")
    if name.lower().startswith(RESERVED_HEADER_PREFIX):
        raise ReservedHeaderError(
            f"header {name!r} uses the reserved prefix {RESERVED_HEADER_PREFIX!r}; "
            "choose another name"
        )


def check_headers(headers: Mapping[str, str]) -> None:
    """Refuse a header map with a reserved or non-str name, or a non-str value."""
    for name, value in headers.items():
        check_header_name(name)
        if not isinstance(value, str):
            raise TypeError(f"header {name!r}: value must be str, got {type(value).__name__}")


#: A change applied to an outgoing envelope (client defaults and per-call options).
EnvelopeOption = Callable[[Envelope], Envelope]


def with_header(name: str, value: str) -> EnvelopeOption:
    """An option that sets header ``name``; the name is checked at once."""
    check_header_name(name)

    def apply(env: Envelope) -> Envelope:
        return env.with_header(name, value)

    return apply


def with_ttl(seconds: float) -> EnvelopeOption:
    """An option that gives the envelope a TTL of ``seconds``."""
    if not seconds > 0:
        raise ConfigurationError(f"ttl must be > 0 seconds, got {seconds!r}")

    def apply(env: Envelope) -> Envelope:
        return env.with_ttl(seconds)

    return apply
