"""The ledger's client: events, balances, accounts and reservations, through a
:class:`~clstr.Client` (one cluster) or an :class:`~clstr.client.EdgeClient`
(the closest healthy one of several clusters, with one failover).

Every write carries a nonce, made here when the caller gives none; it is the
request's id (scoped to the account: the nonce and a digest of the account),
so the client's retries, the edge client's failover and the caller's own
retries of the same nonce are one request: the account returns the event the
nonce made the first time instead of appending another.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Sequence
from types import TracebackType
from typing import Any, Final, Self, TypeVar

from blake3 import blake3

from ..client import (
    DEFAULT_RETRY,
    Client,
    EdgeClient,
    EdgeHealth,
    EdgeSettings,
    EdgeStatus,
    Endpoint,
    RetryPolicy,
)
from ..errors import ConfigurationError, RemoteHandlerError
from ..protocol import DEFAULT_PREFIX
from ._errors import ledger_error
from ._model import (
    AccountView,
    Balances,
    EventOptions,
    HoldFunds,
    LedgerEvent,
    ListEvents,
    Post,
    ReleaseHold,
    Reservation,
    Summary,
    check_account,
    check_amount,
    check_bucket,
    check_nonce,
)
from ._runtime import ACCOUNT_TYPE, account_entity_id
from ._shards import gather_balances

__all__ = ["DEFAULT_BALANCES_TIMEOUT", "LedgerClient", "request_id_of"]

T = TypeVar("T")

#: How long ``get_balances`` waits for the shards, by default (seconds).
DEFAULT_BALANCES_TIMEOUT: Final = 2.0


def request_id_of(bucket: str, account: str, nonce: str) -> str:
    """The request id of a write: its nonce, scoped to the account (two accounts
    may use the same nonce; a request id names one request per shard)."""
    scope = blake3(f"{bucket}\0{account}".encode()).hexdigest()[:16]
    return f"{nonce}@{scope}"


class LedgerClient:
    """Calls to a ledger (docs/ledger.md).

    ``sender`` is a :class:`~clstr.Client` of the ledger's cluster or an
    :class:`~clstr.client.EdgeClient` over several; :meth:`connect` builds the
    latter from endpoint URLs. ``timeout`` is each call's default deadline (the
    sender's otherwise). Ledger refusals raise the typed errors of
    :mod:`clstr.ledger` (:class:`InsufficientFundsError`, the reservation
    errors); an error of the transport or the cluster (a timeout, no owner)
    leaves the outcome unknown: retry with the same nonce.
    """

    def __init__(
        self,
        sender: Client | EdgeClient,
        *,
        timeout: float | None = None,
        owns_sender: bool = False,
    ) -> None:
        self.sender = sender
        self.timeout = timeout
        self._owns_sender = owns_sender

    @classmethod
    async def connect(
        cls,
        endpoints: Sequence[Endpoint | str | Sequence[str]],
        *,
        num_shards: int,
        seed: str = "",
        prefix: str = DEFAULT_PREFIX,
        timeout: float = 5.0,
        retry: RetryPolicy | None = DEFAULT_RETRY,
        settings: EdgeSettings | None = None,
        nats_options: Any = None,
    ) -> LedgerClient:
        """A client over ``endpoints`` (each the URLs of one cluster), probed at once
        (see :class:`~clstr.client.EdgeClient`); it owns (and closes) the edges.
        ``retry`` applies within a cluster (shards moving, an account's writers
        racing), before the one failover to another cluster."""
        edge = EdgeClient(
            endpoints,
            num_shards=num_shards,
            seed=seed,
            prefix=prefix,
            timeout=timeout,
            retry=retry,
            settings=settings,
            nats_options=nats_options,
        )
        try:
            await edge.start()
        except BaseException:
            await edge.close()
            raise
        return cls(edge, owns_sender=True)

    # -- events ---------------------------------------------------------------------------

    async def create_event(
        self,
        bucket: str,
        account: str,
        amount: int,
        options: EventOptions | None = None,
        *,
        timeout: float | None = None,
    ) -> LedgerEvent:
        """Append a credit (``amount`` > 0) or a debit (< 0) to an account and return
        the event; its ``balance`` is the account's new balance.

        With ``options.nonce`` given, a repeat returns the original event (even
        after a crash or a failover). ``options.min_balance`` refuses a debit
        that would take the available balance below it
        (:class:`InsufficientFundsError`); ``options.reservation`` captures that
        reservation (see :meth:`settle`).
        """
        options = options or EventOptions()
        check_amount(amount)
        return await self._post(bucket, account, amount, options, timeout)

    async def settle(
        self,
        bucket: str,
        account: str,
        reservation: str,
        *,
        amount: int | None = None,
        nonce: str | None = None,
        note: str = "",
        timeout: float | None = None,
    ) -> LedgerEvent:
        """Capture a reservation: a debit of ``amount`` (default: all it holds, at
        most that), once. The rest of the reservation is given back. A second
        settle or a release after it is refused (:class:`ReservationClosedError`),
        as is one after its expiry (:class:`ReservationExpiredError`)."""
        capture = 0 if amount is None else -check_amount(amount, what="capture", positive=True)
        options = EventOptions(nonce=nonce, note=note, reservation=reservation)
        return await self._post(bucket, account, capture, options, timeout)

    async def _post(
        self,
        bucket: str,
        account: str,
        amount: int,
        options: EventOptions,
        timeout: float | None,
    ) -> LedgerEvent:
        nonce = self._nonce(options.nonce)
        msg = Post(nonce, amount, options.note, options.min_balance, options.reservation or "")
        return await self._call(bucket, account, msg, LedgerEvent, timeout, nonce)

    # -- reservations -------------------------------------------------------------------------

    async def reserve(
        self,
        bucket: str,
        account: str,
        amount: int,
        *,
        ttl: float,
        nonce: str | None = None,
        note: str = "",
        min_balance: int | None = 0,
        timeout: float | None = None,
    ) -> Reservation:
        """Hold ``amount`` of the account's available balance for ``ttl`` seconds,
        until :meth:`settle` captures it or :meth:`release` gives it back (past its
        expiry it is released by itself). Refused with
        :class:`InsufficientFundsError` when the available balance after it would be
        below ``min_balance`` (default 0; ``None``: no limit)."""
        check_amount(amount, what="reservation amount", positive=True)
        nonce = self._nonce(nonce)
        msg = HoldFunds(nonce, amount, max(1, round(ttl * 1000)), note, min_balance)
        event = await self._call(bucket, account, msg, LedgerEvent, timeout, nonce)
        return Reservation(
            bucket,
            account,
            event.reservation,
            event.reserved,
            event.expires_at_ms,
            "open",
            event.position,
            event,
        )

    async def release(
        self,
        bucket: str,
        account: str,
        reservation: str,
        *,
        nonce: str | None = None,
        note: str = "",
        timeout: float | None = None,
    ) -> LedgerEvent:
        """Give a reservation's amount back (once; refused when it was settled,
        released or expired already)."""
        nonce = self._nonce(nonce)
        msg = ReleaseHold(nonce, reservation, note)
        return await self._call(bucket, account, msg, LedgerEvent, timeout, nonce)

    # -- reads -----------------------------------------------------------------------------------

    async def get_account(
        self, bucket: str, account: str, *, timeout: float | None = None
    ) -> AccountView:
        """The account collapsed: balance, held, available, sums and open reservations."""
        return await self._call(bucket, account, Summary(), AccountView, timeout, None)

    async def events(
        self,
        bucket: str,
        account: str,
        *,
        after: int = 0,
        limit: int = 100,
        timeout: float | None = None,
    ) -> list[LedgerEvent]:
        """Up to ``limit`` (at most 1000) of the account's events after journal
        position ``after``, oldest first (page on with the last one's ``position``)."""
        msg = ListEvents(after, limit)
        return await self._call(bucket, account, msg, list[LedgerEvent], timeout, None)

    async def get_balances(self, bucket: str, *, timeout: float | None = None) -> Balances:
        """Every account of ``bucket`` with its balance, gathered from every shard at
        once within ``timeout`` (default 2 s); ``partial`` says some shards did not
        answer in time and their accounts are missing."""
        check_bucket(bucket)
        wait = timeout or self.timeout or DEFAULT_BALANCES_TIMEOUT
        return await _mapped(gather_balances(self.sender, bucket, wait))

    # -- edges -----------------------------------------------------------------------------------

    def edges(self) -> list[EdgeStatus]:
        """Each endpoint: healthy, active, latency (an edge client's only)."""
        return self._edge().edges()

    def health(self) -> EdgeHealth:
        """Whether calls have a healthy endpoint, and which is active."""
        return self._edge().health()

    def _edge(self) -> EdgeClient:
        if not isinstance(self.sender, EdgeClient):
            raise ConfigurationError(
                "this LedgerClient sends through one Client; build it with "
                "LedgerClient.connect(endpoints, ...) to see its edges"
            )
        return self.sender

    # -- lifecycle ---------------------------------------------------------------------------------

    async def close(self) -> None:
        """Close the sender when this client owns it."""
        if self._owns_sender:
            await self.sender.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- internals --------------------------------------------------------------------------

    @staticmethod
    def _nonce(nonce: str | None) -> str:
        return uuid.uuid4().hex if nonce is None else check_nonce(nonce)

    async def _call(
        self,
        bucket: str,
        account: str,
        msg: object,
        reply: type[T],
        timeout: float | None,
        nonce: str | None,
    ) -> T:
        check_bucket(bucket)
        check_account(account)
        entity = self.sender.entity(ACCOUNT_TYPE, account_entity_id(bucket, account))
        request_id = None if nonce is None else request_id_of(bucket, account, nonce)
        return await _mapped(
            entity.call(msg, reply, timeout=timeout or self.timeout, request_id=request_id)
        )


async def _mapped(call: Awaitable[T]) -> T:
    """``call``'s result; a ledger refusal as its typed error."""
    try:
        return await call
    except RemoteHandlerError as exc:
        mapped = ledger_error(exc)
        if mapped is exc:
            raise
        raise mapped from exc
