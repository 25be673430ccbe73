"""Where a generator gets its machine id: the one-method protocol, a fixed id,
and an allocator of ids for the generators of one process.

The JetStream lease (:class:`~clstr.ids.MachineIdLease`) is the third source.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from types import TracebackType
from typing import Protocol, Self, runtime_checkable

from ..errors import ConfigurationError, MachineIdUnavailableError
from ._layout import MAX_MACHINE_ID

__all__ = ["LocalMachineId", "LocalMachineIds", "MachineIdSource", "StaticMachineId"]


@runtime_checkable
class MachineIdSource(Protocol):
    """What a :class:`~clstr.ids.Snowflake` asks for its machine id.

    A generator calls :meth:`machine_id` when it moves to a new millisecond
    (never per id), so a source may do a little work, and it learns the last
    millisecond its id was used in: when the id goes to another holder, the
    new holder's ids start after it. Give each source to one generator only:
    two generators on one machine id would issue the same ids.
    """

    def machine_id(self, ms: int) -> int:
        """The machine id (0..1023) to issue ids with in millisecond ``ms`` (Unix
        ms; it never decreases from one call to the next).

        Raises :class:`~clstr.errors.MachineIdUnavailableError` when it holds
        none (a lease that lapsed, was lost or was released), or when ``ms``
        is not after the last millisecond a previous holder of the id used
        (this clock is behind the previous holder's): the generator then
        issues nothing until the source can answer.
        """
        ...


def check_machine_id(machine_id: int) -> int:
    """``machine_id`` if it is in 0..1023, else :class:`~clstr.ConfigurationError`."""
    if isinstance(machine_id, bool) or not isinstance(machine_id, int):
        raise ConfigurationError(f"a machine id is an int, got {machine_id!r}")
    if not 0 <= machine_id <= MAX_MACHINE_ID:
        raise ConfigurationError(f"a machine id is in 0..{MAX_MACHINE_ID}, got {machine_id}")
    return machine_id


class StaticMachineId:
    """A machine id fixed by configuration (a deployment that numbers its hosts).

    Nothing checks that it is unique: that is the deployment's promise.
    Raises :class:`~clstr.ConfigurationError` outside 0..1023.
    """

    __slots__ = ("_id",)

    def __init__(self, machine_id: int) -> None:
        self._id = check_machine_id(machine_id)

    def machine_id(self, ms: int) -> int:
        return self._id

    def __repr__(self) -> str:
        return f"StaticMachineId({self._id})"


class LocalMachineIds:
    """Hands out machine ids to the generators of one process: no two holders
    at a time get the same id (for the nodes of a test cluster on the memory
    transport, say). A released id goes back to the pool with the last
    millisecond it was used in, and its next holder issues only after it.

    ``first`` and ``last`` bound the ids it hands out (to share the range with
    other allocators, give each its own slice); ``wall_ns`` is the clock
    (the generators' wall clock) used to prefer ids whose last use is past.
    """

    def __init__(
        self,
        *,
        first: int = 0,
        last: int = MAX_MACHINE_ID,
        wall_ns: Callable[[], int] = time.time_ns,
    ) -> None:
        check_machine_id(first)
        check_machine_id(last)
        if first > last:
            raise ConfigurationError(f"first ({first}) must not be above last ({last})")
        self.first = first
        self.last = last
        self._wall_ns = wall_ns
        self._held: set[int] = set()
        self._last_ms: dict[int, int] = {}  # of released ids

    @property
    def held(self) -> frozenset[int]:
        """The ids taken and not released yet."""
        return frozenset(self._held)

    def take(self) -> LocalMachineId:
        """The lowest free id whose last use is in the past (else the lowest
        free one), held until :meth:`LocalMachineId.release`.

        Raises :class:`~clstr.errors.MachineIdUnavailableError` when every id
        of the range is held.
        """
        free = [n for n in range(self.first, self.last + 1) if n not in self._held]
        if not free:
            raise MachineIdUnavailableError(
                f"all {self.last - self.first + 1} machine ids {self.first}..{self.last} of "
                "this allocator are held; release one (close its generator's node) or widen "
                "the range"
            )
        now = self._wall_ns() // 1_000_000
        machine_id = next((n for n in free if self._last_ms.get(n, -1) < now), free[0])
        self._held.add(machine_id)
        return LocalMachineId(self, machine_id, self._last_ms.get(machine_id, -1))

    def _release(self, machine_id: int, last_ms: int) -> None:
        self._held.discard(machine_id)
        self._last_ms[machine_id] = max(self._last_ms.get(machine_id, -1), last_ms)


class LocalMachineId:
    """One id taken from a :class:`LocalMachineIds`; a :class:`MachineIdSource`
    until released (``with``/``async with`` release it on exit)."""

    __slots__ = ("_floor", "_id", "_last_ms", "_pool")

    def __init__(self, pool: LocalMachineIds, machine_id: int, floor: int) -> None:
        self._pool: LocalMachineIds | None = pool
        self._id = machine_id
        self._floor = floor  # the previous holder's last ms
        self._last_ms = floor

    @property
    def held(self) -> int | None:
        """The id, or ``None`` once released."""
        return None if self._pool is None else self._id

    def machine_id(self, ms: int) -> int:
        if self._pool is None:
            raise MachineIdUnavailableError(
                f"machine id {self._id} was released; take a new one from the allocator"
            )
        if ms <= self._floor:
            raise MachineIdUnavailableError(
                f"machine id {self._id} was used until ms {self._floor} by its previous "
                f"holder, and the clock reads ms {ms}; retry in {self._floor - ms + 1} ms"
            )
        self._last_ms = max(self._last_ms, ms)
        return self._id

    def release(self) -> None:
        """Give the id back (idempotent): its generator issues nothing more."""
        if self._pool is not None:
            self._pool._release(self._id, self._last_ms)
            self._pool = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"LocalMachineId({self._id}{'' if self._pool else ', released'})"
