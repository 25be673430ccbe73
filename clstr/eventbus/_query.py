"""What a poll asks for and what it gets: requests, filters, cursors, responses.

A cursor is opaque to callers: ``base64url(msgpack([1, bus, [[shard, frame,
index], ...]]))`` without padding, one entry per shard read so far (the
position of the shard's next event). Resuming from a cursor reads every
shard from exactly where the previous response left it, so polling with
each response's cursor in turn gives every event once, with no gap.
"""

from __future__ import annotations

import base64
import binascii
import enum
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field, replace
from typing import Final

import msgpack

from ..errors import ConfigurationError
from ._errors import InvalidCursorError, InvalidFilterError
from ._event import Position, StoredEvent

__all__ = [
    "Ordering",
    "EventFilter",
    "PollRequest",
    "PollResponse",
    "decode_cursor",
    "encode_cursor",
    "MAX_POLL_LIMIT",
    "START",
]

_CURSOR_VERSION: Final = 1
#: The largest ``limit`` of one poll.
MAX_POLL_LIMIT: Final = 100_000
#: The position of a shard's first event (log sequences start at 1).
START: Final = Position(1, 0)
# A cursor names at most this many shards (a bus has at most MAX_SHARDS).
_MAX_CURSOR_BYTES: Final = 64 * 1024


class Ordering(enum.Enum):
    """How a poll merges shards.

    ``SEQUENCE`` (the default): each shard's events in shard order, shards
    interleaved one event at a time. ``TIMESTAMP``: all shards merged by
    ingestion time (ties by shard, then position), as far as the poll has
    read them: an event stored later with an earlier timestamp comes in a
    later poll, never lost.
    """

    SEQUENCE = "sequence"
    TIMESTAMP = "timestamp"


def _frozen(name: str, values: Collection[str | bytes] | None, kinds: tuple[type, ...]) -> None:
    if values is None:
        return
    if isinstance(values, str | bytes):
        raise InvalidFilterError(f"filter {name} must be a collection, not a single {values!r}")
    if not values:
        raise InvalidFilterError(f"filter {name} is empty: it would match nothing (omit it)")
    bad = [v for v in values if not isinstance(v, kinds)]
    if bad:
        raise InvalidFilterError(f"filter {name} holds {bad[0]!r}, not a {kinds[0].__name__}")


@dataclass(frozen=True, slots=True)
class EventFilter:
    """Which events a poll or a consumer keeps: every given condition must hold.

    ``types``: the event's type is one of these. ``keys``: its key is one of
    these. ``key_prefix``: its key (a str) starts with this. Skipped events
    still move the cursor. :meth:`parse` reads the text form
    ``"type=a,b key=k1,k2 key^=prefix"``.

    Raises :class:`InvalidFilterError` for an empty set or a value of the wrong type.
    """

    types: frozenset[str] | None = None
    keys: frozenset[str | bytes] | None = None
    key_prefix: str | None = None

    def __post_init__(self) -> None:
        _frozen("types", self.types, (str,))
        _frozen("keys", self.keys, (str, bytes))
        if self.types is not None:
            object.__setattr__(self, "types", frozenset(self.types))
        if self.keys is not None:
            object.__setattr__(self, "keys", frozenset(self.keys))
        if self.key_prefix is not None and not (
            isinstance(self.key_prefix, str) and self.key_prefix
        ):
            raise InvalidFilterError(
                f"filter key_prefix must be a non-empty str, got {self.key_prefix!r}"
            )

    @classmethod
    def parse(cls, text: str) -> EventFilter:
        """The filter written as ``"type=a,b key=k1 key^=prefix"`` (clauses separated
        by spaces, values by commas). Raises :class:`InvalidFilterError`."""
        if not isinstance(text, str):
            raise InvalidFilterError(f"a filter's text form is a str, got {type(text).__name__}")
        types: set[str] | None = None
        keys: set[str | bytes] | None = None
        prefix: str | None = None
        for clause in text.split():
            name, sep, value = clause.partition("=")
            if not sep or not value:
                raise InvalidFilterError(
                    f"filter clause {clause!r} is not name=value (e.g. type=a,b key^=user-)"
                )
            values = [v for v in value.split(",") if v]
            if name == "type":
                types = (types or set()) | set(values)
            elif name == "key":
                keys = (keys or set()) | set(values)
            elif name == "key^":
                if prefix is not None:
                    raise InvalidFilterError("a filter takes one key^= clause")
                prefix = value
            else:
                raise InvalidFilterError(f"unknown filter field {name!r}: use type=, key= or key^=")
        if types is None and keys is None and prefix is None:
            raise InvalidFilterError(f"filter {text!r} has no clause")
        return cls(
            types=None if types is None else frozenset(types),
            keys=None if keys is None else frozenset(keys),
            key_prefix=prefix,
        )

    def matches(self, event: StoredEvent) -> bool:
        """Whether ``event`` passes every condition."""
        if self.types is not None and event.type not in self.types:
            return False
        key = event.key
        if self.keys is not None and key not in self.keys:
            return False
        return self.key_prefix is None or (isinstance(key, str) and key.startswith(self.key_prefix))


