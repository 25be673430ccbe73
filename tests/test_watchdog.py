"""The loop watchdog: one self-re-arming timer reports event-loop stalls, and only them.

The stalls here are real: ``time.sleep`` on the test's own loop, which is the
behaviour under test (a handler blocking the loop).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import pytest
import structlog

from clstr import ConfigurationError, LifecycleError
from clstr.node._watchdog import DEFAULT_STALL_THRESHOLD, LoopWatchdog
from clstr.testing import virtual_time

from _support import eventually


def block(seconds: float) -> None:
    """Hold the event loop, as a CPU-bound handler does."""
    time.sleep(seconds)


async def turns(n: int = 3) -> None:
    """Let the loop run its due timers (the watchdog reports once the loop is back)."""
    for _ in range(n):
        await asyncio.sleep(0)


@pytest.fixture
def stalls() -> list[float]:
    return []


@pytest.fixture
def watchdog(stalls: list[float]) -> Iterator[LoopWatchdog]:
    dog = LoopWatchdog(stalls.append, threshold=0.1, interval=0.02)
    yield dog
    dog.stop()


class TestDetection:
    """A stall past the threshold is reported once, with about its length."""

    async def test_a_real_stall_is_reported_with_its_duration(
        self, watchdog: LoopWatchdog, stalls: list[float]
    ) -> None:
        """A 300 ms block of the loop is reported once, as 280-300 ms (and a bit of lag)."""
        watchdog.start()
        await asyncio.sleep(0.05)  # the timer has ticked on time
        block(0.3)
        await eventually(lambda: bool(stalls), timeout=1.0)
        await asyncio.sleep(0.1)  # no second report for the same stall
        assert len(stalls) == 1
        assert 0.3 - watchdog.interval <= stalls[0] < 0.3 + 0.1
        assert watchdog.stalls == 1
        assert watchdog.longest == stalls[0]
        assert watchdog.stalled == pytest.approx(stalls[0])

    async def test_each_stall_is_reported(
        self, watchdog: LoopWatchdog, stalls: list[float]
    ) -> None:
        """Two stalls separated by a responsive loop are two reports."""
        watchdog.start()
        for _ in range(2):
            await asyncio.sleep(0.05)
            block(0.2)
        await eventually(lambda: len(stalls) == 2, timeout=1.0)
        assert all(0.2 - watchdog.interval <= s < 0.3 for s in stalls)

    async def test_short_blocks_are_not_reported(self, stalls: list[float]) -> None:
        """Blocks well under the threshold stay silent."""
        dog = LoopWatchdog(stalls.append, threshold=0.25, interval=0.02)
        dog.start()
        try:
            for _ in range(5):
                block(0.02)
                await asyncio.sleep(0.02)
        finally:
            dog.stop()
        assert stalls == []
        assert dog.stalls == 0

    async def test_a_responsive_loop_reports_nothing(self, stalls: list[float]) -> None:
        """Half a second of ordinary awaiting: no report (threshold with room for CI noise)."""
        dog = LoopWatchdog(stalls.append, threshold=0.25)
        dog.start()
        try:
            await asyncio.sleep(0.5)
        finally:
            dog.stop()
        assert stalls == []

    async def test_virtual_time_jumps_are_not_stalls(self, stalls: list[float]) -> None:
        """On virtual time the clock jumps from timer to timer: never late, never a stall."""
        async with virtual_time():
            dog = LoopWatchdog(stalls.append, threshold=0.1)
            dog.start()
            try:
                await asyncio.sleep(30)
            finally:
                dog.stop()
        assert stalls == []


class TestLifecycle:
    """Owner-managed: start arms one timer, stop leaves nothing behind."""

    async def test_stop_cancels_the_timer(
        self, watchdog: LoopWatchdog, stalls: list[float]
    ) -> None:
        """After stop() a stall is not reported: nothing of the watchdog is scheduled."""
        watchdog.start()
        assert watchdog.running
        watchdog.stop()
        assert not watchdog.running
        block(0.2)
        await asyncio.sleep(0.05)
        assert stalls == []
        watchdog.stop()  # idempotent

    async def test_no_task_and_no_thread(self, watchdog: LoopWatchdog) -> None:
        """Running costs one timer handle: no asyncio task, no thread."""
        tasks, threads = len(asyncio.all_tasks()), threading.active_count()
        watchdog.start()
        await asyncio.sleep(0.05)
        assert len(asyncio.all_tasks()) == tasks
        assert threading.active_count() == threads

    async def test_start_twice_is_refused_and_restart_works(
        self, watchdog: LoopWatchdog, stalls: list[float]
    ) -> None:
        """A running watchdog refuses a second start; a stopped one starts again."""
        watchdog.start()
        with pytest.raises(LifecycleError, match="running already"):
            watchdog.start()
        watchdog.stop()
        watchdog.start()
        await asyncio.sleep(0.03)
        block(0.2)
        await eventually(lambda: bool(stalls), timeout=1.0)

    def test_start_needs_a_running_loop(self, watchdog: LoopWatchdog) -> None:
        """Outside a loop, start() raises RuntimeError and arms nothing."""
        with pytest.raises(RuntimeError):
            watchdog.start()
        assert not watchdog.running

    async def test_a_callback_that_stops_the_watchdog(self) -> None:
        """on_stall may stop its own watchdog: nothing is re-armed after it."""
        seen: list[float] = []

        def once(stall: float) -> None:
            seen.append(stall)
            dog.stop()

        dog = LoopWatchdog(once, threshold=0.05, interval=0.01)
        dog.start()
        await asyncio.sleep(0.02)
        block(0.1)
        await eventually(lambda: bool(seen), timeout=1.0)
        assert not dog.running

    async def test_a_raising_callback_is_logged_and_the_watchdog_goes_on(self) -> None:
        """An exception from on_stall is logged at error level; later stalls still count."""

        def broken(stall: float) -> None:
            raise RuntimeError("callback bug")

        dog = LoopWatchdog(broken, threshold=0.05, interval=0.01)
        dog.start()
        try:
            with structlog.testing.capture_logs() as logs:
                for _ in range(2):
                    await asyncio.sleep(0.02)
                    block(0.1)
                    await turns()
                await eventually(lambda: dog.stalls == 2, timeout=1.0)
            assert dog.running
        finally:
            dog.stop()
        errors = [e for e in logs if e["event"] == "stall callback raised"]
        assert len(errors) == 2
        assert errors[0]["log_level"] == "error"
        assert "callback bug" in errors[0]["error"]


class TestSettings:
    """Thresholds and intervals are positive; the interval follows the threshold."""

    @pytest.mark.parametrize(
        ("kwargs", "message"),
        [
            ({"threshold": 0}, "threshold must be > 0"),
            ({"threshold": -1.0}, "threshold must be > 0"),
            ({"threshold": float("nan")}, "threshold must be > 0"),
            ({"interval": 0}, "interval must be > 0"),
        ],
    )
    def test_bad_settings_are_refused(self, kwargs: dict[str, float], message: str) -> None:
        """Zero, negative or NaN durations raise ConfigurationError naming the setting."""
        with pytest.raises(ConfigurationError, match=message):
            LoopWatchdog(print, **kwargs)

    def test_default_interval(self) -> None:
        """Half the threshold, at most 0.1 s: a stall past threshold + interval is always seen."""
        assert LoopWatchdog(print).threshold == DEFAULT_STALL_THRESHOLD
        assert LoopWatchdog(print, threshold=0.1).interval == pytest.approx(0.05)
        assert LoopWatchdog(print, threshold=2.0).interval == pytest.approx(0.1)
        assert LoopWatchdog(print, threshold=1.0, interval=0.3).interval == 0.3
