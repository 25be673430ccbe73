"""The asyncio helpers under the hot path and the lifecycle: clstr._clock.Timeouts
(deadlines shared per millisecond: node handler deadlines, request timeouts of both
transports) and clstr._tasks.cancel_and_wait."""

from __future__ import annotations

import asyncio

from clstr import MemoryTransport
from clstr._clock import Timeouts
from clstr._tasks import cancel_and_wait
from clstr.testing import virtual_time


class TestTimeouts:
    async def test_fires_at_the_deadline_never_before_at_most_a_millisecond_after(
        self,
    ) -> None:
        """Each item fires once, not before its deadline and within 1 ms after it."""
        async with virtual_time() as clock:
            loop = asyncio.get_running_loop()
            fired: dict[str, float] = {}
            done = asyncio.Event()

            def fire(name: str) -> None:
                fired[name] = clock.time()
                if len(fired) == 4:
                    done.set()

            timeouts: Timeouts[str] = Timeouts(loop, fire)
            start = clock.time()
            deadlines = {"a": 0.0104, "b": 0.0101, "c": 0.5, "d": 2.0}
            for name, after in deadlines.items():
                timeouts.add(start + after, name)
            await done.wait()
            for name, after in deadlines.items():
                late = fired[name] - (start + after)
                assert 0 <= late <= 0.001 + 1e-9, (name, late)

    async def test_discarded_items_do_not_fire(self) -> None:
        """An item discarded from its slot (it finished in time) never fires; the
        others of the same millisecond still do."""
        async with virtual_time() as clock:
            loop = asyncio.get_running_loop()
            fired: list[str] = []
            timeouts: Timeouts[str] = Timeouts(loop, fired.append)
            deadline = clock.time() + 1.0
            kept = timeouts.add(deadline, "kept")
            gone = timeouts.add(deadline, "gone")
            assert kept == gone  # one slot, one loop timer
            timeouts.discard(gone, "gone")
            await asyncio.sleep(1.01)
            assert fired == ["kept"]

    async def test_idle_timers_are_bounded(self) -> None:
        """Past max_timers live timers, discarding the last item of a millisecond
        cancels its timer: long deadlines do not keep idle timers until they pass."""
        loop = asyncio.get_running_loop()
        fired: list[int] = []
        timeouts: Timeouts[int] = Timeouts(loop, fired.append, max_timers=10)
        far = loop.time() + 3600
        slots = [timeouts.add(far + i / 1000, i) for i in range(100)]
        assert len(timeouts) == 100
        for slot, i in zip(slots, range(100), strict=True):
            timeouts.discard(slot, i)
        assert len(timeouts) == 10
        assert fired == []
        again = timeouts.add(far, 7)  # a millisecond whose timer is gone gets a new one
        await asyncio.sleep(0)
        assert len(timeouts) == 11
        timeouts.discard(again, 7)


class TestCancelAndWait:
    async def test_insist_ends_a_task_that_swallowed_its_cancellation(self) -> None:
        """A task that goes on after a cancellation (as Python 3.11's wait_for lets
        one do) is cancelled again until it ends; without insist it is reported."""
        swallowed = 0

        async def stubborn() -> None:
            nonlocal swallowed
            while True:
                try:
                    await asyncio.Event().wait()
                except asyncio.CancelledError:
                    if swallowed:
                        raise
                    swallowed += 1

        task = asyncio.get_running_loop().create_task(stubborn())
        await asyncio.sleep(0)
        assert await cancel_and_wait([task], grace=0.05) == {task}
        assert swallowed == 1
        assert not task.done()
        assert await cancel_and_wait([task], insist=True) == set()
        assert task.cancelled()


def test_a_memory_transport_serves_one_loop_after_another() -> None:
    """A transport (and its node) used under one event loop and then another, as a
    module-scoped test fixture is: the second loop's requests work too."""
    from clstr import Client, Envelope, Node

    transport = MemoryTransport()
    client_side = transport.connect("c")

    async def echo(env: Envelope) -> bytes:
        return env.data

    async def once(data: bytes) -> bytes:
        async with Node(transport, echo, num_shards=1):
            client = Client(client_side, num_shards=1)
            return await client.request_shard(0, "e", data)

    assert asyncio.run(once(b"first")) == b"first"
    assert asyncio.run(once(b"second")) == b"second"