@dataclass(frozen=True, slots=True, kw_only=True)
class PollRequest:
    """One poll: up to ``limit`` events after ``cursor`` (``None``: from the start of
    every shard), kept by ``filter`` (an :class:`EventFilter` or its text form),
    merged by ``ordering``, from the bus shards in ``shards`` (``None``: all).

    Raises :class:`~clstr.ConfigurationError` for a limit out of range or a
    negative shard, and :class:`InvalidFilterError` for a filter text that does
    not parse.
    """

    limit: int = 100
    cursor: str | None = None
    filter: EventFilter | str | None = None
    ordering: Ordering = Ordering.SEQUENCE
    shards: Collection[int] | None = None
    _filter: EventFilter | None = field(init=False, repr=False, compare=False, default=None)

    def __post_init__(self) -> None:
        if isinstance(self.limit, bool) or not isinstance(self.limit, int):
            raise ConfigurationError(f"limit must be an int, got {self.limit!r}")
        if not 1 <= self.limit <= MAX_POLL_LIMIT:
            raise ConfigurationError(f"limit must be in 1..{MAX_POLL_LIMIT}, got {self.limit}")
        if not isinstance(self.ordering, Ordering):
            raise ConfigurationError(f"ordering must be an Ordering, got {self.ordering!r}")
        if self.shards is not None:
            shards = tuple(sorted(set(self.shards)))
            if any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in shards):
                raise ConfigurationError(f"shards must be ints >= 0, got {list(self.shards)!r}")
            object.__setattr__(self, "shards", shards)
        parsed = self.filter
        if isinstance(parsed, str):
            parsed = EventFilter.parse(parsed)
        elif parsed is not None and not isinstance(parsed, EventFilter):
            raise InvalidFilterError(
                f"filter must be an EventFilter or its text form, got {type(parsed).__name__}"
            )
        object.__setattr__(self, "_filter", parsed)

    @property
    def event_filter(self) -> EventFilter | None:
        """The filter, parsed."""
        return self._filter

    def from_cursor(self, cursor: str | None) -> PollRequest:
        """The same request, resuming from ``cursor`` (a previous response's)."""
        return replace(self, cursor=cursor)


@dataclass(frozen=True, slots=True)
class PollResponse:
    """What a poll returns: the ``events``, the ``cursor`` to resume from (it holds
    every shard's position), and whether more events were left (``has_more``)."""

    events: list[StoredEvent]
    cursor: str
    has_more: bool


def encode_cursor(bus: str, positions: Mapping[int, Position]) -> str:
    """The opaque cursor of ``positions`` (shard -> next event) on ``bus``."""
    body = [[shard, p.frame, p.offset] for shard, p in sorted(positions.items())]
    packed = msgpack.packb([_CURSOR_VERSION, bus, body], use_bin_type=True)
    return base64.urlsafe_b64encode(packed).rstrip(b"=").decode("ascii")


def decode_cursor(bus: str, cursor: str | None) -> dict[int, Position]:
    """The positions a cursor of ``bus`` holds (``None``: none).

    Raises :class:`InvalidCursorError` for anything but a cursor a poll of
    ``bus`` returned.
    """
    if cursor is None:
        return {}
    if not isinstance(cursor, str):
        raise InvalidCursorError(f"a cursor is a str, got {type(cursor).__name__}")
    if len(cursor) > _MAX_CURSOR_BYTES * 4 // 3 + 4:
        raise InvalidCursorError(f"cursor of {len(cursor)} characters is too long to be one")
    try:
        packed = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        version, owner, body = msgpack.unpackb(packed, raw=False, use_list=True)
    except (binascii.Error, ValueError, TypeError, msgpack.UnpackException) as exc:
        raise InvalidCursorError(
            "not a cursor (it must be passed back exactly as a poll returned it)"
        ) from exc
    if version != _CURSOR_VERSION:
        raise InvalidCursorError(f"cursor version {version!r} is not supported")
    if owner != bus:
        raise InvalidCursorError(f"this cursor belongs to bus {owner!r}, not to {bus!r}")
    positions: dict[int, Position] = {}
    if not isinstance(body, list):
        raise InvalidCursorError("cursor body is not a list of shard positions")
    for entry in body:
        if (
            not isinstance(entry, list)
            or len(entry) != 3
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in entry)
            or entry[0] < 0
            or entry[1] < 1
            or entry[2] < 0
            or entry[0] in positions
        ):
            raise InvalidCursorError(f"cursor holds a malformed shard position {entry!r}")
        positions[entry[0]] = Position(entry[1], entry[2])
    return positions
