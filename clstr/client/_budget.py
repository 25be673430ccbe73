"""One deadline per request, split between the node and the reply's way back.

The call's ``timeout`` and the envelope's TTL are the same budget. The client
waits for at most that long, never longer, and the envelope carries the same
budget less a reserve for the reply's way back (a tenth of it, at least 50 ms
and at most 250 ms, never more than half), so a node's ``timeout`` error
reaches the caller before the caller gives up, even when the reply is held up
for a while on its way (a busy event loop).
"""

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
    the reply reserve (see the module docstring), so that the node's deadline
    falls before the caller's."""
    reserve = min(
        max(left * _REPLY_RESERVE_FRACTION, _REPLY_RESERVE_MIN), _REPLY_RESERVE_MAX, left / 2
    )
    return max(left - reserve, 0.001)
