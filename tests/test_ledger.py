"""The credit ledger on a real nats-server: events, idempotency, refusals,
reservations, expiry, balances across shards, and two clusters writing to one
account through one store."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import pytest

from clstr import Client, IdempotencyKeyReusedError, NoopMetrics, RetryPolicy
from clstr.ledger import (
    ACCOUNT_TYPE,
    ENTRY,
    HOLD,
    RELEASE,
    EventOptions,
    InsufficientFundsError,
    Journal,
    LedgerClient,
    LedgerEvent,
    LedgerRequestError,
    LedgerService,
    LedgerSettings,
    ReservationAmountError,
    ReservationClosedError,
    ReservationExpiredError,
    UnknownReservationError,
    account_entity_id,
    decode_event,
    request_id_of,
)
from clstr.ledger._fold import encode_event
from clstr.ledger._model import Post
from clstr.testing import NatsServer, TcpProxy
from clstr.transports.nats import NatsTransport

from _support import eventually

NUM_SHARDS = 8
FAST = LedgerSettings(sweep_interval=0.1, duplicate_window=30)


@dataclass
class Ledger:
    """A ledger cluster of in-process nodes, and a client of it."""

    server: NatsServer
    services: list[LedgerService]
    client: LedgerClient
    transports: list[NatsTransport]

    @property
    def journal(self) -> Journal:
        return self.services[0].journal


@contextlib.asynccontextmanager
async def ledger_cluster(
    server: NatsServer,
    node_ids: Sequence[str] = ("a", "b"),
    *,
    start: Sequence[str] | None = None,
    prefix: str = "clstr",
    store_url: str | None = None,
    settings: LedgerSettings = FAST,
) -> AsyncIterator[Ledger]:
    """Nodes with a static member list (``start``: only those run), one client."""
    transports: list[NatsTransport] = []
    services: list[LedgerService] = []
    try:
        for node_id in node_ids if start is None else start:
            transport = await NatsTransport.connect(server.url)
            transports.append(transport)
            store = transport
            if store_url is not None:
                store = await NatsTransport.connect(store_url)
                transports.append(store)
            service = LedgerService(
                transport,
                store=store,
                num_shards=NUM_SHARDS,
                node_id=f"{prefix}-{node_id}",
                prefix=prefix,
                nodes=[f"{prefix}-{n}" for n in node_ids],
                settings=settings,
            )
            await service.start()
            services.append(service)
        client_transport = await NatsTransport.connect(server.url)
        transports.append(client_transport)
        client = Client(
            client_transport,
            num_shards=NUM_SHARDS,
            prefix=prefix,
            timeout=5,
            retry=RetryPolicy(attempt_timeout=2.0),
        )
        yield Ledger(server, services, LedgerClient(client), transports)
    finally:
        for service in services:
            await service.shutdown()
        for transport in reversed(transports):
            await transport.close()


@pytest.fixture
async def server() -> AsyncIterator[NatsServer]:
    async with NatsServer(jetstream=True) as srv:
        yield srv


@pytest.fixture
async def ledger(server: NatsServer) -> AsyncIterator[Ledger]:
    async with ledger_cluster(server) as cluster:
        yield cluster


async def journal_events(journal: Journal, bucket: str, account: str) -> list[LedgerEvent]:
    """Every event of an account, read straight from the journal."""
    events = []
    position = 0
    while (found := await journal.next_after(bucket, account, position)) is not None:
        position, body = found
        events.append(decode_event(bucket, account, position, body))
    return events


async def dedupe_remembers(ledger: Ledger, bucket: str, account: str, nonce: str) -> bool:
    """Whether the journal's JetStream dedupe still knows the message id of ``nonce``.

    Asked without storing anything: the server checks a message id for a duplicate
    before it checks ``Nats-Expected-Last-Msg-Id``, so a publish expecting a last
    message id that cannot be is acknowledged as a duplicate while the id is
    remembered, and refused once it is forgotten.
    """
    import nats.js.errors

    journal = ledger.journal
    js = ledger.transports[0].nc.jetstream()
    try:
        ack = await js.publish(
            journal.subject(bucket, account),
            b"",
            stream=journal.stream(bucket),
            headers={
                "Nats-Msg-Id": journal.msg_id(bucket, account, nonce),
                "Nats-Expected-Last-Msg-Id": "no such id",
            },
        )
    except nats.js.errors.BadRequestError:
        return False
    assert ack.duplicate, ack
    return True


class TestEvents:
    async def test_an_event_returns_itself_and_the_new_balance(self, ledger: Ledger) -> None:
        """create_event appends a globally identified event whose balance is the sum of
        the account's events, and the journal holds exactly those events."""
        first = await ledger.client.create_event("credits", "ann", 100, EventOptions(note="in"))
        second = await ledger.client.create_event("credits", "ann", -30)
        assert (first.balance, second.balance) == (100, 70)
        assert (first.sequence, second.sequence) == (1, 2)
        assert first.kind == ENTRY
        assert first.note == "in"
        assert first.id.bucket == "credits"
        assert first.id.origin in {"clstr-a", "clstr-b"}
        assert first.id.epoch == 1
        assert first.id != second.id
        stored = await journal_events(ledger.journal, "credits", "ann")
        assert stored == [first, second]
        view = await ledger.client.get_account("credits", "ann")
        assert (view.balance, view.events, view.credits, view.debits) == (70, 2, 100, 30)

    async def test_a_repeated_nonce_returns_the_original_event(self, ledger: Ledger) -> None:
        """The same nonce on the same account gives back the first event, not a second;
        another account may use the same nonce."""
        options = EventOptions(nonce="pay-1")
        first = await ledger.client.create_event("credits", "ann", 10, options)
        again = await ledger.client.create_event("credits", "ann", 10, options)
        other = await ledger.client.create_event("credits", "bob", 10, options)
        assert again == first
        assert other.account == "bob"
        assert len(await journal_events(ledger.journal, "credits", "ann")) == 1

    async def test_a_nonce_used_for_another_event_is_refused(self, ledger: Ledger) -> None:
        """A nonce names one event: reusing it with another amount is id_reused."""
        await ledger.client.create_event("credits", "ann", 10, EventOptions(nonce="n1"))
        with pytest.raises(IdempotencyKeyReusedError):
            await ledger.client.create_event("credits", "ann", 99, EventOptions(nonce="n1"))

    async def test_an_event_the_snapshot_missed_is_found_by_its_nonce(self, ledger: Ledger) -> None:
        """An owner that appended to the journal and crashed before its snapshot: the
        retry of that nonce returns the event from the journal, and the balance
        counts it once (the journal is the source of truth, the snapshot a cache)."""
        await ledger.client.create_event("credits", "cy", 50)
        journal = ledger.journal
        position, _ = await journal.last("credits", "cy") or (0, b"")
        crashed = {
            "kind": ENTRY,
            "amount": 25,
            "reserved": 0,
            "balance": 75,
            "held": 0,
            "nonce": "lost-reply",
            "origin": "gone",
            "epoch": 7,
            "origin_seq": 1,
            "sequence": 2,
            "timestamp_ms": 1,
        }
        await journal.append(
            "credits",
            "cy",
            encode_event(crashed),
            expected=position,
            msg_id=journal.msg_id("credits", "cy", "lost-reply"),
        )
        retried = await ledger.client.create_event(
            "credits", "cy", 25, EventOptions(nonce="lost-reply")
        )
        assert (retried.origin, retried.epoch, retried.balance) == ("gone", 7, 75)
        after = await ledger.client.create_event("credits", "cy", 1)
        assert after.balance == 76
        assert len(await journal_events(journal, "credits", "cy")) == 3

    async def test_overdraft_is_refused_with_a_typed_error(self, ledger: Ledger) -> None:
        """A debit below the asked minimum is InsufficientFundsError and appends
        nothing; without a minimum the balance may go negative."""
        await ledger.client.create_event("credits", "dee", 20)
        with pytest.raises(InsufficientFundsError, match="below the minimum of 0"):
            await ledger.client.create_event("credits", "dee", -21, EventOptions(min_balance=0))
        assert (await ledger.client.get_account("credits", "dee")).events == 1
        negative = await ledger.client.create_event("credits", "dee", -21)
        assert negative.balance == -1

    async def test_bad_requests_are_refused_before_sending(self, ledger: Ledger) -> None:
        """A bucket name, an amount or a nonce that cannot be is a LedgerRequestError."""
        with pytest.raises(LedgerRequestError, match="bucket"):
            await ledger.client.create_event("no spaces", "ann", 1)
        with pytest.raises(LedgerRequestError, match="non-zero"):
            await ledger.client.create_event("credits", "ann", 0)
        with pytest.raises(LedgerRequestError, match="nonce"):
            await ledger.client.create_event("credits", "ann", 1, EventOptions(nonce="a b"))

    async def test_events_are_listed_in_pages(self, ledger: Ledger) -> None:
        """events() pages through an account's events by journal position."""
        for amount in range(1, 6):
            await ledger.client.create_event("credits", "eve", amount)
        page = await ledger.client.events("credits", "eve", limit=3)
        rest = await ledger.client.events("credits", "eve", after=page[-1].position)
        assert [e.amount for e in page + rest] == [1, 2, 3, 4, 5]


