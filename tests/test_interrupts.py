"""Interrupts: a caller stops work it no longer needs, on both transports."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from clstr import Client, Envelope, Node, RequestInterruptedError, Transport

Connect = Callable[[str], Awaitable[Transport]]

NUM_SHARDS = 4


class Held:
    """A handler that waits until released, and records whether it was cancelled."""

    def __init__(self) -> None:
        self.entered: dict[str, asyncio.Event] = {}
        self.cancelled: list[str] = []
        self.was_cancelled = asyncio.Event()
        self.finished: list[str] = []
        self.release = asyncio.Event()

    def started(self, tag: str) -> asyncio.Event:
        return self.entered.setdefault(tag, asyncio.Event())

    async def __call__(self, env: Envelope) -> bytes:
        tag = env.data.decode()
        self.started(tag).set()
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled.append(tag)
            self.was_cancelled.set()
            raise
        self.finished.append(tag)
        return b"done:" + env.data


@pytest.fixture
async def rig(connect: Connect) -> AsyncIterator[tuple[Client, Held]]:
    held = Held()
    async with Node(await connect("node"), held, num_shards=NUM_SHARDS):
        client = Client(await connect("client"), num_shards=NUM_SHARDS, timeout=10)
        try:
            yield client, held
        finally:
            held.release.set()


class TestInterrupt:
    async def test_interrupt_by_id_cancels_the_handler(self, rig: tuple[Client, Held]) -> None:
        """interrupt(id) cancels the running handler; its caller gets interrupted, and
        the outcome is kept: a retry under the id gets it without running again."""
        client, held = rig
        call = asyncio.create_task(client.request_key("k", "work", b"a", request_id="r1"))
        await held.started("a").wait()
        assert await client.interrupt("r1", key="k") == 1
        with pytest.raises(RequestInterruptedError, match="interrupted"):
            await call
        assert held.cancelled == ["a"]
        with pytest.raises(RequestInterruptedError):
            await client.request_key("k", "work", b"a", request_id="r1")
        assert held.cancelled == ["a"]

    async def test_a_queued_request_is_answered_and_never_runs(
        self, rig: tuple[Client, Held]
    ) -> None:
        """A request still queued behind its key's running one is answered interrupted
        at once and never reaches the handler."""
        client, held = rig
        first = asyncio.create_task(client.request_key("k", "work", b"a"))
        await held.started("a").wait()
        queued = asyncio.create_task(client.request_key("k", "work", b"b", request_id="r2"))
        # The interrupt may overtake the request on its way: ask until it lands.
        while await client.interrupt("r2", key="k") == 0:
            pass
        with pytest.raises(RequestInterruptedError, match="before its handler ran"):
            await queued
        held.release.set()
        assert await first == b"done:a"
        assert "b" not in held.finished + held.cancelled

    async def test_interrupt_current_stops_what_the_key_runs(
        self, rig: tuple[Client, Held]
    ) -> None:
        """interrupt_current(key) cancels the message the key runs now."""
        client, held = rig
        call = asyncio.create_task(client.request_key("entity-1", "work", b"c"))
        await held.started("c").wait()
        assert await client.interrupt_current("entity-1") == 1
        with pytest.raises(RequestInterruptedError):
            await call

    async def test_an_id_sent_to_the_shard_alone_finds_a_keyed_request(
        self, rig: tuple[Client, Held]
    ) -> None:
        """interrupt(id, shard=...) without the key reaches a keyed request, running
        or queued: an id names one request of the shard whatever its key."""
        client, held = rig
        shard = client.shard_for("k")
        running = asyncio.create_task(client.request_key("k", "work", b"a", request_id="r1"))
        await held.started("a").wait()
        queued = asyncio.create_task(client.request_key("k", "work", b"b", request_id="r2"))
        while await client.interrupt("r2", shard=shard) == 0:
            pass  # the interrupt may overtake the request on its way
        with pytest.raises(RequestInterruptedError, match="before its handler ran"):
            await queued
        assert await client.interrupt("r1", shard=shard) == 1
        with pytest.raises(RequestInterruptedError):
            await running
        assert held.cancelled == ["a"]
        assert "b" not in held.finished

    async def test_an_unknown_id_interrupts_nothing(self, rig: tuple[Client, Held]) -> None:
        """Interrupting an id nobody runs returns 0 and changes nothing."""
        client, _ = rig
        assert await client.interrupt("nobody", key="k") == 0


class TestCancellation:
    async def test_cancelling_the_callers_task_interrupts_the_handler(
        self, rig: tuple[Client, Held]
    ) -> None:
        """Cancelling the task that awaits a request (no id: matched by its
        fingerprint and timestamp) cancels the handler on the node."""
        client, held = rig
        call = asyncio.create_task(client.request_key("k", "work", b"d"))
        await held.started("d").wait()
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        await held.was_cancelled.wait()  # the interrupt travels to the node
        assert held.cancelled == ["d"]

    async def test_opting_out_leaves_the_handler_running(self, connect: Connect) -> None:
        """With interrupt_on_cancel=False the handler goes on after the caller gave up."""
        held = Held()
        async with Node(await connect("node"), held, num_shards=NUM_SHARDS):
            client = Client(
                await connect("client"), num_shards=NUM_SHARDS, interrupt_on_cancel=False
            )
            call = asyncio.create_task(client.request_key("k", "work", b"e"))
            await held.started("e").wait()
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
            # A later message of the same key queues behind it: it still runs.
            second = asyncio.create_task(client.request_key("k", "work", b"f"))
            held.release.set()
            assert await second == b"done:f"
            assert held.finished == ["e", "f"]
            assert held.cancelled == []
