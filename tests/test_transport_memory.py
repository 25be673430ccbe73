"""The memory transport's own promises (the contract suite covers the shared ones)."""

from __future__ import annotations

import asyncio

from clstr import MemoryTransport


class TestAsynchronousDelivery:
    """Delivery is scheduled on the event loop, never run inline, as over a real
    server: a sender never runs its receiver's code inside its own call."""

    async def test_publish_returns_before_the_callback_runs(self) -> None:
        """publish and publish_nowait return before the subscriber's callback ran;
        it runs on the next loop iteration, as a loop callback (in no task)."""
        receiver = MemoryTransport()
        sender = receiver.connect("sender")
        got: list[tuple[bytes, asyncio.Task[object] | None]] = []
        await receiver.subscribe(
            "x", lambda data, reply: got.append((data, asyncio.current_task()))
        )
        await sender.publish("x", b"1")
        sender.publish_nowait("x", b"2")
        assert got == []
        # One loop iteration is the very thing under test here, not a guess.
        await asyncio.sleep(0)
        assert got == [(b"1", None), (b"2", None)]
        await sender.close()
        await receiver.close()

    async def test_request_is_delivered_outside_the_requesting_task(self) -> None:
        """A request reaches its subscriber on a later iteration, not inside the
        requester's task, and the reply comes back the same way."""
        responder = MemoryTransport()
        requester = responder.connect("requester")
        me = asyncio.current_task()
        ran_in: list[asyncio.Task[object] | None] = []

        def echo(data: bytes, reply: str | None) -> None:
            ran_in.append(asyncio.current_task())
            assert reply is not None
            responder.publish_nowait(reply, b"re:" + data)

        await responder.subscribe("echo", echo)
        assert await requester.request("echo", b"x", 5) == b"re:x"
        assert ran_in == [None]
        assert ran_in[0] is not me
        await requester.close()
        await responder.close()
