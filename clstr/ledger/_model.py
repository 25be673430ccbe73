"""What the ledger's API speaks: events, accounts, reservations, balances, the
options of an event, and the messages an account's owner handles.

Every value here is a dataclass that travels as msgpack (clstr's typed
payloads); amounts are integers in the bucket's smallest unit (cents, credits).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import ClassVar, Final

from ._errors import LedgerRequestError

__all__ = [
    "ENTRY",
    "HOLD",
    "RELEASE",
    "MAX_AMOUNT",
    "EventId",
    "LedgerEvent",
    "EventOptions",
    "Reservation",
    "AccountView",
    "AccountBalance",
    "Balances",
    "Post",
    "HoldFunds",
    "ReleaseHold",
    "Summary",
    "ListEvents",
    "ExpireHolds",
    "ShardBalances",
    "check_bucket",
    "check_account",
    "check_nonce",
    "check_amount",
]

#: An event that changes the balance (a credit, a debit, or a capture settling a
#: reservation).
ENTRY: Final = "entry"
#: An event that reserves part of the available balance (``reserve``).
HOLD: Final = "hold"
#: An event that gives a reservation's amount back (``release``, or its expiry).
RELEASE: Final = "release"

#: The largest amount of one event (balances stay within msgpack's 64-bit integers).
MAX_AMOUNT: Final = 2**53

_BUCKET = re.compile(r"[A-Za-z0-9_-]{1,64}")
_NONCE = re.compile(r"[!-~]{1,100}")  # printable ASCII, no space
_MAX_ACCOUNT_BYTES: Final = 512


def check_bucket(bucket: object) -> str:
    """``bucket`` if it is a valid bucket name (1-64 of ``A-Z a-z 0-9 _ -``)."""
    if not isinstance(bucket, str) or not _BUCKET.fullmatch(bucket):
        raise LedgerRequestError(
            f"bucket {bucket!r} is not a valid name: use 1 to 64 letters, digits, '_' or '-'"
        )
    return bucket


def check_account(account: object) -> str:
    """``account`` if it is a valid account name (any non-empty text up to 512 bytes)."""
    if not isinstance(account, str) or not account:
        raise LedgerRequestError(f"account must be a non-empty str, got {account!r}")
    if len(account.encode()) > _MAX_ACCOUNT_BYTES:
        raise LedgerRequestError(
            f"account name is {len(account.encode())} bytes; the limit is {_MAX_ACCOUNT_BYTES}"
        )
    return account


def check_nonce(nonce: object) -> str:
    """``nonce`` if it is a valid idempotency nonce (1-100 printable ASCII
    characters, no spaces)."""
    if not isinstance(nonce, str) or not _NONCE.fullmatch(nonce):
        raise LedgerRequestError(
            f"nonce {nonce!r} is not valid: use 1 to 100 printable ASCII characters without "
            "spaces (a UUID, say)"
        )
    return nonce


def check_amount(amount: object, *, what: str = "amount", positive: bool = False) -> int:
    """``amount`` if it is a non-zero int within :data:`MAX_AMOUNT` (positive when asked)."""
    if not isinstance(amount, int) or isinstance(amount, bool):
        raise LedgerRequestError(f"{what} must be an int (in the smallest unit), got {amount!r}")
    if amount == 0 or abs(amount) > MAX_AMOUNT or (positive and amount < 0):
        sign = "positive" if positive else "non-zero"
        raise LedgerRequestError(f"{what} must be {sign} and at most {MAX_AMOUNT}, got {amount}")
    return amount


# -- events -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, order=True)
class EventId:
    """The global identity of an event: its bucket, the node that appended it, that
    node's epoch (it grows with every start of the node) and the node's sequence
    within the epoch."""

    bucket: str
    origin: str
    epoch: int
    seq: int

    def __str__(self) -> str:
        return f"{self.bucket}:{self.origin}:{self.epoch}:{self.seq}"


@dataclass(frozen=True, slots=True)
class LedgerEvent:
    """One immutable event of an account, as appended to the bucket's journal.

    ``amount`` is what it did to the balance and ``reserved`` what it did to the
    held amount: the balance is the sum of the account's ``amount``s and the held
    amount the sum of its ``reserved`` (``balance`` and ``held`` are both, as
    they stood right after this event). ``sequence`` numbers the account's
    events from 1; ``position`` is the event's place in the bucket's journal.
    """

    bucket: str
    account: str
    kind: str
    amount: int
    reserved: int
    balance: int
    held: int
    nonce: str
    origin: str
    epoch: int
    origin_seq: int
    sequence: int
    position: int
    timestamp_ms: int
    note: str = ""
    #: The reservation this event opened (hold), captured (entry) or released.
    reservation: str = ""
    #: When a hold's reservation expires (ms since the Unix epoch).
    expires_at_ms: int = 0
    #: Why a reservation was released: ``"released"`` or ``"expired"``.
    reason: str = ""

    @property
    def id(self) -> EventId:
        """The event's global identity."""
        return EventId(self.bucket, self.origin, self.epoch, self.origin_seq)

    @property
    def available(self) -> int:
        """The balance less what reservations held, right after this event."""
        return self.balance - self.held


