"""Virtual time for asyncio: TTLs and timeouts that expire at once, deterministically.

clstr measures every deadline on the running loop's clock (``loop.time()``).
:class:`VirtualClockEventLoop` is an event loop whose clock is a
:class:`VirtualClock`: time stands still while anything is ready to run, and
when every task is blocked waiting for a timer, the clock jumps straight to
that timer (like trio's ``MockClock(autojump_threshold=0)``). A 30-second TTL
then expires in microseconds of real time, always in the same order.

Real I/O still works (a virtual loop polls its selector without blocking
before it jumps), but real time and virtual time part: keep virtual time
for in-process tests, with the memory transport.

Three ways in:

* :func:`run` in place of ``asyncio.run`` (a plain test function calls it);
* ``async with virtual_time() as clock:`` inside any running selector event
  loop (a pytest-asyncio test): the loop runs on virtual time within the
  block and on real time again after it;
* every async test of a project on virtual time, with pytest-asyncio's hook
  in its ``conftest.py``::

      def pytest_asyncio_loop_factories(config, item):
          return {"virtual": clstr.testing.VirtualClockEventLoop}

:func:`current_clock` returns the clock in force.
"""

from __future__ import annotations

import asyncio
import contextlib
import selectors
from collections.abc import AsyncIterator, Coroutine, Mapping
from typing import Any, TypeVar

from .. import _clock
from ..errors import ConfigurationError

__all__ = [
    "VirtualClock",
    "VirtualClockEventLoop",
    "current_clock",
    "run",
    "virtual_time",
]

T = TypeVar("T")


class VirtualClock:
    """A clock that moves only when told to, or when every task waits on a timer.

    ``start`` is the initial reading. With ``autojump`` (the default), a loop
    running on this clock jumps to its next timer as soon as nothing else can
    run; without it, time moves only by :meth:`advance`.
    """

    def __init__(self, *, start: float = 0.0, autojump: bool = True) -> None:
        self._now = float(start)
        self.autojump = autojump
        #: Total virtual seconds skipped by autojumps (for reporting).
        self.jumped = 0.0

    def time(self) -> float:
        """The current virtual time, in seconds."""
        return self._now

    def advance(self, seconds: float) -> None:
        """Move the clock forward by ``seconds``; timers now due run on the loop's
        next iteration. Time never goes back."""
        if seconds < 0:
            raise ConfigurationError(f"time cannot go back: advance({seconds!r})")
        self._now += seconds

    def _jump(self, seconds: float) -> None:
        self._now += seconds
        self.jumped += seconds


class _AutojumpSelector(selectors.BaseSelector):
    """Wraps the loop's real selector: a wait for the next timer becomes a jump."""

    def __init__(self, inner: selectors.BaseSelector, clock: VirtualClock) -> None:
        self._inner = inner
        self._clock = clock

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout is not None and timeout <= 0:
            return self._inner.select(timeout)
        # Real I/O first (without blocking): a ready socket or a wakeup from
        # another thread comes before any jump.
        events = self._inner.select(0)
        if events:
            return events
        if timeout is None or not self._clock.autojump:
            # Nothing scheduled (or jumps are off): wait for real I/O, from a
            # thread (to_thread, call_soon_threadsafe) or a socket.
            return self._inner.select(timeout if timeout is None else min(timeout, 0.01))
        # Every task is blocked and the next timer is `timeout` away: go there.
        self._clock._jump(timeout)
        return []

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        return self._inner.register(fileobj, events, data)

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        return self._inner.unregister(fileobj)

    def modify(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        return self._inner.modify(fileobj, events, data)

    def close(self) -> None:
        self._inner.close()

    def get_key(self, fileobj: Any) -> selectors.SelectorKey:
        return self._inner.get_key(fileobj)

    def get_map(self) -> Mapping[Any, selectors.SelectorKey]:
        return self._inner.get_map()


class VirtualClockEventLoop(asyncio.SelectorEventLoop):
    """An asyncio event loop whose ``time()`` is a :class:`VirtualClock`.

    ``asyncio.sleep``, ``asyncio.timeout``, ``call_later`` and so every clstr
    deadline and TTL run on virtual time.
    """

    def __init__(self, clock: VirtualClock | None = None) -> None:
        self.clock = clock if clock is not None else VirtualClock()
        super().__init__(_AutojumpSelector(selectors.DefaultSelector(), self.clock))
        # Timers due within this many virtual seconds run together; keep it tiny
        # so that order follows deadlines exactly.
        self._clock_resolution = 1e-9

    def time(self) -> float:
        return self.clock.time()

    def run_forever(self) -> None:
        # clstr's deadlines read loop.time() only while a virtual loop runs.
        _clock._virtual_loops += 1
        try:
            super().run_forever()
        finally:
            _clock._virtual_loops -= 1


# Loops switched to virtual time by `virtual_time()`, and their clocks.
_SWITCHED: dict[int, VirtualClock] = {}


def current_clock() -> VirtualClock:
    """The :class:`VirtualClock` the running loop runs on.

    Raises :class:`RuntimeError` when the loop runs on real time.
    """
    loop = asyncio.get_running_loop()
    if isinstance(loop, VirtualClockEventLoop):
        return loop.clock
    clock = _SWITCHED.get(id(loop))
    if clock is None:
        raise RuntimeError(
            "the running loop is on real time: use clstr.testing.run(), "
            "`async with clstr.testing.virtual_time()`, or a VirtualClockEventLoop"
        )
    return clock


@contextlib.asynccontextmanager
async def virtual_time(*, autojump: bool = True) -> AsyncIterator[VirtualClock]:
    """Run the current event loop on a :class:`VirtualClock` inside the block.

    The clock starts at the loop's current time, so timers already scheduled
    keep their meaning. After the block the loop is on real time again;
    timers still pending then fire once real time reaches their virtual
    deadline, so let the block end what it started. Works on asyncio's
    selector event loops (the default on Linux and macOS); raises
    :class:`RuntimeError` on others (uvloop, Windows' proactor) — use
    :func:`run` there. Inside a :class:`VirtualClockEventLoop` it yields that
    loop's clock.
    """
    loop = asyncio.get_running_loop()
    if isinstance(loop, VirtualClockEventLoop):
        yield loop.clock
        return
    if id(loop) in _SWITCHED:
        raise RuntimeError("virtual_time() blocks do not nest")
    selector = getattr(loop, "_selector", None)
    if not isinstance(loop, asyncio.SelectorEventLoop) or not isinstance(
        selector, selectors.BaseSelector
    ):
        raise RuntimeError(
            f"virtual_time() needs an asyncio selector event loop, not {type(loop).__name__}; "
            "use clstr.testing.run() instead"
        )
    clock = VirtualClock(start=loop.time(), autojump=autojump)
    _SWITCHED[id(loop)] = clock
    loop._selector = _AutojumpSelector(selector, clock)  # type: ignore[attr-defined]
    loop.time = clock.time  # type: ignore[method-assign]
    _clock._virtual_loops += 1
    try:
        yield clock
    finally:
        _clock._virtual_loops -= 1
        del loop.time
        loop._selector = selector  # type: ignore[attr-defined]
        del _SWITCHED[id(loop)]


def run(
    main: Coroutine[Any, Any, T], *, clock: VirtualClock | None = None, debug: bool | None = None
) -> T:
    """Run ``main`` to completion on a :class:`VirtualClockEventLoop`, like
    ``asyncio.run`` (tasks left over are cancelled, async generators closed)."""
    with asyncio.Runner(debug=debug, loop_factory=lambda: VirtualClockEventLoop(clock)) as runner:
        return runner.run(main)