class TestNonceMemory:
    async def test_a_nonce_past_the_journals_dedupe_window_is_still_known(
        self, server: NatsServer
    ) -> None:
        """With a journal that deduplicates for 1 s only, a nonce repeated once
        JetStream has forgotten it, under a new request id (so that no node's reply
        cache can answer), gets the original event back from the account's own memory
        of its last nonces: the journal holds it once and the balance counts it once."""
        short = LedgerSettings(sweep_interval=0.1, duplicate_window=1.0)
        async with ledger_cluster(server, settings=short) as ledger:
            journal = ledger.journal
            first = await ledger.client.create_event(
                "credits", "ann", 10, EventOptions(nonce="pay-1")
            )
            assert await dedupe_remembers(ledger, "credits", "ann", "pay-1")
            async with asyncio.timeout(10):
                while await dedupe_remembers(ledger, "credits", "ann", "pay-1"):  # noqa: ASYNC110
                    await asyncio.sleep(0.05)  # the server's clock ends it: nothing tells us
            retry_id = request_id_of("credits", "ann", "pay-1") + ".again"
            account = ledger.client.sender.entity(ACCOUNT_TYPE, account_entity_id("credits", "ann"))
            again = await account.call(
                Post("pay-1", 10, "", None, ""), LedgerEvent, request_id=retry_id
            )
            assert again == first
            assert await journal_events(journal, "credits", "ann") == [first]
            view = await ledger.client.get_account("credits", "ann")
            assert (view.balance, view.events) == (10, 1)


