"""One deadline, two clocks: the part of a caller's deadline its envelope carries."""

from __future__ import annotations

from typing import Final

__all__ = ["node_budget"]

# Part of the budget kept back for the reply's way home: a tenth of the time
# left, at least _MIN (a loop stall of tens of ms is common on a busy host: a
# fixed 30 ms turned a node's timeout answer into the client's own timeout),
# at most _MAX, and never more than half the time left (short budgets still
# give the handler most of theirs).
_REPLY_RESERVE_FRACTION: Final = 0.1
_REPLY_RESERVE_MIN: Final = 0.05
_REPLY_RESERVE_MAX: Final = 0.25


def node_budget(left: float) -> float:
    """The TTL to send when the caller waits ``left`` more seconds: ``left`` less
    the reply reserve, so that the node's deadline falls before the caller's."""
    reserve = min(
        max(left * _REPLY_RESERVE_FRACTION, _REPLY_RESERVE_MIN), _REPLY_RESERVE_MAX, left / 2
    )
    return max(left - reserve, 0.001)
