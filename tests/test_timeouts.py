"""clstr._clock.Timeouts: deadlines shared per millisecond (node handler deadlines,
request timeouts of both transports)."""

from __future__ import annotations

import asyncio

from clstr._clock import Timeouts
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