class TestEpochs:
    async def test_a_restarted_node_takes_the_next_epoch_and_new_event_ids(
        self, server: NatsServer
    ) -> None:
        """A ledger node restarted under the same node id takes epoch 2 from the store:
        its sequence starts again at 1, yet every event id of the second run differs
        from every id of the first."""
        runs: list[list[LedgerEvent]] = []
        for run in (1, 2):
            async with ledger_cluster(server, ["solo"]) as ledger:
                assert ledger.services[0].epoch == run
                runs.append(
                    [await ledger.client.create_event("credits", f"acct-{n}", 1) for n in range(4)]
                )
        first, second = ({event.id for event in events} for events in runs)
        assert len(first) == len(second) == 4
        assert not first & second
        assert {(e.id.origin, e.id.epoch) for e in runs[1]} == {("clstr-solo", 2)}
        assert sorted(e.id.seq for e in runs[1]) == [e.id.seq for e in runs[0]] == [1, 2, 3, 4]


class TestReservations:
    async def test_settle_captures_once(self, ledger: Ledger) -> None:
        """A reservation holds funds; settle captures it once (the rest is given back);
        a second settle and a release after it are refused, not applied."""
        client = ledger.client
        await client.create_event("credits", "ann", 100)
        held = await client.reserve("credits", "ann", 40, ttl=60)
        assert held.event is not None
        assert (held.event.kind, held.event.available) == (HOLD, 60)
        settled = await client.settle("credits", "ann", held.id, amount=25)
        assert (settled.amount, settled.balance, settled.held) == (-25, 75, 0)
        with pytest.raises(ReservationClosedError, match="settled already"):
            await client.settle("credits", "ann", held.id)
        with pytest.raises(ReservationClosedError):
            await client.release("credits", "ann", held.id)
        view = await client.get_account("credits", "ann")
        assert (view.balance, view.held, view.available, view.reservations) == (75, 0, 75, [])

    async def test_release_gives_the_amount_back(self, ledger: Ledger) -> None:
        """release cancels a reservation; settling it afterwards is refused."""
        client = ledger.client
        await client.create_event("credits", "bob", 10)
        held = await client.reserve("credits", "bob", 10, ttl=60)
        released = await client.release("credits", "bob", held.id)
        assert (released.kind, released.reason, released.available) == (RELEASE, "released", 10)
        with pytest.raises(ReservationClosedError, match="released already"):
            await client.settle("credits", "bob", held.id)

    async def test_reservations_refuse_what_they_cannot_do(self, ledger: Ledger) -> None:
        """A hold beyond the available balance, a capture beyond the hold and an unknown
        reservation are each refused with their own error."""
        client = ledger.client
        await client.create_event("credits", "cy", 10)
        with pytest.raises(InsufficientFundsError):
            await client.reserve("credits", "cy", 11, ttl=60)
        held = await client.reserve("credits", "cy", 5, ttl=60)
        with pytest.raises(ReservationAmountError):
            await client.settle("credits", "cy", held.id, amount=6)
        with pytest.raises(UnknownReservationError):
            await client.settle("credits", "cy", "nope")

    async def test_an_expired_reservation_releases_itself(self, ledger: Ledger) -> None:
        """Past its expiry a reservation holds nothing, the sweeper appends its release
        without anyone touching the account, and settling it is refused."""
        client = ledger.client
        await client.create_event("credits", "dee", 10)
        held = await client.reserve("credits", "dee", 10, ttl=0.2)

        async def released() -> bool:
            events = await client.events("credits", "dee")
            return events[-1].kind == RELEASE

        async with asyncio.timeout(10):
            while not await released():  # noqa: ASYNC110 - the journal is polled, as a client would
                await asyncio.sleep(0.05)
        last = (await client.events("credits", "dee"))[-1]
        assert (last.reason, last.reservation, last.available) == ("expired", held.id, 10)
        with pytest.raises(ReservationExpiredError):
            await client.settle("credits", "dee", held.id)


