"""Snowflake ids: the layout, the generator on a fake clock, and machine-id leases
on a real nats-server (one per session; each test has a bucket prefix of its own)."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest
import pytest_asyncio
from structlog.testing import capture_logs

from clstr import ConfigurationError, MemoryNetwork, Node
from clstr.errors import (
    IdUnavailableError,
    InvalidIdError,
    MachineIdUnavailableError,
)
from clstr.ids import (
    EPOCH,
    EPOCH_MS,
    MAX_MACHINE_ID,
    LeaseSettings,
    LocalMachineIds,
    MachineIdLease,
    MachineIdSource,
    Snowflake,
    StaticMachineId,
    node_snowflake,
    parse_snowflake,
)
from clstr.testing import NatsServer, TcpProxy
from clstr.transports.jetstream import open_bucket, stop_watcher
from clstr.transports.nats import NatsOptions, NatsTransport

# A 2 s TTL: short for fast tests, long enough that a loaded CI machine renews
# in time (see test_membership.py).
FAST = LeaseSettings(ttl=2.0, renew_interval=0.25, lease_fraction=0.6)

MS = 1_000_000  # ns
T0 = EPOCH_MS + 500 * 86_400_000  # some day in 2026, in Unix ms


class FakeClock:
    """A wall clock and a monotonic clock that move only when told (ns)."""

    def __init__(self, wall_ms: int = T0) -> None:
        self.wall = wall_ms * MS
        self.mono = 10**12

    def wall_ns(self) -> int:
        return self.wall

    def monotonic_ns(self) -> int:
        return self.mono

    def advance(self, ms: int) -> None:
        """Time passes: both clocks move."""
        self.wall += ms * MS
        self.mono += ms * MS

    def step_wall(self, ms: int) -> None:
        """The wall clock alone jumps (an NTP step, a VM restored)."""
        self.wall += ms * MS

    def snowflake(self, machine: MachineIdSource | int = 1, **kwargs: Any) -> Snowflake:
        return Snowflake(machine, wall_ns=self.wall_ns, monotonic_ns=self.monotonic_ns, **kwargs)


def increasing(ids: list[int]) -> bool:
    return all(a < b for a, b in itertools.pairwise(ids))


# -- the layout ----------------------------------------------------------------


class TestLayout:
    def test_parse_gives_back_time_machine_and_sequence(self) -> None:
        """An id parses back into the millisecond, machine id and sequence it was made of."""
        clock = FakeClock()
        ids = clock.snowflake(StaticMachineId(713))
        made = [ids.next_id() for _ in range(3)]
        parts = [parse_snowflake(i) for i in made]
        assert [p.sequence for p in parts] == [0, 1, 2]
        assert {p.machine_id for p in parts} == {713}
        assert {p.timestamp_ms for p in parts} == {T0}
        assert parts[0].datetime == datetime.fromtimestamp(T0 / 1000, UTC)
        assert parts[0].id == made[0]
        assert made[0] == ((T0 - EPOCH_MS) << 22) | (713 << 12)

    def test_the_epoch_and_the_range_are_the_documented_ones(self) -> None:
        """Id 0 is the clstr epoch (2025-01-01Z) and the largest id falls in 2094-09-07."""
        assert datetime(2025, 1, 1, tzinfo=UTC) == EPOCH
        assert int(EPOCH.timestamp() * 1000) == EPOCH_MS
        assert parse_snowflake(0).datetime == EPOCH
        last = parse_snowflake(2**63 - 1)
        assert last.datetime.date().isoformat() == "2094-09-07"
        assert (last.machine_id, last.sequence) == (MAX_MACHINE_ID, 4095)

    @pytest.mark.parametrize("bad", [-1, 2**63, 2**64 - 1, True, "12", 1.0, None])
    def test_parse_refuses_what_is_not_an_id(self, bad: object) -> None:
        """Negative values, values over 63 bits and non-ints raise InvalidIdError (a ValueError)."""
        with pytest.raises(InvalidIdError) as info:
            parse_snowflake(bad)  # type: ignore[arg-type]
        assert isinstance(info.value, ValueError)

    @pytest.mark.parametrize("bad", [-1, 1024, True])
    def test_machine_ids_outside_ten_bits_are_refused(self, bad: int) -> None:
        """A machine id outside 0..1023 is a ConfigurationError, for a static id and a generator."""
        with pytest.raises(ConfigurationError, match="machine id"):
            StaticMachineId(bad)
        with pytest.raises(ConfigurationError, match="machine id"):
            Snowflake(bad)


# -- the generator -----------------------------------------------------------------


class TestGenerator:
    def test_ids_strictly_increase_on_the_real_clock(self) -> None:
        """200,000 ids from one generator on the real clocks strictly increase (so are unique)."""
        ids = Snowflake(5)
        made = [ids.next_id() for _ in range(200_000)]
        assert increasing(made)
        assert {parse_snowflake(i).machine_id for i in made} == {5}

    def test_4096_ids_fit_in_one_millisecond(self) -> None:
        """One millisecond holds sequences 0..4095 without borrowing: 4096 ids/ms per node."""
        clock = FakeClock()
        ids = clock.snowflake()
        made = [ids.next_id() for _ in range(4096)]
        assert {parse_snowflake(i).timestamp_ms for i in made} == {T0}
        assert [parse_snowflake(i).sequence for i in made] == list(range(4096))
        assert ids.lead() == 0

    def test_a_spent_sequence_borrows_the_next_millisecond(self) -> None:
        """The 4097th id of a millisecond is sequence 0 of the next one, before the
        clock gets there."""
        clock = FakeClock()
        ids = clock.snowflake()
        made = [ids.next_id() for _ in range(4097)]
        last = parse_snowflake(made[-1])
        assert (last.timestamp_ms, last.sequence) == (T0 + 1, 0)
        assert increasing(made)
        assert ids.lead() == 0.001
        clock.advance(1)
        assert ids.lead() == 0
        assert parse_snowflake(ids.next_id()).timestamp_ms == T0 + 1

    def test_borrowing_stops_at_max_lead_until_the_clock_catches_up(self) -> None:
        """With the clock still, ids borrow up to max_lead ms ahead, then next_id raises;
        once the clock moves on, ids resume and still increase."""
        clock = FakeClock()
        ids = clock.snowflake(max_lead=0.002)
        made = [ids.next_id() for _ in range(3 * 4096)]  # T0, T0+1, T0+2
        assert parse_snowflake(made[-1]).timestamp_ms == T0 + 2
        with pytest.raises(IdUnavailableError, match="ahead of the clock"):
            ids.next_id()
        with pytest.raises(IdUnavailableError):  # state unchanged by the refusal
            ids.next_id()
        clock.advance(1)
        following = [ids.next_id() for _ in range(4096)]
        assert parse_snowflake(following[-1]).timestamp_ms == T0 + 3
        assert increasing(made + following)

    def test_a_clock_stepping_back_never_takes_ids_back(self) -> None:
        """After the wall clock steps back 5 s, ids go on increasing and unique, their
        millisecond never goes back and keeps moving at half pace, and once the wall
        clock has caught up ids follow it again."""
        clock = FakeClock()
        ids = clock.snowflake()
        made = [ids.next_id() for _ in range(10)]
        clock.step_wall(-5000)
        stamps = []
        for _ in range(200):  # 200 ms of real time, 50 ids each
            clock.advance(1)
            batch = [ids.next_id() for _ in range(50)]
            made += batch
            stamps.append(parse_snowflake(batch[-1]).timestamp_ms)
        assert increasing(made)
        assert min(stamps) >= T0
        assert stamps[-1] == T0 + 100  # half of the 200 ms that passed
        # Far more ids than one frozen millisecond holds, without an error:
        # a step back is not borrowing.
        assert len(made) > 4096
        clock.advance(10_000)  # the wall clock is past where the ids got to
        now = parse_snowflake(ids.next_id()).timestamp_ms
        assert now == clock.wall // MS
        assert ids.lead() == 0

    def test_a_frozen_clock_after_a_step_back_still_borrows_within_max_lead(self) -> None:
        """A step back larger than max_lead is not counted as lead: only borrowed ms are."""
        clock = FakeClock()
        ids = clock.snowflake(max_lead=0.001)
        first = ids.next_id()
        clock.step_wall(-60_000)
        made = [ids.next_id() for _ in range(2 * 4096 - 1)]  # the rest of T0, then T0+1
        assert parse_snowflake(made[-1]).timestamp_ms == T0 + 1
        with pytest.raises(IdUnavailableError):
            ids.next_id()
        assert increasing([first, *made])

    def test_a_clock_stepping_forward_is_followed(self) -> None:
        """A forward step of the wall clock moves ids forward with it."""
        clock = FakeClock()
        ids = clock.snowflake()
        a = ids.next_id()
        clock.step_wall(3_600_000)
        b = ids.next_id()
        assert b > a
        assert parse_snowflake(b).timestamp_ms == T0 + 3_600_000

    def test_a_clock_outside_the_41_bit_range_is_refused(self) -> None:
        """A wall clock before the clstr epoch raises IdUnavailableError naming the clock."""
        clock = FakeClock(wall_ms=0)
        with pytest.raises(IdUnavailableError, match="fix the system clock"):
            clock.snowflake().next_id()

    def test_a_new_machine_id_keeps_ids_increasing(self) -> None:
        """When the source hands a new machine id (a lower one) within a millisecond, the
        next id moves to a fresh millisecond and still sorts after the previous ones."""

        class Switching:
            machine = 900

            def machine_id(self, ms: int) -> int:
                return self.machine

        source = Switching()
        clock = FakeClock()
        ids = clock.snowflake(source)
        before = [ids.next_id() for _ in range(5)]
        source.machine = 5
        clock.advance(1)  # the source is asked once per millisecond
        after = ids.next_id()
        parts = parse_snowflake(after)
        assert (parts.machine_id, parts.timestamp_ms) == (5, T0 + 1)
        source.machine = 6
        later = ids.next_id()  # same wall ms: the machine id is read at the next ms
        assert parse_snowflake(later).machine_id == 5
        clock.advance(1)
        assert parse_snowflake(ids.next_id()).machine_id == 6
        assert increasing([*before, after, later])

    def test_no_id_is_issued_once_the_machine_id_is_gone(self) -> None:
        """A released machine id stops the generator at the next millisecond, and the
        fast path cannot slip an id out in the millisecond it already served."""
        pool = LocalMachineIds()
        local = pool.take()
        clock = FakeClock()
        ids = clock.snowflake(local)
        ids.next_id()
        local.release()
        clock.advance(1)
        with pytest.raises(MachineIdUnavailableError, match="released"):
            ids.next_id()
        clock.step_wall(-1)  # back to the millisecond of the last id
        with pytest.raises(MachineIdUnavailableError):
            ids.next_id()

    def test_a_source_must_be_a_machine_id_source(self) -> None:
        """Passing something that is neither an int nor a MachineIdSource is refused."""
        with pytest.raises(ConfigurationError, match="MachineIdSource"):
            Snowflake("7")  # type: ignore[arg-type]
        with pytest.raises(ConfigurationError, match="max_lead"):
            Snowflake(1, max_lead=-1)


class TestLocalMachineIds:
    def test_holders_get_distinct_ids_and_released_ones_come_back(self) -> None:
        """No two holders get one id; a released id is handed out again, lowest first."""
        pool = LocalMachineIds()
        held = [pool.take() for _ in range(5)]
        assert [h.held for h in held] == [0, 1, 2, 3, 4]
        held[1].release()
        held[1].release()  # idempotent
        assert pool.take().held == 1
        assert pool.held == {0, 1, 2, 3, 4}

    def test_a_full_range_is_a_clear_error(self) -> None:
        """When every id of the range is held, take() raises MachineIdUnavailableError."""
        pool = LocalMachineIds(first=10, last=11)
        with pool.take(), pool.take(), pytest.raises(MachineIdUnavailableError, match=r"10\.\.11"):
            pool.take()
        assert pool.held == frozenset()
        with pytest.raises(ConfigurationError):
            LocalMachineIds(first=5, last=4)

    def test_the_next_holder_of_an_id_starts_after_its_last_use(self) -> None:
        """An id released in millisecond T is handed out again only after T if another
        is free, and its next holder cannot issue in T or before: no id repeats across
        holders on one clock."""
        clock = FakeClock()
        pool = LocalMachineIds(first=0, last=1, wall_ns=clock.wall_ns)
        first = pool.take()
        ids = clock.snowflake(first)
        before = [ids.next_id() for _ in range(10)]
        first.release()
        second = pool.take()
        assert second.held == 1  # 0 was used in this very millisecond
        clock.snowflake(second).next_id()
        second.release()
        again = pool.take()  # both ids used in this ms: the lowest, with its floor
        assert again.held == 0
        successor = clock.snowflake(again)
        with pytest.raises(MachineIdUnavailableError, match="previous holder"):
            successor.next_id()
        clock.advance(1)
        after = successor.next_id()
        assert after > before[-1]
        assert parse_snowflake(after).machine_id == 0

    async def test_nodes_of_one_memory_network_get_distinct_ids(self) -> None:
        """node_snowflake gives the nodes of one memory network different machine ids
        while they hold them, and gives ids back when its context closes."""
        network = MemoryNetwork()
        nodes = [
            Node(network.connect(f"n{i}"), _echo, num_shards=4, node_id=f"n{i}", shards=[i])
            for i in range(3)
        ]
        async with node_snowflake(nodes[0]) as a, node_snowflake(nodes[1]) as b:
            a.next_id()
            b.next_id()
            assert {a.machine_id, b.machine_id} == {0, 1}
        async with node_snowflake(nodes[2]) as c:
            c.next_id()
            assert c.machine_id in (0, 1, 2)
        assert _pool_of(network).held == frozenset()


async def _echo(env: Any) -> bytes:
    return b""


def _pool_of(network: MemoryNetwork) -> LocalMachineIds:
    from clstr.ids._node import _local

    return _local[network]


# -- leases on JetStream KV ---------------------------------------------------------


@pytest.fixture
def prefix() -> str:
    """A cluster prefix of this test's own: a fresh machines bucket."""
    return f"ids{uuid.uuid4().hex[:10]}"


