"""The interface both counters share: generic code takes either."""

from __future__ import annotations

from types import TracebackType
from typing import Protocol, Self, runtime_checkable

__all__ = ["Counter"]


@runtime_checkable
class Counter(Protocol):
    """A set of integer counters in one namespace, each key's authority its shard's
    owner: :class:`~clstr.counters.StrictCounter` (every operation acknowledged
    once saved) or :class:`~clstr.counters.LaxCounter` (increments added locally,
    flushed in batches). Values are signed 64-bit integers; a key never set
    reads 0.
    """

    namespace: str

    async def inc(self, key: str, n: int = 1) -> int:
        """Add ``n`` to ``key``; return the total (strict: the new total; lax: an
        estimate, the last total the owner reported plus this process's
        unacknowledged deltas)."""
        ...

    async def get(self, key: str) -> int:
        """The value of ``key`` (lax: its owner's, after this process's deltas of
        the key are flushed, plus those added meanwhile)."""
        ...

    async def set(self, key: str, value: int) -> None:
        """Set ``key`` to ``value``."""
        ...

    async def delete(self, key: str) -> int:
        """Delete ``key`` (it reads 0 again); return its value before."""
        ...

    async def clear(self) -> None:
        """Delete every key of the namespace."""
        ...

    async def close(self) -> None:
        """Release the counter (lax: flush first)."""
        ...

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...