@dataclass(frozen=True, slots=True, kw_only=True)
class EventOptions:
    """How an event is made (``LedgerClient.create_event``).

    ``nonce`` names the event for retries: the same nonce on the same account
    returns the original event instead of appending another (the client makes one
    when none is given, and re-uses it across its retries and its failover).
    ``min_balance``: refuse the event (:class:`InsufficientFundsError`) when the
    available balance after it would be below this (``0``: no overdraft;
    ``None``: no limit). ``reservation``: the event captures that reservation of
    the account (a debit of at most its amount; see ``LedgerClient.settle``).
    """

    nonce: str | None = None
    note: str = ""
    min_balance: int | None = None
    reservation: str | None = None


# -- views ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Reservation:
    """A hold on part of an account's available balance, until it is settled
    (captured once), released, or expires."""

    bucket: str
    account: str
    id: str
    amount: int
    expires_at_ms: int
    #: ``"open"``, ``"settled"``, ``"released"`` or ``"expired"``.
    status: str
    #: The journal position of the hold event.
    position: int
    #: The hold event (returned by ``reserve``; not listed in an account view).
    event: LedgerEvent | None = None


@dataclass(frozen=True, slots=True)
class AccountView:
    """An account collapsed: the sums of its events and its open reservations."""

    bucket: str
    account: str
    balance: int
    held: int
    available: int
    events: int
    credits: int
    debits: int
    #: The journal position of its last event (0: no event yet).
    position: int
    first_ms: int
    last_ms: int
    reservations: list[Reservation] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class AccountBalance:
    """One row of ``get_balances``."""

    account: str
    balance: int
    held: int
    available: int
    events: int
    position: int


@dataclass(frozen=True, slots=True)
class Balances:
    """Every account of a bucket, gathered from every shard within a bounded time.

    ``partial`` is true when some shards did not answer in time (or failed):
    their accounts are missing, ``missing_shards`` names them and ``errors``
    says why.
    """

    bucket: str
    accounts: list[AccountBalance]
    partial: bool
    shards: int
    missing_shards: list[int] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)

    @property
    def total(self) -> int:
        """The sum of the listed balances."""
        return sum(row.balance for row in self.accounts)


# -- what an account's owner handles ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Post:
    """Append an entry (credit or debit); with a reservation, capture it."""

    message_type: ClassVar[str] = "ledger.post"

    nonce: str
    amount: int
    note: str = ""
    min_balance: int | None = None
    reservation: str = ""


@dataclass(frozen=True, slots=True)
class HoldFunds:
    """Reserve ``amount`` for ``ttl_ms`` milliseconds."""

    message_type: ClassVar[str] = "ledger.hold"

    nonce: str
    amount: int
    ttl_ms: int
    note: str = ""
    min_balance: int | None = 0


@dataclass(frozen=True, slots=True)
class ReleaseHold:
    """Give a reservation's amount back."""

    message_type: ClassVar[str] = "ledger.release"

    nonce: str
    reservation: str
    note: str = ""


@dataclass(frozen=True, slots=True)
class Summary:
    """The account's :class:`AccountView`."""

    message_type: ClassVar[str] = "ledger.account"


@dataclass(frozen=True, slots=True)
class ListEvents:
    """Up to ``limit`` events of the account after journal position ``after``."""

    message_type: ClassVar[str] = "ledger.events"

    after: int = 0
    limit: int = 100


@dataclass(frozen=True, slots=True)
class ExpireHolds:
    """Release the account's expired reservations now (the expiry sweeper sends it)."""

    message_type: ClassVar[str] = "ledger.expire"


@dataclass(frozen=True, slots=True)
class ShardBalances:
    """The balances of a bucket's accounts in one shard (to the shard's index)."""

    message_type: ClassVar[str] = "ledger.shard_balances"

    bucket: str
