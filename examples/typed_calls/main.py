"""Typed request/response with dataclasses, and the errors a caller handles.

A small bank: each account is a key, so the node that owns the account runs
its operations one at a time, in order. It shows:

* dataclass payloads and replies (nested dataclasses and lists included);
* ``message_type`` class attributes naming the wire type (default: class name);
* a handler that takes the envelope too, to read a header;
* ``validate()`` on a payload, run by the client before anything is sent
  (a failure raises ``PayloadError``);
* the errors a node sends back, each its own exception class:
  ``RemoteHandlerError`` (the handler raised), ``NoHandlerError`` (nobody
  handles that type) and ``HandlerTimeoutError`` (the handler ran past the
  call's deadline and was cancelled).

Run it:  python examples/typed_calls/main.py
"""

import asyncio
import logging
import sys
from dataclasses import dataclass, field
from typing import ClassVar

import structlog

from clstr import (
    Client,
    Envelope,
    HandlerTimeoutError,
    MemoryTransport,
    Node,
    NoHandlerError,
    PayloadError,
    RemoteHandlerError,
    Router,
    with_header,
)


@dataclass
class Deposit:
    message_type: ClassVar[str] = "bank.deposit"

    amount: int

    def validate(self) -> None:
        """Called by the client before sending; raising stops the call."""
        if self.amount <= 0:
            raise ValueError(f"amount must be positive, got {self.amount}")


@dataclass
class Withdraw:
    message_type: ClassVar[str] = "bank.withdraw"

    amount: int


@dataclass
class GetStatement:
    message_type: ClassVar[str] = "bank.statement"

    last: int = 10


@dataclass
class Audit:
    """A slow report: used to show a handler running past the deadline."""

    message_type: ClassVar[str] = "bank.audit"


@dataclass
class Close:
    """A type no node handles."""

    message_type: ClassVar[str] = "bank.close"


@dataclass
class Entry:
    amount: int
    note: str = ""


@dataclass
class Balance:
    account: str
    balance: int


@dataclass
class Statement:
    account: str
    balance: int
    entries: list[Entry] = field(default_factory=list)


class InsufficientFunds(Exception):
    pass


def bank() -> Router:
    """The handler every node runs. Per-key FIFO makes one account's operations
    sequential, so the ledgers need no lock."""
    ledgers: dict[str, list[Entry]] = {}
    router = Router()

    def account_of(env: Envelope) -> tuple[str, list[Entry]]:
        assert env.key is not None  # every call below is sent with client.key(...)
        return env.key, ledgers.setdefault(env.key, [])

    @router.on(Deposit)
    async def deposit(msg: Deposit, env: Envelope) -> Balance:
        account, ledger = account_of(env)
        ledger.append(Entry(msg.amount, env.header("note") or ""))
        return Balance(account, sum(e.amount for e in ledger))

    @router.on(Withdraw)
    async def withdraw(msg: Withdraw, env: Envelope) -> Balance:
        account, ledger = account_of(env)
        balance = sum(e.amount for e in ledger)
        if msg.amount > balance:
            raise InsufficientFunds(f"{account} has {balance}, cannot withdraw {msg.amount}")
        ledger.append(Entry(-msg.amount, "withdrawal"))
        return Balance(account, balance - msg.amount)

    @router.on(GetStatement)
    async def statement(msg: GetStatement, env: Envelope) -> Statement:
        account, ledger = account_of(env)
        return Statement(account, sum(e.amount for e in ledger), ledger[-msg.last :])

    @router.on(Audit)
    async def audit(msg: Audit) -> None:
        await asyncio.sleep(30)  # far past any caller's deadline

    return router


async def main() -> None:
    network = MemoryTransport()
    async with (
        Node(network.connect("node"), bank(), node_id="node-1", num_shards=8),
        Client(network.connect("client"), num_shards=8, timeout=2.0) as client,
    ):
        acct = client.key("acct-42")

        balance = await acct.call(Deposit(100), Balance, options=[with_header("note", "salary")])
        print(f"deposit 100      -> {balance}")
        balance = await acct.call(Withdraw(30), Balance)
        print(f"withdraw 30      -> {balance}")
        statement = await acct.call(GetStatement(), Statement)
        print(f"statement        -> {statement}")

        try:
            await acct.call(Deposit(-5), Balance)
        except PayloadError as exc:
            print(f"deposit -5       -> PayloadError (nothing sent): {exc}")

        try:
            await acct.call(Withdraw(1_000), Balance)
        except RemoteHandlerError as exc:
            print(
                f"withdraw 1000    -> RemoteHandlerError: remote_type={exc.remote_type}, "
                f"remote_message={exc.remote_message!r}"
            )

        try:
            await acct.call(Close(), Balance)
        except NoHandlerError as exc:
            # Every error a node sends back is a RequestError; `retryable` says
            # whether the same call can succeed later (no owner, overloaded).
            print(f"close            -> NoHandlerError (retryable={exc.retryable}): {exc}")

        try:
            await acct.call(Audit(), Balance, timeout=0.2)
        except HandlerTimeoutError as exc:
            print(f"audit (0.2s)     -> HandlerTimeoutError: {exc}")

        statement = await acct.call(GetStatement(last=5), Statement)
        print(f"final balance    -> {statement.balance}")


if __name__ == "__main__":
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )
    asyncio.run(main())