@pytest_asyncio.fixture
async def connect(clstr_nats_server: NatsServer) -> AsyncIterator[Any]:
    """A factory of NATS transports (to the server or a given URL), closed after the test."""
    made: list[NatsTransport] = []

    async def make(name: str, url: str | None = None) -> NatsTransport:
        transport = await NatsTransport.connect(
            url or clstr_nats_server.url, NatsOptions(name=name, reconnect_time_wait=0.1)
        )
        made.append(transport)
        return transport

    try:
        yield make
    finally:
        for transport in made:
            await transport.close()


async def until_expired(kv: Any, key: str) -> None:
    """Wait until ``key`` of ``kv`` is deleted or its TTL ran out (its marker shows)."""
    watcher = await kv.watch(key)
    try:
        async for entry in watcher:
            if entry is not None and entry.operation in ("DEL", "PURGE"):
                return
    finally:
        await stop_watcher(watcher)


class TestLease:
    async def test_two_leases_hold_different_ids(self, connect: Any, prefix: str) -> None:
        """Leases on one server take the lowest free ids, never one twice, also when
        eight start at the same moment."""
        transport = await connect("a")
        async with (
            MachineIdLease(transport, prefix=prefix, settings=FAST) as a,
            MachineIdLease(transport, prefix=prefix, settings=FAST) as b,
        ):
            assert (a.held, b.held) == (0, 1)
            assert (a.machine_id(T0), b.machine_id(T0)) == (0, 1)
        leases = [MachineIdLease(transport, prefix=prefix, settings=FAST) for _ in range(8)]
        try:
            await asyncio.gather(*(lease.start() for lease in leases))
            assert sorted(lease.held or 0 for lease in leases) == list(range(8))
        finally:
            for lease in leases:
                await lease.close()

    async def test_the_lowest_free_id_is_taken_and_a_full_bucket_is_a_clear_error(
        self, connect: Any, prefix: str
    ) -> None:
        """With every id but 517 held, a lease takes 517; with all 1024 held, starting a
        lease raises MachineIdUnavailableError saying so."""
        transport = await connect("a")
        lease = MachineIdLease(transport, prefix=prefix, settings=FAST)
        js = transport.nc.jetstream()
        kv = await open_bucket(js, lease.bucket, replicas=1, marker_ttl=FAST.ttl)
        for n in range(MAX_MACHINE_ID + 1):
            if n != 517:
                await kv.create(str(n), b"someone")
        async with lease:
            assert lease.held == 517
            with pytest.raises(MachineIdUnavailableError, match="all 1024 machine ids"):
                await MachineIdLease(transport, prefix=prefix, settings=FAST).start()

    async def test_closing_releases_the_id_at_once(self, connect: Any, prefix: str) -> None:
        """A closed lease's id is taken by the next lease right away, the closed one
        refuses to give it out, and the key keeps the last millisecond used, after
        which the successor's ids start."""
        transport = await connect("a")
        first = MachineIdLease(transport, prefix=prefix, settings=FAST)
        async with first:
            assert first.held == 0
            ids = Snowflake(first)
            last = [ids.next_id() for _ in range(5 * 4096)][-1]
        with pytest.raises(MachineIdUnavailableError, match="closed"):
            first.machine_id(0)
        kv = await transport.nc.jetstream().key_value(first.bucket)
        released = json.loads((await kv.get("0")).value)
        assert released["released"] is True
        assert released["last_ms"] == parse_snowflake(last).timestamp_ms
        async with MachineIdLease(transport, prefix=prefix, settings=FAST) as second:
            assert second.held == 0
            successor = Snowflake(second)
            assert successor.next_id() > last
        with pytest.raises(Exception, match="closed"):
            await first.start()

    async def test_a_released_id_is_used_only_after_its_previous_holders_last_ms(
        self, connect: Any, prefix: str
    ) -> None:
        """Taking an id released by a node whose clock was 300 ms ahead waits until this
        clock is past that node's last ms; one released an hour ahead is held, but the
        generator refuses it, saying the clock is behind."""
        transport = await connect("a")
        lease = MachineIdLease(transport, prefix=prefix, settings=FAST)
        kv = await open_bucket(
            transport.nc.jetstream(), lease.bucket, replicas=1, marker_ttl=FAST.ttl
        )
        now_ms = time.time_ns() // MS
        for key, ahead in (("0", 300), ("1", 3_600_000)):
            value = {"released": True, "last_ms": now_ms + ahead}
            await kv.create(key, json.dumps(value).encode())
        async with lease:
            assert lease.held == 0
            first = parse_snowflake(Snowflake(lease).next_id())
            assert first.timestamp_ms > now_ms + 300
            async with MachineIdLease(transport, prefix=prefix, settings=FAST) as behind:
                assert behind.held == 1
                with pytest.raises(MachineIdUnavailableError, match="behind"):
                    Snowflake(behind).next_id()

    async def test_a_renewed_lease_outlives_its_ttl(self, connect: Any, prefix: str) -> None:
        """Renewed by compare-and-set, a lease and its key are still held after twice its TTL."""
        transport = await connect("a")
        async with MachineIdLease(transport, prefix=prefix, owner="node-a", settings=FAST) as a:
            ids = Snowflake(a)
            first = ids.next_id()
            await asyncio.sleep(2 * FAST.ttl)  # the duration under test, not a synchronisation
            assert a.held == 0
            later = ids.next_id()
            assert later > first
            kv = await transport.nc.jetstream().key_value(a.bucket)
            entry = await kv.get("0")
            assert json.loads(entry.value)["owner"] == "node-a"

    async def test_a_cut_off_lease_lapses_expires_and_is_replaced(
        self, connect: Any, prefix: str, clstr_nats_server: NatsServer
    ) -> None:
        """Cut off from NATS, a lease stops its generator when its lease runs out; its key
        expires after the TTL and another node takes the id; back online, the lease finds
        the key lost and takes a new id, and the generator's ids go on increasing."""
        server = clstr_nats_server
        async with TcpProxy(server.host, server.port) as proxy:
            cut_off = await connect("a", proxy.url)
            other = await connect("b")
            async with MachineIdLease(cut_off, prefix=prefix, settings=FAST) as a:
                ids = Snowflake(a)
                first = ids.next_id()
                mine = a.held
                await proxy.cut()
                await a.wait_lapsed()
                with pytest.raises(MachineIdUnavailableError, match="ran out"):
                    ids.next_id()
                kv = await other.nc.jetstream().key_value(a.bucket)
                await until_expired(kv, str(mine))
                async with MachineIdLease(other, prefix=prefix, settings=FAST) as b:
                    assert b.held == mine
                    await proxy.heal()
                    new = await a.wait_held()
                    assert new not in (mine, None)
                    later = ids.next_id()
                    assert later > first
                    assert parse_snowflake(later).machine_id == new
                    assert b.held == mine  # a never touched b's key

    async def test_a_renewal_that_lands_late_keeps_the_same_id(
        self, connect: Any, prefix: str, clstr_nats_server: NatsServer
    ) -> None:
        """When the link stalls past the lease but not past the TTL, the renewals that
        waited land late; the lease sees the key is still its own (its token) and goes
        on with the same id instead of taking a new one."""
        settings = LeaseSettings(ttl=3.0, renew_interval=0.25, lease_fraction=0.4)
        server = clstr_nats_server
        async with TcpProxy(server.host, server.port) as proxy:
            stalled = await connect("a", proxy.url)
            async with MachineIdLease(stalled, prefix=prefix, settings=settings) as a:
                ids = Snowflake(a)
                ids.next_id()
                mine = a.held
                with capture_logs() as logs:
                    proxy.stall()
                    await a.wait_lapsed()
                    with pytest.raises(MachineIdUnavailableError):
                        ids.next_id()
                    proxy.resume()
                    assert await a.wait_held() == mine
                assert parse_snowflake(ids.next_id()).machine_id == mine
                assert not [e for e in logs if "lost" in e["event"]]

    async def test_nodes_on_nats_lease_distinct_ids_named_after_them(
        self, connect: Any, prefix: str
    ) -> None:
        """node_snowflake on NATS leases an id in the node's cluster, with its node id as owner."""
        nodes = [
            Node(
                await connect(f"n{i}"),
                _echo,
                num_shards=4,
                node_id=f"n{i}",
                shards=[i],
                prefix=prefix,
            )
            for i in range(2)
        ]
        async with (
            node_snowflake(nodes[0], settings=FAST) as a,
            node_snowflake(nodes[1], settings=FAST) as b,
        ):
            assert parse_snowflake(a.next_id()).machine_id == 0
            assert parse_snowflake(b.next_id()).machine_id == 1
            transport = nodes[1].transport
            assert isinstance(transport, NatsTransport)
            kv = await transport.nc.jetstream().key_value(f"{prefix}_machines")
            assert json.loads((await kv.get("1")).value)["owner"] == "n1"


class TestSettings:
    @pytest.mark.parametrize(
        "kwargs",
        [
            {"ttl": 0.5},
            {"lease_fraction": 1.0},
            {"renew_interval": 7.0},
            {"renew_interval": 0},
            {"replicas": 0},
        ],
    )
    def test_timings_that_cannot_work_are_refused(self, kwargs: dict[str, Any]) -> None:
        """A TTL under 1 s, a lease fraction outside (0, 1) or a renewal interval not
        shorter than the lease is a ConfigurationError."""
        with pytest.raises(ConfigurationError):
            LeaseSettings(**kwargs)
