"""The ledger's invariants under churn: concurrent clients doing credits, debits,
reserve/settle/release and repeats while ledger node processes (``clstr ledger
serve``) are SIGKILLed, a new one joins and a killed one comes back under its
old id. Afterwards, read straight from the journal: every balance is the sum of
its events, no reservation was closed twice, every acknowledged event is there,
no nonce has two events and no event id is used twice."""

from __future__ import annotations

import asyncio
import contextlib
import random
import statistics
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial

import pytest

from clstr import Client, NoopMetrics, RequestError, RetryPolicy
from clstr.cli._ledger_serve import serve_argv
from clstr.hashing import assign_shards
from clstr.ledger import (
    ACCOUNT_TYPE,
    ENTRY,
    HOLD,
    RELEASE,
    EventOptions,
    Journal,
    LedgerClient,
    LedgerError,
    LedgerEvent,
    LedgerSettings,
    ReservationClosedError,
    account_entity_id,
    decode_event,
)
from clstr.protocol import entity_key
from clstr.testing import NatsServer, NodeProcess
from clstr.transports.nats import NatsTransport

from _support import eventually

NUM_SHARDS = 16
BUCKET = "churn"
ACCOUNTS = [f"acct-{n}" for n in range(16)]
WORKERS = 8


Redo = Callable[[], Awaitable[LedgerEvent]]


@dataclass
class Book:
    """What the clients were told."""

    acked: dict[tuple[str, str], LedgerEvent] = field(default_factory=dict)  # (account, nonce)
    unknown: list[Redo] = field(default_factory=list)  # outcome unknown: the call to redo
    open_holds: dict[str, tuple[str, int]] = field(default_factory=dict)  # id -> account, amount
    closed: dict[str, str] = field(default_factory=dict)  # reservation id -> account
    refused: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    repeats: int = 0

    def record(self, event: LedgerEvent) -> None:
        key = (event.account, event.nonce)
        previous = self.acked.get(key)
        assert previous is None or previous == event, f"nonce {key} answered twice differently"
        self.acked[key] = event


async def worker(n: int, ledger: LedgerClient, book: Book, stop: asyncio.Event) -> None:
    rng = random.Random(n)
    serial = 0
    while not stop.is_set():
        serial += 1
        nonce = f"w{n}-{serial}"
        account = rng.choice(ACCOUNTS)
        roll = rng.random()
        redo: Redo | None = None  # the very same call again (same nonce, same payload)
        if roll < 0.35:
            credit = EventOptions(nonce=nonce)
            redo = partial(ledger.create_event, BUCKET, account, rng.randint(1, 50), credit)
        elif roll < 0.6:
            debit = EventOptions(nonce=nonce, min_balance=0)
            redo = partial(ledger.create_event, BUCKET, account, -rng.randint(1, 40), debit)
        elif roll < 0.75:
            amount, ttl = rng.randint(1, 20), rng.uniform(0.3, 4)

            async def reserve(
                account: str = account, amount: int = amount, ttl: float = ttl, nonce: str = nonce
            ) -> LedgerEvent:
                held = await ledger.reserve(BUCKET, account, amount, ttl=ttl, nonce=nonce)
                assert held.event is not None
                book.open_holds[held.id] = (account, held.amount)
                return held.event

            redo = reserve
        elif roll < 0.92 and book.open_holds:
            reservation = rng.choice(sorted(book.open_holds))
            account, amount = book.open_holds.pop(reservation)
            capture = rng.randint(1, amount) if rng.random() < 0.6 else None

            async def close(
                account: str = account,
                reservation: str = reservation,
                capture: int | None = capture,
                nonce: str = nonce,
            ) -> LedgerEvent:
                try:
                    if capture is not None:
                        event = await ledger.settle(
                            BUCKET, account, reservation, amount=capture, nonce=nonce
                        )
                    else:
                        event = await ledger.release(BUCKET, account, reservation, nonce=nonce)
                except LedgerError:
                    book.closed[reservation] = account  # it expired first: closed all the same
                    raise
                book.closed[reservation] = account
                return event

            redo = close
        elif book.closed and roll < 0.96:
            # A second settle of a closed reservation must be refused, never applied.
            reservation, account = rng.choice(sorted(book.closed.items()))
            try:
                await ledger.settle(BUCKET, account, reservation, amount=1, nonce=nonce)
            except ReservationClosedError:
                book.refused["second settle"] += 1
                continue
            except (LedgerError, RequestError):
                continue  # an unknown reservation (expired long ago), or the churn
            raise AssertionError(f"reservation {reservation} settled twice")
        elif book.acked:
            # A repeat of an acknowledged nonce returns its original event.
            (account, old), original = rng.choice(sorted(book.acked.items()))
            if original.kind != ENTRY or original.reservation:
                continue
            try:
                again = await ledger.create_event(
                    BUCKET, account, original.amount, EventOptions(nonce=old)
                )
            except RequestError:
                continue
            assert again == original, f"repeat of {old} gave {again}, not {original}"
            book.repeats += 1
            continue
        if redo is None:
            continue
        started = time.perf_counter()
        try:
            event = await redo()
        except LedgerError as exc:
            book.refused[type(exc).__name__] += 1  # no funds, or an expiry beat a settle
            continue
        except RequestError:
            book.unknown.append(redo)
            continue
        book.latencies.append(time.perf_counter() - started)
        book.record(event)


