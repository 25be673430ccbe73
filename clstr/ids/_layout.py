"""The 64-bit layout of a snowflake id, and reading an id back into its parts.

::

    bit 63 | 62 ............ 22 | 21 ...... 12 | 11 ...... 0
       0   |  41 bits: ms since |  10 bits:    |  12 bits:
           |  the clstr epoch   |  machine id  |  sequence

The sign bit stays 0, so an id is a positive signed 64-bit integer too (a
``BIGINT`` column, a Java ``long``). Ids of one generator sort by the time
they were issued; ids of different machines sort by millisecond first.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Final, NamedTuple

from ..errors import InvalidIdError

__all__ = [
    "EPOCH",
    "EPOCH_MS",
    "MACHINE_BITS",
    "MAX_MACHINE_ID",
    "MAX_SEQUENCE",
    "MAX_TIMESTAMP",
    "SEQUENCE_BITS",
    "TIMESTAMP_BITS",
    "SnowflakeParts",
    "parse_snowflake",
]

#: The clstr epoch: ids count milliseconds from 2025-01-01T00:00:00Z.
EPOCH: Final = datetime(2025, 1, 1, tzinfo=UTC)
#: :data:`EPOCH` in milliseconds since the Unix epoch.
EPOCH_MS: Final = 1_735_689_600_000

TIMESTAMP_BITS: Final = 41
MACHINE_BITS: Final = 10
SEQUENCE_BITS: Final = 12

#: The largest machine id (1023).
MAX_MACHINE_ID: Final = (1 << MACHINE_BITS) - 1
#: The largest sequence number in one millisecond (4095: 4096 ids per ms).
MAX_SEQUENCE: Final = (1 << SEQUENCE_BITS) - 1
#: The largest timestamp field: 2^41 - 1 ms after the epoch (2094-09-07T15:47:35.551Z).
MAX_TIMESTAMP: Final = (1 << TIMESTAMP_BITS) - 1

MACHINE_SHIFT: Final = SEQUENCE_BITS
TIMESTAMP_SHIFT: Final = SEQUENCE_BITS + MACHINE_BITS
_MAX_ID: Final = (1 << 63) - 1


class SnowflakeParts(NamedTuple):
    """What a snowflake id is made of (see :func:`parse_snowflake`)."""

    #: The id itself.
    id: int
    #: Milliseconds since the Unix epoch of the id's millisecond.
    timestamp_ms: int
    #: The machine id of the generator that issued it (0..1023).
    machine_id: int
    #: Its place among the ids of its millisecond and machine (0..4095).
    sequence: int

    @property
    def datetime(self) -> datetime:
        """:attr:`timestamp_ms` as an aware UTC datetime."""
        return EPOCH + timedelta(milliseconds=self.timestamp_ms - EPOCH_MS)


def parse_snowflake(snowflake: int) -> SnowflakeParts:
    """Split ``snowflake`` into its timestamp, machine id and sequence.

    Any integer in ``0 .. 2**63 - 1`` is a well-formed id (it need not have
    been issued). Raises :class:`~clstr.errors.InvalidIdError` for anything
    else: not an int (a bool included), negative, or over 63 bits.
    """
    if type(snowflake) is not int:
        if isinstance(snowflake, bool) or not isinstance(snowflake, int):
            raise InvalidIdError(
                f"a snowflake id is an int, got {type(snowflake).__name__} {snowflake!r}"
            )
        snowflake = int(snowflake)  # an int subclass (an IntEnum): its plain value
    if not 0 <= snowflake <= _MAX_ID:
        raise InvalidIdError(
            f"a snowflake id is in 0..2**63-1 (63 bits, sign bit 0), got {snowflake}; "
            "was it read as unsigned, or corrupted?"
        )
    return SnowflakeParts(
        snowflake,
        (snowflake >> TIMESTAMP_SHIFT) + EPOCH_MS,
        (snowflake >> MACHINE_SHIFT) & MAX_MACHINE_ID,
        snowflake & MAX_SEQUENCE,
    )
