"""The account entity: one per (bucket, account), living on its shard's owner.

How an event is made, and why it happens exactly once:

1. The request's nonce (also its request id: the node's reply cache answers a
   quick retry before the account sees it) is looked up among the account's
   last 128 nonces. A known nonce gets its original event back, read from the
   journal.
2. The event is decided on the current state, reservations past their expiry
   counting as released (a refusal is a typed error and appends nothing).
3. Reservations past their expiry are released (an event each), then the event
   is appended to the bucket's journal on the condition that the account's last
   event is still the one this owner knows, with a message id made of the nonce
   (JetStream drops a repeat within its window).
4. Only then does the state change, and the entity host saves the snapshot
   (conditional on the revision it loaded) before the reply goes out.

The journal is the source of truth and the snapshot a cache of it: an owner
that finds events it does not know (a crash between the append and the
snapshot, or an owner in another cluster appending to the same account) reads
them from the journal and folds them in before deciding anything. A crash
between the two writes therefore loses nothing (the event is in the journal)
and repeats nothing (the retry finds its nonce there).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, Final

import structlog

from ..entities import Entity, handles
from ..errors import IdempotencyKeyReusedError, NotOwnerError
from ._errors import (
    InsufficientFundsError,
    LedgerRequestError,
    ReservationAmountError,
    ReservationClosedError,
    ReservationExpiredError,
    UnknownReservationError,
)
from ._fold import AccountState, apply, decode_event, encode_event, view_of
from ._journal import JournalConflict, StoreUnavailableError
from ._model import (
    ENTRY,
    HOLD,
    RELEASE,
    AccountView,
    ExpireHolds,
    HoldFunds,
    LedgerEvent,
    ListEvents,
    Post,
    ReleaseHold,
    Summary,
    check_account,
    check_amount,
    check_bucket,
    check_nonce,
)
from ._runtime import ACCOUNT_TYPE, LedgerRuntime, now_ms

__all__ = ["AccountEntity"]

_log = structlog.get_logger("clstr.ledger")

_MAX_NOTE_BYTES: Final = 1024
_MAX_TTL_MS: Final = 366 * 24 * 3600 * 1000
_MAX_LIST: Final = 1000

#: An event decided, not yet appended: LedgerEvent field -> value.
Draft = dict[str, Any]


class _Duplicate(Exception):
    """JetStream took the append for a repeat of the nonce's earlier one."""

    def __init__(self, position: int) -> None:
        super().__init__(position)
        self.position = position


