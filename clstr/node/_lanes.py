"""The node's queue: one lane per key, holding that key's waiting messages in order."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

__all__ = ["Job", "Lane", "ReplyTo", "Waiting"]

#: Where a message's reply goes: a NATS reply subject, a batch's collector of
#: its items' replies (node/_batch.py), or nowhere (a notification).
ReplyTo = str | Callable[[bytes], None] | None

# A message, where to reply, when it arrived (monotonic; 0.0 unless timed), and
# its Waiting while it waits behind others with a deadline (else None). A
# list, not an object: it is made for every message.
Job = list[Any]


class Lane:
    __slots__ = ("items", "key", "shard")

    def __init__(self, shard: int, key: str | None) -> None:
        self.shard = shard
        self.key = key
        self.items: deque[Job] = deque()


class Waiting:
    """A queued message whose deadline may pass before a worker reaches it: it is
    answered ``expired`` at the deadline and left in its lane, answered, for the
    worker to skip."""

    __slots__ = ("answered", "job", "shard", "slot")

    def __init__(self, job: Job, shard: int) -> None:
        self.job = job
        self.shard = shard
        self.slot = 0
        self.answered = False
