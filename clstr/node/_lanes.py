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


class Lane(deque[Job]):
    """The queued messages of one key (or the one message of a lane without a
    key), oldest first, and whose they are: ``shard`` and ``key``, which the
    maker sets right after ``Lane()``. A deque itself, built without a Python
    ``__init__``: one is made for most messages."""

    __slots__ = ("key", "shard")
    shard: int
    key: str | None


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