class AccountEntity(Entity[AccountState]):
    """An account (see the module docstring). A ledger node registers a subclass
    bound to its :class:`LedgerRuntime`."""

    type_name = ACCOUNT_TYPE
    state_type = AccountState
    # Repeats are answered from the account's nonces and the journal (which also
    # covers a crash between the append and the snapshot): no replies in the record.
    kept_replies = 0
    runtime: ClassVar[LedgerRuntime]

    bucket: str
    account: str

    async def on_start(self) -> None:
        bucket, _, account = self.id.partition("/")
        self.bucket, self.account = check_bucket(bucket), check_account(account)
        await self._catch_up()

    # -- the messages ---------------------------------------------------------------------

    @handles
    async def post(self, msg: Post) -> LedgerEvent:
        """A credit or debit; with a reservation, its capture."""
        check_nonce(msg.nonce)
        _check_note(msg.note)
        if msg.reservation:
            if not isinstance(msg.amount, int) or isinstance(msg.amount, bool) or msg.amount > 0:
                raise LedgerRequestError(
                    f"a capture is a debit: give a negative amount (or 0 for the whole "
                    f"reservation), got {msg.amount!r}"
                )
            if msg.amount:
                check_amount(msg.amount)
        else:
            check_amount(msg.amount)
        if msg.min_balance is not None and not isinstance(msg.min_balance, int):
            raise LedgerRequestError(f"min_balance must be an int or None, got {msg.min_balance!r}")

        def decide(now: int) -> Draft:
            state = self.state
            if msg.reservation:
                amount, _, _ = self._open_hold(msg.reservation, now)
                capture = -msg.amount if msg.amount else amount
                if capture > amount:
                    raise ReservationAmountError(
                        f"cannot capture {capture} from reservation {msg.reservation} of "
                        f"{self._name}, which holds {amount}"
                    )
                return _draft(ENTRY, -capture, -amount, msg.note, reservation=msg.reservation)
            if msg.min_balance is not None and msg.amount < 0:
                available = state.balance - state.held_at(now)
                if available + msg.amount < msg.min_balance:
                    raise InsufficientFundsError(
                        f"{self._name}: a debit of {-msg.amount} would leave "
                        f"{available + msg.amount} available (balance {state.balance}, "
                        f"held {state.held_at(now)}), below the minimum of {msg.min_balance}; "
                        "nothing was appended"
                    )
            return _draft(ENTRY, msg.amount, 0, msg.note)

        return await self._write(msg.nonce, (ENTRY, msg.amount, msg.reservation), decide)

    @handles
    async def hold(self, msg: HoldFunds) -> LedgerEvent:
        """Reserve part of the available balance until settled, released or expired."""
        check_nonce(msg.nonce)
        check_amount(msg.amount, positive=True)
        _check_note(msg.note)
        if not isinstance(msg.ttl_ms, int) or not 0 < msg.ttl_ms <= _MAX_TTL_MS:
            raise LedgerRequestError(
                f"a reservation's ttl must be 1 ms to 366 days, got {msg.ttl_ms!r} ms"
            )

        def decide(now: int) -> Draft:
            state = self.state
            available = state.balance - state.held_at(now)
            if msg.min_balance is not None and available - msg.amount < msg.min_balance:
                raise InsufficientFundsError(
                    f"{self._name}: reserving {msg.amount} would leave {available - msg.amount} "
                    f"available (balance {state.balance}, held {state.held_at(now)}), below the "
                    f"minimum of {msg.min_balance}; nothing was reserved"
                )
            return _draft(HOLD, 0, msg.amount, msg.note, expires_at_ms=now + msg.ttl_ms)

        return await self._write(msg.nonce, (HOLD, msg.amount, ""), decide)

    @handles
    async def release(self, msg: ReleaseHold) -> LedgerEvent:
        """Give a reservation's amount back."""
        check_nonce(msg.nonce)
        _check_note(msg.note)

        def decide(now: int) -> Draft:
            amount, _, _ = self._open_hold(msg.reservation, now)
            return _draft(
                RELEASE, 0, -amount, msg.note, reservation=msg.reservation, reason="released"
            )

        return await self._write(msg.nonce, (RELEASE, 0, msg.reservation), decide)

    @handles
    async def summary(self, msg: Summary) -> AccountView:
        """The account collapsed (after reading what the journal has past this
        owner's view: another cluster's owner may have appended)."""
        await self._refresh()
        return view_of(self.bucket, self.account, self.state, now_ms())

    @handles
    async def list_events(self, msg: ListEvents) -> list[LedgerEvent]:
        """Up to ``limit`` events after journal position ``after``, from the journal."""
        if not isinstance(msg.after, int) or msg.after < 0:
            raise LedgerRequestError(f"after must be a position >= 0, got {msg.after!r}")
        limit = max(1, min(int(msg.limit), _MAX_LIST))
        events: list[LedgerEvent] = []
        position = msg.after
        journal = self.runtime.journal
        while len(events) < limit:
            found = await journal.next_after(self.bucket, self.account, position)
            if found is None:
                break
            position, body = found
            events.append(decode_event(self.bucket, self.account, position, body))
        return events

    @handles
    async def expire(self, msg: ExpireHolds) -> int:
        """Release the reservations past their expiry now; return how many."""
        await self._refresh()
        for _ in range(self.runtime.settings.max_conflicts):
            try:
                return await self._expire_due(now_ms())
            except JournalConflict:
                await self._catch_up()
        raise self._busy()

    # -- the write path -----------------------------------------------------------------------

    async def _write(
        self, nonce: str, request: tuple[str, int, str], decide: Callable[[int], Draft]
    ) -> LedgerEvent:
        for _ in range(self.runtime.settings.max_conflicts):
            known = self.state.nonces.get(nonce)
            if known is not None:
                return await self._original(known, nonce, request)
            try:
                now = now_ms()
                # Decided first, with reservations past their expiry counted as released,
                # so that a refusal appends nothing (not even those releases).
                draft = decide(now)
                await self._expire_due(now)
                return await self._append(draft, nonce)
            except JournalConflict:
                await self._catch_up()  # another writer was first: decide again on what it did
            except _Duplicate as dup:
                await self._catch_up()
                return await self._original(dup.position, nonce, request)
            except StoreUnavailableError as exc:
                # Landed or not, the journal will say: the retry of this nonce reads it.
                # Not kept (unlike a timeout or an error), so that retry runs.
                raise NotOwnerError(f"{exc}; retry with the same nonce") from exc
        raise self._busy()

    async def _append(self, draft: Draft, nonce: str) -> LedgerEvent:
        """Append ``draft`` as the account's next event, then fold it in."""
        runtime, state = self.runtime, self.state
        journal = runtime.journal
        seq = runtime.next_seq()
        event = {
            **draft,
            "balance": state.balance + draft["amount"],
            "held": state.held + draft["reserved"],
            "nonce": nonce,
            "origin": runtime.origin,
            "epoch": runtime.epoch,
            "origin_seq": seq,
            "sequence": state.events + 1,
            "timestamp_ms": now_ms(),
        }
        if max(abs(event["balance"]), abs(event["held"])) >= 2**63:
            raise LedgerRequestError(f"{self._name}: the balance would leave 64-bit integers")
        if draft["kind"] == HOLD:
            # The reservation is named after its hold event; indexed before it is
            # appended, so that the sweeper's index holds every open reservation.
            event["reservation"] = f"{runtime.origin}:{runtime.epoch}:{seq}"
            await journal.index_hold(
                self.bucket, self.account, event["reservation"], event["expires_at_ms"]
            )
        closing = state.holds.get(event.get("reservation", "")) if draft["kind"] != HOLD else None
        body = encode_event(event)
        position, duplicate = await journal.append(
            self.bucket,
            self.account,
            body,
            expected=state.position,
            msg_id=journal.msg_id(self.bucket, self.account, nonce),
        )
        if duplicate:
            raise _Duplicate(position)
        appended = decode_event(self.bucket, self.account, position, body)
        apply(state, appended)
        if closing is not None:
            await self._unindex(appended.reservation, closing[1])
        return appended

    async def _expire_due(self, now: int) -> int:
        """Release every reservation past its expiry (an event each, nonce
        ``expire <id>``: no user nonce has a space); return how many."""
        due = self.state.due(now)
        for reservation in due:
            amount, _, _ = self.state.holds[reservation]
            draft = _draft(RELEASE, 0, -amount, "", reservation=reservation, reason="expired")
            try:
                await self._append(draft, f"expire {reservation}")
            except _Duplicate as dup:
                raise JournalConflict(f"expiry of {reservation} appended already") from dup
        return len(due)

    async def _original(
        self, position: int, nonce: str, request: tuple[str, int, str]
    ) -> LedgerEvent:
        """The event a repeated nonce made, read from the journal; ``id_reused`` when
        the nonce made another kind of event."""
        found = await self.runtime.journal.read(self.bucket, position)
        if found is None:
            raise self._busy()
        account, body = found
        event = decode_event(self.bucket, account, position, body)
        kind, amount, reservation = request
        same = (
            account == self.account
            and event.nonce == nonce
            and event.kind == kind
            and (reservation == event.reservation or kind == HOLD)
            and (
                (kind == ENTRY and (event.amount == amount or (reservation and amount == 0)))
                or (kind == HOLD and event.reserved == amount)
                or kind == RELEASE
            )
        )
        if not same:
            raise IdempotencyKeyReusedError(
                f"nonce {nonce!r} of {self._name} was used for another event (position "
                f"{position}: {event.kind} {event.amount or event.reserved}); give each new "
                "event a new nonce"
            )
        return event

    # -- reading the journal ---------------------------------------------------------------------

    async def _catch_up(self) -> None:
        """Fold in the account's events past this owner's position."""
        journal = self.runtime.journal
        while True:
            found = await journal.next_after(self.bucket, self.account, self.state.position)
            if found is None:
                return
            position, body = found
            apply(self.state, decode_event(self.bucket, self.account, position, body))

    async def _refresh(self) -> None:
        """Catch up when the journal's last event for the account is past ours."""
        last = await self.runtime.journal.last(self.bucket, self.account)
        if last is not None and last[0] > self.state.position:
            await self._catch_up()

    async def _unindex(self, reservation: str, expires_at_ms: int) -> None:
        try:
            await self.runtime.journal.unindex_hold(
                self.bucket, self.account, reservation, expires_at_ms
            )
        except Exception as exc:  # the sweeper drops stale entries itself
            _log.warning("cannot unindex a closed reservation", error=repr(exc))

    # -- helpers --------------------------------------------------------------------------------

    @property
    def _name(self) -> str:
        return f"{self.bucket}/{self.account}"

    def _open_hold(self, reservation: str, now: int) -> list[int]:
        hold = self.state.holds.get(reservation)
        if hold is not None:
            if hold[1] <= now:
                raise ReservationExpiredError(
                    f"reservation {reservation} of {self._name} expired (its amount is "
                    "available again); a reservation is settled or released before its expiry"
                )
            return hold
        closed = self.state.closed.get(reservation)
        if closed is None:
            raise UnknownReservationError(
                f"{self._name} has no reservation {reservation!r} (check the id and the account)"
            )
        status, position = closed
        cls = ReservationExpiredError if status == "expired" else ReservationClosedError
        raise cls(
            f"reservation {reservation} of {self._name} was {status} already (event at position "
            f"{position}); a reservation is settled or released once"
        )

    def _busy(self) -> NotOwnerError:
        return NotOwnerError(
            f"{self._name}: other writers kept appending first "
            f"({self.runtime.settings.max_conflicts} tries); retry"
        )


def _draft(
    kind: str,
    amount: int,
    reserved: int,
    note: str,
    *,
    reservation: str = "",
    expires_at_ms: int = 0,
    reason: str = "",
) -> Draft:
    return {
        "kind": kind,
        "amount": amount,
        "reserved": reserved,
        "note": note,
        "reservation": reservation,
        "expires_at_ms": expires_at_ms,
        "reason": reason,
    }


def _check_note(note: object) -> None:
    if not isinstance(note, str) or len(note.encode()) > _MAX_NOTE_BYTES:
        raise LedgerRequestError(f"a note is a str of at most {_MAX_NOTE_BYTES} bytes")
