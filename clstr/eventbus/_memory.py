"""An in-process log and adapter, with JetStream's semantics: for tests and for
running a whole bus (producer, polls, consumer nodes) on the memory transport."""

from __future__ import annotations

import bisect
from collections import OrderedDict
from collections.abc import Sequence
from typing import Final

from ._adapter import DEFAULT_FRAME_BYTES, Adapter
from ._event import Record, encode_frames
from ._log import DEFAULT_READ_BYTES, EventLog, FrameBatch, StoredFrame

__all__ = ["MemoryAdapter", "MemoryLog"]

# Message ids remembered for dedupe (JetStream keeps them for a time window).
_DEDUPE_IDS: Final = 100_000


class MemoryLog(EventLog):
    """Frames per shard under one growing sequence, deduplicated by message id (as a
    JetStream stream with one subject per shard)."""

    def __init__(self) -> None:
        self._seqs: dict[int, list[int]] = {}
        self._frames: dict[int, list[bytes]] = {}
        self._ids: OrderedDict[str, int] = OrderedDict()
        self.last_seq = 0
        #: Frames refused as duplicates (a retried batch).
        self.duplicates = 0

    def append(self, shard: int, msg_id: str, data: bytes) -> int:
        """Store a frame unless ``msg_id`` was stored already; return its sequence."""
        seen = self._ids.get(msg_id)
        if seen is not None:
            self.duplicates += 1
            return seen
        self.last_seq += 1
        self._seqs.setdefault(shard, []).append(self.last_seq)
        self._frames.setdefault(shard, []).append(data)
        self._ids[msg_id] = self.last_seq
        if len(self._ids) > _DEDUPE_IDS:
            self._ids.popitem(last=False)
        return self.last_seq

    def frame_count(self, shard: int) -> int:
        """How many frames ``shard`` holds."""
        return len(self._seqs.get(shard, ()))

    async def shards(self) -> list[int]:
        return sorted(self._seqs)

    async def read(
        self, shard: int, start: int, *, max_frames: int, max_bytes: int = DEFAULT_READ_BYTES
    ) -> FrameBatch:
        seqs = self._seqs.get(shard, [])
        frames = self._frames.get(shard, [])
        i = bisect.bisect_left(seqs, start)
        out: list[StoredFrame] = []
        size = 0
        while i < len(seqs) and len(out) < max_frames:
            if out and size + len(frames[i]) > max_bytes:
                break
            out.append(StoredFrame(seqs[i], frames[i]))
            size += len(frames[i])
            i += 1
        return FrameBatch(out, i < len(seqs))


class MemoryAdapter(Adapter):
    """Stores frames in a :class:`MemoryLog` (its :attr:`log`, which polls and memory
    consumers read). Pass ``log`` to share one log between buses."""

    kind = "memory"

    def __init__(self, log: MemoryLog | None = None, *, max_frame_bytes: int = 0) -> None:
        super().__init__()
        self.memory = log or MemoryLog()
        self._max_frame = max_frame_bytes or super().max_frame_bytes
        if self._max_frame > DEFAULT_FRAME_BYTES:
            self._max_frame = DEFAULT_FRAME_BYTES

    @property
    def max_frame_bytes(self) -> int:
        return self._max_frame

    async def send(self, shard: int, first: int, records: Sequence[Record]) -> None:
        self._check_open()
        for frame in encode_frames(self.producer, shard, first, records, self._max_frame):
            self.memory.append(shard, frame.msg_id, frame.data)

    @property
    def log(self) -> EventLog:
        return self.memory