class TestBalances:
    async def test_balances_of_every_shard(self, ledger: Ledger) -> None:
        """get_balances gathers every account of the bucket from every shard (both
        nodes), with reservations counted and other buckets left out."""
        client = ledger.client
        for n in range(12):
            await client.create_event("credits", f"acct-{n}", n + 1)
        await client.create_event("other", "acct-0", 1000)
        await client.reserve("credits", "acct-11", 2, ttl=60)
        balances = await client.get_balances("credits")
        assert not balances.partial
        assert balances.shards == NUM_SHARDS
        assert [r.account for r in balances.accounts] == sorted(f"acct-{n}" for n in range(12))
        assert balances.total == sum(range(1, 13))
        last = next(r for r in balances.accounts if r.account == "acct-11")
        assert (last.balance, last.held, last.available) == (12, 2, 10)
        assert (await client.get_balances("nobody")).accounts == []

    async def test_a_shard_that_does_not_answer_is_flagged(self, server: NatsServer) -> None:
        """With one of two nodes down, get_balances returns within its time what the
        other node's shards hold and flags the rest as missing."""
        async with ledger_cluster(server, start=["a", "b"]) as full:
            for n in range(10):
                await full.client.create_event("credits", f"acct-{n}", 1)
        async with ledger_cluster(server, start=["a"]) as half:
            loop = asyncio.get_running_loop()
            started = loop.time()
            balances = await half.client.get_balances("credits", timeout=1.0)
            assert loop.time() - started < 2.0
            owned = set(half.services[0].sharding.nodes["default"].shards)
            assert balances.partial
            assert set(balances.missing_shards) == set(range(NUM_SHARDS)) - owned
            runtime = half.services[0].runtime
            expected = {
                f"acct-{n}" for n in range(10) if runtime.shard_of("credits", f"acct-{n}") in owned
            }
            assert {r.account for r in balances.accounts} == expected


