"""The snowflake generator: strictly increasing 64-bit ids, even when the wall
clock steps back (the strategy is in docs/ids.md, "The clock")."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Final

from ..errors import ConfigurationError, IdUnavailableError
from ._layout import (
    EPOCH_MS,
    MACHINE_SHIFT,
    MAX_SEQUENCE,
    MAX_TIMESTAMP,
    TIMESTAMP_SHIFT,
)
from ._machine import MachineIdSource, StaticMachineId, check_machine_id

__all__ = ["DEFAULT_MAX_LEAD", "Snowflake"]

#: How far (seconds) ids may run ahead of the clock before :meth:`Snowflake.next_id`
#: refuses: 1 s of borrowed milliseconds is 4 million ids over the 4096-a-ms budget.
DEFAULT_MAX_LEAD: Final = 1.0

_NS_PER_MS: Final = 1_000_000
#: While the wall clock is behind, the generator's millisecond advances at half
#: the monotonic clock's pace: it never goes back, it never stands still (no
#: outage after a step back), and the wall clock catches up after twice the step.
_BEHIND_NS_PER_MS: Final = 2 * _NS_PER_MS


class Snowflake:
    """Issues 64-bit snowflake ids: ms since the clstr epoch | machine id | sequence.

    ``next_id()`` is a plain call (no lock: one generator serves one event
    loop or thread). Its ids strictly increase, and do not repeat while the
    machine id is held (docs/ids.md says under which assumptions ids of
    different generators never collide):

    * the millisecond is the wall clock's, except that it never goes back:
      when the wall clock steps back, ids go on from the last millisecond
      used, which advances at half the pace of the monotonic clock until the
      wall clock catches up (after twice the step);
    * 4096 ids per millisecond; past that, the next millisecond is borrowed
      before the clock reaches it, by at most ``max_lead`` seconds ahead of
      the clock; beyond that :meth:`next_id` raises
      :class:`~clstr.errors.IdUnavailableError` until the clock catches up;
    * the machine id is asked of ``machine`` once per millisecond (which tells
      it the millisecond in use): when it has none (a lapsed lease) or
      cannot be used yet, :meth:`next_id` raises
      :class:`~clstr.errors.MachineIdUnavailableError`; a new machine id moves
      to a fresh millisecond, so ids still increase.

    ``machine`` may be an int (a :class:`~clstr.ids.StaticMachineId`).
    ``wall_ns`` (ns since the Unix epoch) and ``monotonic_ns`` are the clocks,
    injectable for tests.
    """

    __slots__ = (
        "_anchor_mono",
        "_anchor_ms",
        "_fast_ms",
        "_machine",
        "_max_lead_ms",
        "_monotonic_ns",
        "_ms",
        "_prefix",
        "_seq",
        "_source",
        "_wall_ns",
    )

    def __init__(
        self,
        machine: MachineIdSource | int,
        *,
        max_lead: float = DEFAULT_MAX_LEAD,
        wall_ns: Callable[[], int] = time.time_ns,
        monotonic_ns: Callable[[], int] = time.monotonic_ns,
    ) -> None:
        if isinstance(machine, int):
            machine = StaticMachineId(machine)
        if not isinstance(machine, MachineIdSource):
            raise ConfigurationError(
                f"machine must be a machine id or a MachineIdSource, got {machine!r}"
            )
        if not 0 <= max_lead < 3600:
            raise ConfigurationError(f"max_lead must be in [0, 3600) seconds, got {max_lead!r}")
        self._source = machine
        self._max_lead_ms = int(max_lead * 1000)
        self._wall_ns = wall_ns
        self._monotonic_ns = monotonic_ns
        #: The wall millisecond the fast path may issue in (-1: none).
        self._fast_ms = -1
        #: The last id's millisecond (Unix ms), sequence and machine id.
        self._ms = 0
        self._seq = MAX_SEQUENCE
        self._machine = -1
        #: The last id's bits above the sequence.
        self._prefix = 0
        #: The last wall reading that was not behind, and the monotonic time
        #: then: while the wall clock is behind, time goes on from there.
        self._anchor_ms = 0
        self._anchor_mono = monotonic_ns()

    @property
    def machine_id(self) -> int | None:
        """The machine id of the last id issued (``None`` before the first)."""
        return None if self._machine < 0 else self._machine

    @property
    def last_ms(self) -> int:
        """The millisecond (Unix ms) of the last id issued (0 before the first)."""
        return self._ms

    def lead(self) -> float:
        """Seconds the last id's millisecond is ahead of the generator's clock now
        (borrowed milliseconds; 0 when none), the figure ``max_lead`` bounds."""
        return max(self._ms - self._time(self._wall_ns() // _NS_PER_MS), 0) / 1000

    def next_id(self) -> int:
        """A new id, greater than every id this generator issued before.

        Raises :class:`~clstr.errors.MachineIdUnavailableError` while no
        machine id is held, and :class:`~clstr.errors.IdUnavailableError`
        when issuing would run more than ``max_lead`` ahead of the clock (or
        the clock is outside the 41-bit range of the epoch).
        """
        # The hot path: literals, not module constants (a global look-up each).
        now = self._wall_ns() // 1_000_000
        if now == self._fast_ms:
            seq = self._seq + 1
            if seq <= 4095:  # MAX_SEQUENCE
                self._seq = seq
                return self._prefix | seq
        return self._next_slow(now)

    def _time(self, wall: int) -> int:
        """The time ids are issued at (Unix ms), given the wall clock's ``wall``.

        The wall clock is trusted unless it is behind the anchor (its last
        reading that was not behind) plus half the monotonic time since: then
        it stepped back, and that slowed extrapolation is the time until the
        wall clock catches up (after twice the step).
        """
        mono = self._monotonic_ns()
        ref = self._anchor_ms + (mono - self._anchor_mono) // _BEHIND_NS_PER_MS
        if wall >= ref:
            self._anchor_ms = wall
            self._anchor_mono = mono
            return wall
        return ref

    def _next_slow(self, wall: int) -> int:
        # Once a millisecond (or on every call while the clock is behind or the
        # sequence exhausted): the lease, the clock step and the borrowing.
        self._fast_ms = -1
        ref = self._time(wall)
        if ref > self._ms:
            ms, seq = ref, 0
        elif self._seq < MAX_SEQUENCE:
            ms, seq = self._ms, self._seq + 1  # the clock is behind the last ms
        else:
            ms, seq = self._ms + 1, 0  # the sequence is spent: borrow the next ms
        machine = self._source.machine_id(ms)
        if machine != self._machine:
            check_machine_id(machine)
            if ms == self._ms:
                # Another machine id within the last id's ms would sort below
                # it: move to a fresh ms (and tell the source).
                ms, seq = ms + 1, 0
                self._source.machine_id(ms)
        if ms - ref > self._max_lead_ms:
            raise IdUnavailableError(
                f"ids would run {ms - ref} ms ahead of the clock (max_lead is "
                f"{self._max_lead_ms} ms): more than 4096 ids per ms were asked for "
                "too long; wait a moment, or spread the load over more generators"
            )
        if ms != self._ms:
            stamp = ms - EPOCH_MS
            if not 0 <= stamp <= MAX_TIMESTAMP:
                raise IdUnavailableError(
                    f"the clock reads {ms} ms since the Unix epoch, outside the 41-bit range "
                    "of snowflake ids (2025-01-01 to 2094-09-07); fix the system clock"
                )
            self._prefix = (stamp << TIMESTAMP_SHIFT) | (machine << MACHINE_SHIFT)
            self._ms = ms
            self._machine = machine
        self._seq = seq
        if ms == wall:
            self._fast_ms = wall
        return self._prefix | seq
