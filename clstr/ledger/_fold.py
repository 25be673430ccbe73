"""An account as the fold of its events: the state an account's owner keeps
(and snapshots in KV), how an event is stored in the journal, and the one
function that applies an event to the state.

The same :func:`apply` runs when an owner appends an event and when it reads
events it missed (after a crash, or appended by another cluster's owner), so a
snapshot plus the journal after it always gives the same account.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final

import msgpack
import structlog

from ..errors import PayloadError
from ._model import ENTRY, HOLD, RELEASE, AccountBalance, AccountView, LedgerEvent, Reservation

__all__ = [
    "RECENT",
    "AccountState",
    "apply",
    "balance_of",
    "decode_event",
    "encode_event",
    "view_of",
]

#: How many nonces and closed reservations an account remembers (the newest).
RECENT: Final = 128

_log = structlog.get_logger("clstr.ledger")

# Stored field <-> LedgerEvent field. Bucket, account and position come from where
# the event is stored (its stream, subject and sequence), not from its body.
_FIELDS: Final = (
    ("k", "kind"),
    ("a", "amount"),
    ("v", "reserved"),
    ("b", "balance"),
    ("h", "held"),
    ("n", "nonce"),
    ("o", "origin"),
    ("e", "epoch"),
    ("s", "origin_seq"),
    ("c", "sequence"),
    ("t", "timestamp_ms"),
    ("m", "note"),
    ("r", "reservation"),
    ("x", "expires_at_ms"),
    ("y", "reason"),
)
_OPTIONAL: Final = {"m": "", "r": "", "x": 0, "y": ""}


@dataclass
class AccountState:
    """What an account's owner knows of it: sums, open reservations, and recent
    nonces and closed reservations (to answer repeats and second settles)."""

    balance: int = 0
    held: int = 0
    events: int = 0
    #: Journal position of the last event applied.
    position: int = 0
    credits: int = 0
    debits: int = 0
    first_ms: int = 0
    last_ms: int = 0
    #: Open reservations: id -> [amount, expires_at_ms, position of the hold].
    holds: dict[str, list[int]] = field(default_factory=dict)
    #: Recently closed reservations: id -> [status, position of the closing event].
    closed: dict[str, list[Any]] = field(default_factory=dict)
    #: Recent nonces: nonce -> position of their event.
    nonces: dict[str, int] = field(default_factory=dict)

    def held_at(self, now_ms: int) -> int:
        """What open reservations hold at ``now_ms`` (an expired one holds nothing,
        even before its release is appended)."""
        return sum(amount for amount, expires, _ in self.holds.values() if expires > now_ms)

    def due(self, now_ms: int) -> list[str]:
        """Open reservations past their expiry, oldest first."""
        return sorted(
            (rid for rid, (_, expires, _) in self.holds.items() if expires <= now_ms),
            key=lambda rid: self.holds[rid][1],
        )


def encode_event(event: dict[str, Any]) -> bytes:
    """The journal body of an event given as LedgerEvent field -> value."""
    body = {short: event[name] for short, name in _FIELDS if short not in _OPTIONAL}
    for short, name in _FIELDS:
        default = _OPTIONAL.get(short)
        if default is not None and event.get(name, default) != default:
            body[short] = event[name]
    packed: bytes = msgpack.packb(body, use_bin_type=True)
    return packed


def decode_event(bucket: str, account: str, position: int, data: bytes) -> LedgerEvent:
    """The event stored at ``position`` of ``bucket``'s journal for ``account``.

    Raises :class:`~clstr.PayloadError` when ``data`` is not a ledger event.
    """
    try:
        body = msgpack.unpackb(data, raw=False)
        fields = {name: body.get(short, _OPTIONAL.get(short)) for short, name in _FIELDS}
        return LedgerEvent(bucket=bucket, account=account, position=position, **fields)
    except Exception as exc:
        raise PayloadError(
            f"journal message {position} of {bucket}/{account} is not a ledger event: {exc}"
        ) from exc


def apply(state: AccountState, event: LedgerEvent) -> None:
    """Fold ``event`` into ``state`` (see the module docstring)."""
    if event.kind == ENTRY:
        state.balance += event.amount
        if event.amount > 0:
            state.credits += event.amount
        else:
            state.debits -= event.amount
        if event.reservation:
            _close(state, event.reservation, "settled", event.position)
    elif event.kind == HOLD:
        state.holds[event.reservation] = [event.reserved, event.expires_at_ms, event.position]
    elif event.kind == RELEASE:
        status = "expired" if event.reason == "expired" else "released"
        _close(state, event.reservation, status, event.position)
    state.held += event.reserved
    state.events = event.sequence
    state.position = event.position
    state.first_ms = state.first_ms or event.timestamp_ms
    state.last_ms = event.timestamp_ms
    nonces = state.nonces
    nonces.pop(event.nonce, None)
    nonces[event.nonce] = event.position
    while len(nonces) > RECENT:
        del nonces[next(iter(nonces))]
    if state.balance != event.balance or state.held != event.held:
        # The sums are what the journal's events add up to: they win.
        _log.error(
            "ledger event disagrees with the sum of the account's events",
            bucket=event.bucket,
            account=event.account,
            position=event.position,
            stored=(event.balance, event.held),
            summed=(state.balance, state.held),
        )


def _close(state: AccountState, reservation: str, status: str, position: int) -> None:
    state.holds.pop(reservation, None)
    closed = state.closed
    closed[reservation] = [status, position]
    while len(closed) > RECENT:
        del closed[next(iter(closed))]


def view_of(bucket: str, account: str, state: AccountState, now_ms: int) -> AccountView:
    """The account collapsed, with expired reservations counted as released."""
    held = state.held_at(now_ms)
    reservations = [
        Reservation(bucket, account, rid, amount, expires, "open", position)
        for rid, (amount, expires, position) in state.holds.items()
        if expires > now_ms
    ]
    return AccountView(
        bucket=bucket,
        account=account,
        balance=state.balance,
        held=held,
        available=state.balance - held,
        events=state.events,
        credits=state.credits,
        debits=state.debits,
        position=state.position,
        first_ms=state.first_ms,
        last_ms=state.last_ms,
        reservations=reservations,
    )


def balance_of(account: str, state: AccountState, now_ms: int) -> AccountBalance:
    """The account's row of ``get_balances``."""
    held = state.held_at(now_ms)
    return AccountBalance(
        account, state.balance, held, state.balance - held, state.events, state.position
    )