class TestTwoClusters:
    async def test_two_clusters_on_one_store_append_each_event_once(
        self, server: NatsServer
    ) -> None:
        """Two clusters (other subject prefixes, own nodes) share one store: writers on
        both append to the same accounts at once, some with the same nonces; every
        event is in the journal once, in order, and the balance is their sum."""
        async with (
            ledger_cluster(server, prefix="east") as east,
            ledger_cluster(server, prefix="west") as west,
        ):
            clients = [east.client, west.client]

            async def writer(n: int) -> None:
                for i in range(15):
                    client = clients[(n + i) % 2]
                    nonce = EventOptions(nonce=f"w{n % 3}-{i}")  # writers 0 and 3 collide
                    await client.create_event("credits", "shared", 1 + n % 3, nonce)

            await asyncio.gather(*(writer(n) for n in range(6)))
            events = await journal_events(east.journal, "credits", "shared")
            nonces = [e.nonce for e in events]
            assert len(nonces) == len(set(nonces)) == 3 * 15
            assert [e.sequence for e in events] == list(range(1, 46))
            running = 0
            for event in events:
                running += event.amount
                assert event.balance == running
            assert {e.origin.split("-")[0] for e in events} == {"east", "west"}
            for client in clients:
                view = await client.get_account("credits", "shared")
                assert view.balance == running

    async def test_a_snapshot_behind_the_journal_loses_nothing(self, server: NatsServer) -> None:
        """With snapshots every 5 events, another cluster's owner loads a snapshot two
        events behind the journal: it folds them in (balance, events), knows their
        nonces, and appends after them."""
        lagging = LedgerSettings(snapshot_every=5, sweep_interval=0.1)
        async with ledger_cluster(server, prefix="east", settings=lagging) as east:
            made = [
                await east.client.create_event("credits", "lag", n, EventOptions(nonce=f"e{n}"))
                for n in range(1, 8)
            ]
            async with ledger_cluster(server, prefix="west") as west:
                view = await west.client.get_account("credits", "lag")
                assert (view.balance, view.events) == (28, 7)
                again = await west.client.create_event(
                    "credits", "lag", 7, EventOptions(nonce="e7")
                )
                assert again == made[-1]
                after = await west.client.create_event("credits", "lag", 2)
                assert (after.sequence, after.balance) == (8, 30)


class _Retries(NoopMetrics):
    """Counts the client's retries by reason."""

    def __init__(self) -> None:
        self.reasons: Counter[str] = Counter()

    def request_retried(self, message_type: str, reason: str) -> None:
        self.reasons[reason] += 1


class TestStore:
    async def test_an_append_the_store_did_not_confirm_is_found_by_its_retry(
        self, server: NatsServer
    ) -> None:
        """The store takes an append but its confirmations are held: the owner answers
        not_owner (retryable, not kept) after store_timeout, the client sends the
        same request again, and once the store answers the retry returns the event
        that landed; the journal holds the nonce once."""
        async with TcpProxy(server.host, server.port) as proxy:
            transport = await NatsTransport.connect(server.url)
            store = await NatsTransport.connect(proxy.url)
            service = LedgerService(
                transport,
                store=store,
                num_shards=NUM_SHARDS,
                node_id="n1",
                settings=LedgerSettings(store_timeout=0.3),
            )
            retries = _Retries()
            client = Client(
                transport,
                num_shards=NUM_SHARDS,
                timeout=15,
                retry=RetryPolicy(attempt_timeout=2.0, max_backoff=0.1),
                metrics=retries,
            )
            ledger = LedgerClient(client)
            try:
                await service.start()
                await ledger.create_event("credits", "ann", 10)
                proxy.stall(upstream=False)  # appends reach the store; its answers wait
                call = asyncio.ensure_future(
                    ledger.create_event("credits", "ann", 5, EventOptions(nonce="slow-1"))
                )
                await eventually(lambda: retries.reasons["not_owner"] >= 1, 10)
                assert not call.done()
                proxy.resume()
                event = await call
                assert (event.nonce, event.balance) == ("slow-1", 15)
                events = await journal_events(service.journal, "credits", "ann")
                assert [e.nonce for e in events].count("slow-1") == 1
            finally:
                proxy.resume()
                await service.shutdown()
                await store.close()
                await transport.close()