async def read_journal(journal: Journal) -> dict[str, list[LedgerEvent]]:
    """Every event of the bucket, per account, straight from JetStream."""
    found: dict[str, list[LedgerEvent]] = {}
    for account in await journal.accounts(BUCKET):
        events = found[account] = []
        position = 0
        while (hit := await journal.next_after(BUCKET, account, position)) is not None:
            position, body = hit
            events.append(decode_event(BUCKET, account, position, body))
    return found


class Retries(NoopMetrics):
    """Counts the client's retries by reason (a request sent again, same id)."""

    def __init__(self) -> None:
        self.reasons: Counter[str] = Counter()

    def request_retried(self, message_type: str, reason: str) -> None:
        self.reasons[reason] += 1


def shard_of(account: str) -> int:
    from clstr.hashing import shard_for_key

    return shard_for_key(entity_key(ACCOUNT_TYPE, account_entity_id(BUCKET, account)), NUM_SHARDS)


@pytest.mark.timeout(120)
async def test_invariants_hold_through_kills_and_joins() -> None:
    """Eight clients write while two nodes are SIGKILLed, one joins and one of the
    killed comes back under its old id; the journal then shows, per account,
    contiguous events whose running sums are the stored balances and held amounts
    (and what get_account and get_balances say), each reservation held once and
    closed at most once, every acknowledged event in place, each nonce once, and
    every event id once (the returning node's two runs in two epochs)."""
    processes: dict[str, NodeProcess] = {}
    async with NatsServer(jetstream=True) as server:

        async def start(node_id: str) -> None:
            argv = serve_argv(
                node_id,
                server.url,
                num_shards=NUM_SHARDS,
                heartbeat_ttl=1.0,
                sweep_interval=0.2,
            )
            process = NodeProcess.from_argv(node_id, argv)
            processes[node_id] = process
            await process.start()
            await process.wait_ready()

        transport = await NatsTransport.connect(server.url)
        retry = RetryPolicy(attempt_timeout=1.0, max_backoff=0.2)
        retries = Retries()
        client = Client(transport, num_shards=NUM_SHARDS, timeout=20, retry=retry, metrics=retries)
        ledger = LedgerClient(client)
        book = Book()
        stop = asyncio.Event()
        recovery: list[float] = []
        try:
            await asyncio.gather(*(start(n) for n in ("n1", "n2", "n3")))
            live = {"n1", "n2", "n3"}
            for account in ACCOUNTS:  # some money to spend
                book.record(await ledger.create_event(BUCKET, account, 100))
            started = time.perf_counter()
            workers = [asyncio.ensure_future(worker(n, ledger, book, stop)) for n in range(WORKERS)]

            async def acked_past(count: int) -> None:
                await eventually(lambda: len(book.acked) >= count, 30)

            async def kill(node_id: str) -> None:
                owned = assign_shards(sorted(live), NUM_SHARDS)
                probe = next(a for a in ACCOUNTS if owned[shard_of(a)] == node_id)
                killed_at = time.perf_counter()
                await processes[node_id].kill()
                live.discard(node_id)
                # Crash -> its accounts served again: the first write on one of them.
                book.record(await ledger.create_event(BUCKET, probe, 1))
                recovery.append(time.perf_counter() - killed_at)

            await acked_past(len(book.acked) + 150)
            await kill("n2")
            await acked_past(len(book.acked) + 150)
            await start("n4")
            live.add("n4")
            await acked_past(len(book.acked) + 150)
            await kill("n3")
            await acked_past(len(book.acked) + 150)
            await start("n2")  # back under its old id: a new epoch keeps its event ids new
            live.add("n2")
            await acked_past(len(book.acked) + 150)
            stop.set()
            await asyncio.gather(*workers)
            elapsed = time.perf_counter() - started

            # Outcomes the clients never learned: the same nonce again settles them.
            for redo in book.unknown:
                # Refused now (closed or expired meanwhile): nothing was applied twice.
                with contextlib.suppress(LedgerError):
                    book.record(await redo())

            journal_transport = await NatsTransport.connect(server.url)
            try:
                events = await read_journal(Journal(journal_transport, LedgerSettings()))
            finally:
                await journal_transport.close()
            balances = await ledger.get_balances(BUCKET, timeout=5)
            rows = {row.account: row for row in balances.accounts}
            assert not balances.partial
            total_events = 0
            for account, history in events.items():
                total_events += len(history)
                assert [e.sequence for e in history] == list(range(1, len(history) + 1))
                balance = held = 0
                holds: Counter[str] = Counter()
                closes: Counter[str] = Counter()
                for event in history:
                    balance += event.amount
                    held += event.reserved
                    assert (event.balance, event.held) == (balance, held), event
                    assert held >= 0
                    if event.kind == HOLD:
                        holds[event.reservation] += 1
                    elif event.reservation and event.kind in (ENTRY, RELEASE):
                        closes[event.reservation] += 1
                assert all(count == 1 for count in holds.values()), holds
                assert all(count == 1 for count in closes.values()), f"closed twice: {closes}"
                assert set(closes) <= set(holds)
                nonces = Counter(e.nonce for e in history)
                assert nonces.most_common(1)[0][1] == 1, f"a nonce with two events: {nonces}"
                view = await ledger.get_account(BUCKET, account)
                assert view.balance == balance == rows[account].balance
            everything = [e for h in events.values() for e in h]
            ids = Counter(e.id for e in everything)
            assert ids.most_common(1)[0][1] == 1, f"an event id twice: {ids.most_common(3)}"
            assert {e.id.epoch for e in everything if e.id.origin == "n2"} == {1, 2}
            by_position = {(e.account, e.position): e for e in everything}
            for (account, _), acked in book.acked.items():
                assert by_position.get((account, acked.position)) == acked, f"lost: {acked}"
        finally:
            stop.set()
            await client.close()
            await transport.close()
            for process in processes.values():
                if process.pid is not None:
                    await process.kill()
    latencies = sorted(book.latencies)
    p50 = statistics.median(latencies) * 1000
    p99 = latencies[int(len(latencies) * 0.99) - 1] * 1000
    print(
        f"\nchurn: {len(book.acked)} acknowledged ops, {total_events} events in the journal, "
        f"{len(book.acked) / elapsed:.0f} ops/s over {elapsed:.1f} s with 2 kills, a join and "
        "a rejoin; "
        f"latency p50 {p50:.1f} ms, p99 {p99:.1f} ms; {book.repeats} repeats answered with "
        f"their original; refused {dict(book.refused)}; {len(book.unknown)} outcomes unknown "
        f"then settled by their nonce; retried under the same id {dict(retries.reasons)}; "
        f"crash -> account served again: "
        f"{', '.join(f'{r:.2f} s' for r in recovery)}"
    )
