"""A credit ledger on clstr: accounts as entities, events in JetStream, a client
that picks the closest healthy cluster and fails over without double-charging.

* :class:`LedgerService` — one ledger node: the account and shard-index
  entities and the reservation expiry sweeper on a sharding runner.
* :class:`LedgerClient` — ``create_event``, ``get_balances``, ``get_account``,
  ``events``, ``reserve`` / ``settle`` / ``release``, ``health`` and ``edges``.
* the values they speak (:class:`LedgerEvent`, :class:`AccountView`,
  :class:`Reservation`, :class:`Balances`...) and the typed refusals
  (:class:`InsufficientFundsError`, the reservation errors).

docs/ledger.md has the API, the topology, the guarantees and the figures.
"""

from __future__ import annotations

from ._client import DEFAULT_BALANCES_TIMEOUT, LedgerClient, request_id_of
from ._errors import (
    InsufficientFundsError,
    LedgerError,
    LedgerRequestError,
    ReservationAmountError,
    ReservationClosedError,
    ReservationError,
    ReservationExpiredError,
    UnknownReservationError,
    ledger_error,
)
from ._fold import decode_event
from ._journal import Journal, account_token
from ._model import (
    ENTRY,
    HOLD,
    RELEASE,
    AccountBalance,
    AccountView,
    Balances,
    EventId,
    EventOptions,
    LedgerEvent,
    Reservation,
)
from ._runtime import ACCOUNT_TYPE, SHARD_INDEX_TYPE, account_entity_id, shard_index_ids
from ._service import EXPIRY_SINGLETON, LedgerService
from ._settings import LedgerSettings

__all__ = [
    "LedgerService",
    "LedgerSettings",
    "LedgerClient",
    "DEFAULT_BALANCES_TIMEOUT",
    "request_id_of",
    # values
    "LedgerEvent",
    "EventId",
    "EventOptions",
    "Reservation",
    "AccountView",
    "AccountBalance",
    "Balances",
    "ENTRY",
    "HOLD",
    "RELEASE",
    # the durable side
    "Journal",
    "account_token",
    "decode_event",
    "ACCOUNT_TYPE",
    "account_entity_id",
    "SHARD_INDEX_TYPE",
    "EXPIRY_SINGLETON",
    "shard_index_ids",
    # refusals
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
