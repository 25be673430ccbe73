"""Reading a bus back: the log a durable adapter keeps, and a shard's stream of events.

An :class:`EventLog` is what polls and consumers read: per bus shard, frames
in order, each at a sequence number that only grows (JetStream's stream
sequence; the memory log's counter). :class:`ShardStream` turns one shard's
frames into events from a :class:`~clstr.eventbus.Position` onwards, and
knows the position after each event, so that a cursor or a checkpoint can
say exactly where to resume.
"""

from __future__ import annotations

import abc
from collections import deque
from typing import Any, Final, NamedTuple

import structlog

from ._event import Position, StoredEvent, decode_frame

__all__ = ["EventLog", "FrameBatch", "ShardStream", "StoredFrame", "DEFAULT_READ_BYTES"]

_log = structlog.get_logger("clstr.eventbus")

#: How many bytes of frames one read asks for at most.
DEFAULT_READ_BYTES: Final = 8 * 1024 * 1024


class StoredFrame(NamedTuple):
    """A frame as the log keeps it: its sequence number and its bytes."""

    seq: int
    data: bytes


class FrameBatch(NamedTuple):
    """The frames one read returned, and whether the shard has more after them."""

    frames: list[StoredFrame]
    more: bool


class EventLog(abc.ABC):
    """The read side of a durable adapter (see the module docstring)."""

    @abc.abstractmethod
    async def shards(self) -> list[int]:
        """The bus shards that hold events, sorted."""

    @abc.abstractmethod
    async def read(
        self, shard: int, start: int, *, max_frames: int, max_bytes: int = DEFAULT_READ_BYTES
    ) -> FrameBatch:
        """Up to ``max_frames`` frames of ``shard`` (and about ``max_bytes``), the first
        at sequence ``start`` or after. Raises
        :class:`~clstr.eventbus.ConsumerAdapterError` when the store fails."""


class _Chunk:
    """The records of one frame not handed out yet."""

    __slots__ = ("index", "records", "seq")

    def __init__(self, seq: int, records: list[Any], index: int) -> None:
        self.seq = seq
        self.records = records
        self.index = index


class ShardStream:
    """One shard's events from a position onwards, read frame by frame.

    :meth:`fill` reads more frames (decoded, but events are built only when
    handed out); :meth:`pop` and :meth:`take` hand out the next events;
    :attr:`position` is where the next one is; :attr:`at_end` says the last
    read reached the end of what the shard holds.
    """

    __slots__ = ("_chunks", "_log", "_next_frame", "_origin", "_size", "_tail", "at_end", "shard")

    def __init__(self, log: EventLog, shard: int, position: Position) -> None:
        self._log = log
        self.shard = shard
        self._origin = position  # events before its offset in its frame are skipped
        self._tail = position  # the position once every buffered event is handed out
        self._next_frame = position.frame
        self._chunks: deque[_Chunk] = deque()
        self._size = 0
        self.at_end = False

    def __len__(self) -> int:
        return self._size

    @property
    def position(self) -> Position:
        """The position of the next event to hand out."""
        if self._chunks:
            head = self._chunks[0]
            return Position(head.seq, head.index)
        return self._tail

    @property
    def done(self) -> bool:
        """Whether nothing is buffered and the shard had nothing more."""
        return not self._size and self.at_end

    async def fill(self, max_frames: int) -> int:
        """Read up to ``max_frames`` more frames; return the events they added."""
        batch = await self._log.read(self.shard, self._next_frame, max_frames=max_frames)
        added = 0
        origin = self._origin
        for seq, data in batch.frames:
            try:
                _, records = decode_frame(data)
            except ValueError as exc:
                _log.warning(
                    "skipping a frame that is not an event frame",
                    shard=self.shard,
                    seq=seq,
                    error=str(exc),
                )
                records = []
            skip = origin.offset if seq == origin.frame else 0
            if skip < len(records):
                self._chunks.append(_Chunk(seq, records, skip))
                added += len(records) - skip
            self._next_frame = seq + 1
            self._tail = Position(seq + 1, 0)
        self._size += added
        self.at_end = not batch.more
        return added

    def peek_timestamp(self) -> int:
        """The ingestion time of the next event (the buffer must not be empty)."""
        head = self._chunks[0]
        ts: int = head.records[head.index][0]
        return ts

    def pop(self) -> StoredEvent:
        """Hand out the next event and move past it."""
        head = self._chunks[0]
        i = head.index
        records = head.records
        event = _new_event(StoredEvent, (self.shard, head.seq, i, *records[i]))
        head.index = i + 1
        if i + 1 == len(records):
            self._chunks.popleft()
        self._size -= 1
        return event

    def take(self, limit: int) -> list[StoredEvent]:
        """Hand out up to ``limit`` buffered events and move past them."""
        out: list[StoredEvent] = []
        chunks = self._chunks
        shard = self.shard
        while chunks and len(out) < limit:
            head = chunks[0]
            seq, records, start = head.seq, head.records, head.index
            end = min(len(records), start + limit - len(out))
            out += [
                _new_event(StoredEvent, (shard, seq, i, *records[i])) for i in range(start, end)
            ]
            head.index = end
            if end == len(records):
                chunks.popleft()
        self._size -= len(out)
        return out


# Builds a NamedTuple from a ready tuple, without its keyword-parsing __new__.
_new_event = tuple.__new__
