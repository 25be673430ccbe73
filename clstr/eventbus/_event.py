"""Events, and the frame format adapters store them in.

An event is a key (it picks the shard), a payload (bytes the bus never
looks into), a type and optional headers. The bus stamps the ingestion time
(ns since the epoch) and keeps, per shard, the events in acceptance order.

Frame format v1 (what the NATS and JetStream adapters publish, one message
per frame, and what any reader in any language decodes)::

    frame  = msgpack array [1, msg_id, records]
    record = msgpack array [ts_ns, key, payload, type, headers]

``msg_id`` is ``<producer>.<epoch>.<shard>.<first>``: the producer's id and
epoch (see :mod:`clstr.eventbus._nonce`), the bus shard, and the shard
sequence of the frame's first event (events are numbered per shard from 0 in
the order the producer accepted them). ``key`` is a str, bin or nil (nil for
:meth:`~clstr.eventbus.EventBus.ingest_raw`), ``type`` a str, ``payload``
bin, ``headers`` a map of str to str or nil. A frame holds the events of one
shard, in order; a batch larger than the adapter's ``max_payload`` is split
into several frames, each with its own ``first``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final, NamedTuple, TypeAlias

import msgpack

from ._errors import AdapterSerializationError

__all__ = [
    "Event",
    "Frame",
    "Position",
    "Record",
    "StoredEvent",
    "FRAME_VERSION",
    "decode_frame",
    "encode_frames",
    "frame_id",
    "to_records",
]

FRAME_VERSION: Final = 1

#: One event in the frame's record layout: ``(ts_ns, key, payload, type, headers)``.
Record: TypeAlias = tuple[int, str | bytes | None, bytes, str, Mapping[str, str] | None]


class Event(NamedTuple):
    """One event to ingest.

    ``key`` chooses the shard (a key's events stay in order); ``payload`` is
    stored as is; ``type`` and ``headers`` are for consumers and filters.
    """

    key: str | bytes
    payload: bytes
    type: str = ""
    headers: Mapping[str, str] | None = None


class Position(NamedTuple):
    """Where an event sits in its shard's log: the frame (the log's sequence number
    of the message holding it) and its offset in that frame. Positions of one
    shard compare in the shard's order."""

    frame: int
    offset: int


class StoredEvent(NamedTuple):
    """An event read back from the bus's log (by a poll or a consumer): its shard,
    where it sits there (``frame``, ``offset``: see :attr:`position`), its
    ingestion time and its fields."""

    shard: int
    frame: int
    offset: int
    timestamp_ns: int
    key: str | bytes | None
    payload: bytes
    type: str
    headers: Mapping[str, str] | None

    @property
    def position(self) -> Position:
        """Where the event sits in its shard (positions of a shard compare in order)."""
        return Position(self.frame, self.offset)


class Frame(NamedTuple):
    """One encoded frame: its message id (the dedupe id), its bytes, its event count."""

    msg_id: str
    data: bytes
    events: int


def to_records(items: Sequence[Event | bytes], stamps: Sequence[int]) -> list[Record]:
    """The records of queued items (events, or the bytes of ``ingest_raw``) and their
    ingestion times. Built by the shard's worker, off the ingestion path."""
    return [
        (ts, None, item, "", None) if type(item) is bytes else (ts, *item)
        for item, ts in zip(items, stamps, strict=True)
    ]


def frame_id(producer: str, shard: int, first: int) -> str:
    """The message id of the frame of ``shard`` whose first event is ``first``."""
    return f"{producer}.{shard}.{first}"


def encode_frames(
    producer: str, shard: int, first: int, records: Sequence[Record], max_bytes: int
) -> list[Frame]:
    """Encode a batch (events ``first..first+len(records)-1`` of ``shard``) into frames
    of at most ``max_bytes`` each.

    Deterministic: the same batch always gives the same frames and ids, so a
    retried batch is recognised by a broker's dedupe. Raises
    :class:`AdapterSerializationError` when one event alone is over ``max_bytes``.
    """
    frames: list[Frame] = []
    _pack(producer, shard, first, records, 0, len(records), max_bytes, frames)
    return frames


def _pack(
    producer: str,
    shard: int,
    first: int,
    records: Sequence[Record],
    lo: int,
    hi: int,
    max_bytes: int,
    out: list[Frame],
) -> None:
    # The common batch fits in one frame: pack it whole, and split (evenly, by
    # the measured size) only when it does not.
    msg_id = frame_id(producer, shard, first + lo)
    chunk = records if lo == 0 and hi == len(records) else records[lo:hi]
    try:
        data = msgpack.packb([FRAME_VERSION, msg_id, chunk], use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise AdapterSerializationError(f"cannot encode events of shard {shard}: {exc}") from exc
    if len(data) <= max_bytes:
        out.append(Frame(msg_id, data, hi - lo))
        return
    if hi - lo == 1:
        raise AdapterSerializationError(
            f"event {first + lo} of shard {shard} takes {len(data)} bytes, over the "
            f"adapter's frame limit of {max_bytes} bytes"
        )
    parts = min(hi - lo, len(data) // max_bytes + 1)
    step = -(-(hi - lo) // parts)
    for start in range(lo, hi, step):
        _pack(producer, shard, first, records, start, min(start + step, hi), max_bytes, out)


def decode_frame(data: bytes) -> tuple[str, list[list[Any]]]:
    """The message id and the records of a frame.

    Raises :class:`ValueError` for bytes that are not a frame of a known version.
    """
    try:
        frame = msgpack.unpackb(data, raw=False, use_list=True, strict_map_key=True)
    except Exception as exc:
        raise ValueError(f"not an event frame: {exc}") from exc
    if (
        not isinstance(frame, list)
        or len(frame) < 3
        or frame[0] != FRAME_VERSION
        or not isinstance(frame[2], list)
    ):
        raise ValueError("not an event frame of version 1")
    return str(frame[1]), frame[2]
