"""Streamed replies with credit-based flow control, on both transports."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest

from clstr import (
    Client,
    Envelope,
    HandlerTimeoutError,
    Node,
    NotOwnerError,
    RemoteHandlerError,
    RequestTimeoutError,
    Router,
    Transport,
)
from clstr.entities import Entity, MemoryStateStore, Sharding, handles
from clstr.handlers import current_stream

from _support import eventually

Connect = Callable[[str], Awaitable[Transport]]

NUM_SHARDS = 4


@dataclass
class Query:
    rows: int
    fail_after: int = -1


@dataclass
class Row:
    n: int
    text: str


class Report:
    """A streaming route that records how far it got and whether it was cancelled."""

    def __init__(self) -> None:
        self.produced = 0
        self.cancelled = asyncio.Event()
        self.router = Router()
        self.router.register(Query, self.rows)

    async def rows(self, query: Query) -> AsyncIterator[Row]:
        try:
            for n in range(query.rows):
                if n == query.fail_after:
                    raise ValueError(f"row {n} is broken")
                self.produced = n + 1
                yield Row(n, f"row {n}")
            if query.rows < 0:
                await asyncio.Event().wait()  # never yields: runs into its deadline
        except asyncio.CancelledError:
            self.cancelled.set()
            raise


@pytest.fixture
async def rig(connect: Connect) -> AsyncIterator[tuple[Node, Client, Report]]:
    report = Report()
    node = Node(await connect("node"), report.router, num_shards=NUM_SHARDS)
    async with node:
        client = Client(await connect("client"), num_shards=NUM_SHARDS, timeout=10)
        yield node, client, report


def _writers(node: Node) -> list[object]:
    return list(node._dispatch._streams._writers.values())


class TestStreams:
    async def test_chunks_arrive_in_order_and_typed(self, rig: tuple[Node, Client, Report]) -> None:
        """Every chunk arrives, in order, decoded into the item type."""
        _, client, _ = rig
        rows = [row async for row in client.key("r1").stream(Query(200), Row, window=8)]
        assert rows == [Row(n, f"row {n}") for n in range(200)]

    async def test_a_slow_reader_holds_the_handler(self, rig: tuple[Node, Client, Report]) -> None:
        """The node never has more than a window of chunks unacknowledged: while the
        reader waits, the handler is held at its next yield."""
        node, client, report = rig
        window = 4
        stream = client.key("r1").stream(Query(100), Row, window=window)
        async with contextlib.aclosing(stream):
            first = await anext(stream)
            assert first == Row(0, "row 0")
            await eventually(lambda: any(w.sent == w.acked + window for w in _writers(node)))
            (writer,) = _writers(node)
            assert writer.sent - writer.acked == window  # type: ignore[attr-defined]
            assert report.produced <= writer.sent + 1  # type: ignore[attr-defined]
            rest = [row async for row in stream]
        assert [r.n for r in rest] == list(range(1, 100))

    async def test_leaving_early_cancels_the_handler(
        self, rig: tuple[Node, Client, Report]
    ) -> None:
        """Breaking out of the iteration stops the handler (it sees cancellation) and
        frees the stream on the node."""
        node, client, report = rig
        stream = client.key("r1").stream(Query(10_000), Row, window=4)
        async with contextlib.aclosing(stream):
            async for row in stream:
                if row.n == 2:
                    break
        await report.cancelled.wait()
        await eventually(lambda: not _writers(node))
        assert report.produced < 10_000

    async def test_cancelling_the_reader_cancels_the_handler(
        self, rig: tuple[Node, Client, Report]
    ) -> None:
        """Cancelling the task that reads a stream stops the handler too."""
        _, client, report = rig
        started = asyncio.Event()

        async def read() -> None:
            async for _ in client.key("r1").stream(Query(10_000), Row, window=2):
                started.set()

        reader = asyncio.create_task(read())
        await started.wait()
        reader.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reader
        await report.cancelled.wait()

    async def test_an_error_ends_the_stream_with_its_error(
        self, rig: tuple[Node, Client, Report]
    ) -> None:
        """A handler that raises mid-stream: the chunks before it arrive, then its error."""
        _, client, _ = rig
        got: list[int] = []

        async def read() -> None:
            async for row in client.key("r1").stream(Query(10, fail_after=3), Row):
                got.append(row.n)

        with pytest.raises(RemoteHandlerError, match="row 3 is broken"):
            await read()
        assert got == [0, 1, 2]

    async def test_the_deadline_stops_the_stream(self, rig: tuple[Node, Client, Report]) -> None:
        """A stream that outlives its deadline: the handler is cancelled, the reader
        gets a timeout."""
        _, client, report = rig

        async def read() -> None:
            async for _ in client.key("r1").stream(Query(-1), Row, timeout=0.5):
                pass

        with pytest.raises((HandlerTimeoutError, RequestTimeoutError)):
            await read()
        await report.cancelled.wait()

    async def test_a_shard_moved_mid_stream_ends_it_and_frees_the_writer(
        self, rig: tuple[Node, Client, Report]
    ) -> None:
        """A stream whose shard is released while its handler is held (a reader
        that stopped reading): the handler is cancelled, the reader's next read
        gets not_owner, and the node forgets the stream."""
        node, client, report = rig
        scoped = client.key("r1")
        stream = scoped.stream(Query(10_000), Row, window=2)
        async with contextlib.aclosing(stream):
            assert await anext(stream) == Row(0, "row 0")
            await eventually(lambda: any(w.sent == w.acked + 2 for w in _writers(node)))
            await node.release(scoped.shard, timeout=0)
            await report.cancelled.wait()
            assert not _writers(node)
            with pytest.raises(NotOwnerError, match="stopped the handler"):
                async for _ in stream:
                    pass

    async def test_one_reply_collects_a_streaming_handler(
        self, rig: tuple[Node, Client, Report]
    ) -> None:
        """Called for one reply, a streaming route answers with all its items."""
        _, client, _ = rig
        assert await client.key("r1").call(Query(3), list[Row]) == [
            Row(0, "row 0"),
            Row(1, "row 1"),
            Row(2, "row 2"),
        ]


class TestRawStreams:
    async def test_a_raw_handler_streams_through_current_stream(self, connect: Connect) -> None:
        """A raw handler sends chunks to current_stream(); what it returns comes last."""

        async def handler(env: Envelope) -> bytes:
            sink = current_stream()
            assert sink is not None
            for n in range(3):
                await sink.send(b"chunk%d" % n)
            return b"last"

        async with Node(await connect("node"), handler, num_shards=NUM_SHARDS):
            client = Client(await connect("client"), num_shards=NUM_SHARDS)
            chunks = [c async for c in client.stream_key("k", "any")]
        assert chunks == [b"chunk0", b"chunk1", b"chunk2", b"last"]

    async def test_a_one_reply_handler_is_a_stream_of_one(self, connect: Connect) -> None:
        """A handler that does not stream answers a stream request with one chunk."""

        async def handler(env: Envelope) -> bytes:
            assert current_stream() is not None
            return b"only"

        async with Node(await connect("node"), handler, num_shards=NUM_SHARDS):
            client = Client(await connect("client"), num_shards=NUM_SHARDS)
            assert [c async for c in client.stream_key("k", "any")] == [b"only"]


@dataclass
class History:
    last: int


@dataclass
class LogState:
    entries: list[str] = field(default_factory=list)


class Journal(Entity[LogState]):
    """An entity whose method streams its entries."""

    state_type = LogState

    @handles
    async def history(self, msg: History) -> AsyncIterator[str]:
        for entry in self.state.entries[-msg.last :]:
            yield entry

    @handles
    async def write(self, msg: Row) -> int:
        self.state.entries.append(msg.text)
        return len(self.state.entries)


class TestEntityStreams:
    async def test_an_entity_method_streams_its_items(self, connect: Connect) -> None:
        """An async-generator entity method streams to client.entity(...).stream();
        called for one reply it answers with the list."""
        runner = Sharding(await connect("node"), num_shards=NUM_SHARDS, store=MemoryStateStore())
        runner.register_entity(Journal)
        async with runner:
            client = Client(await connect("client"), num_shards=NUM_SHARDS)
            journal = client.entity(Journal, "j1")
            for n in range(5):
                await journal.call(Row(n, f"entry {n}"), int)
            streamed = [e async for e in journal.stream(History(3), str, window=2)]
            assert streamed == ["entry 2", "entry 3", "entry 4"]
            assert await journal.call(History(2), list[str]) == ["entry 3", "entry 4"]
