"""The ledger's refusals: typed errors a caller can act on.

::

    ClstrError
    └── RequestError
        └── LedgerError (code handler_error)
            ├── LedgerRequestError (ValueError)    a bucket, account, amount or nonce that
            │                                      cannot be
            ├── InsufficientFundsError             the event would take the available
            │                                      balance below the minimum asked for
            └── ReservationError                   a reservation cannot do what was asked
                ├── UnknownReservationError        no such reservation on this account
                ├── ReservationAmountError         a capture larger than the reservation
                └── ReservationClosedError         settled or released already (one-shot)
                    └── ReservationExpiredError    its expiry released it

An account's owner raises them in its handler; being request errors they are
refusals on purpose (the node answers them without logging a traceback). They
travel as the wire's ``handler_error`` with the class name as ``type``, and
:func:`ledger_error` turns such a reply back into the class on the caller's side. Like every
outcome of a handler that ran, a refusal is kept for retries of its nonce
(docs/protocol.md): the same nonce gets the same refusal for the reply
cache's time.
"""

from __future__ import annotations

from typing import ClassVar, Final

from ..errors import RemoteHandlerError, RequestError

__all__ = [
    "LedgerError",
    "LedgerRequestError",
    "InsufficientFundsError",
    "ReservationError",
    "UnknownReservationError",
    "ReservationAmountError",
    "ReservationClosedError",
    "ReservationExpiredError",
    "ledger_error",
]


class LedgerError(RequestError):
    """A ledger operation was refused; nothing was appended."""

    code: ClassVar[str] = "handler_error"


class LedgerRequestError(LedgerError, ValueError):
    """The request itself is wrong (a bucket name, an account, an amount, a nonce
    or a ttl out of range): fix it; retrying the same request cannot help."""


class InsufficientFundsError(LedgerError):
    """The event would take the account's available balance (balance less what
    reservations hold) below the minimum the caller asked for."""


class ReservationError(LedgerError):
    """A reservation cannot be settled or released as asked."""


class UnknownReservationError(ReservationError):
    """The account has no reservation of that id (a typo, another account, or one
    closed so long ago that the account no longer remembers it)."""


class ReservationAmountError(ReservationError):
    """A capture asked for more than the reservation holds."""


class ReservationClosedError(ReservationError):
    """The reservation was settled or released already: a reservation is captured
    or released once."""


class ReservationExpiredError(ReservationClosedError):
    """The reservation expired before it was settled; its amount is available again."""


_BY_NAME: Final[dict[str, type[LedgerError]]] = {
    cls.__name__: cls
    for cls in (
        LedgerError,
        LedgerRequestError,
        InsufficientFundsError,
        ReservationError,
        UnknownReservationError,
        ReservationAmountError,
        ReservationClosedError,
        ReservationExpiredError,
    )
}


def ledger_error(exc: RemoteHandlerError) -> Exception:
    """The ledger error a ``handler_error`` reply stands for, or ``exc`` itself when
    the handler raised something else."""
    cls = _BY_NAME.get(exc.remote_type)
    if cls is None:
        return exc
    return cls(exc.remote_message)
