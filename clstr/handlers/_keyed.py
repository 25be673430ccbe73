"""KeyHandler: one handler per key, created on first use and evicted when idle."""

from __future__ import annotations

import asyncio
import inspect
from collections import OrderedDict
from collections.abc import Awaitable, Callable

import structlog

from .._clock import monotonic
from ..envelope import Envelope
from ..errors import ConfigurationError, KeyRequiredError
from ._router import Handler

__all__ = ["KeyHandler", "EvictHook"]

_log = structlog.get_logger("clstr.handlers")


class _Entry:
    __slots__ = ("busy", "handler", "last_used", "shard")

    def __init__(self, handler: Handler, now: float, shard: int) -> None:
        self.handler = handler
        self.busy = 0
        self.last_used = now
        self.shard = shard


EvictHook = Callable[[str, Handler], Awaitable[None] | None]


class KeyHandler:
    """One handler per key, created on first use, like the Go ``NewKeyHandler``.

    ``factory(key)`` builds the key's handler (sync or async; a factory that
    takes a second argument gets the envelope of the first message too). At most
    ``max_keys`` are kept (least recently used go first; one that is handling
    a message is never evicted); one unused for ``idle_timeout`` seconds is
    evicted too. ``on_evict(key, handler)`` runs for every eviction, also for
    all remaining keys when the node stops, so an entity can persist itself.
    A message without a key is answered with ``key_required``.

    Per-key order comes from the node: one key's messages never run at once.
    A message for a key whose eviction is under way (``on_evict`` saving its
    state) waits for it to end, then gets a new entity: one built from the
    saved state, never from the state the save has not written yet.
    """

    def __init__(
        self,
        factory: Callable[[str], Handler | Awaitable[Handler]]
        | Callable[[str, Envelope], Handler | Awaitable[Handler]],
        *,
        max_keys: int = 1024,
        idle_timeout: float | None = 600.0,
        on_evict: EvictHook | None = None,
        clock: Callable[[], float] = monotonic,
    ) -> None:
        if max_keys < 1:
            raise ConfigurationError(f"max_keys must be >= 1, got {max_keys}")
        if idle_timeout is not None and not idle_timeout > 0:
            raise ConfigurationError(f"idle_timeout must be > 0 or None, got {idle_timeout}")
        self._factory = factory
        self._factory_env = _takes_two(factory)
        self.max_keys = max_keys
        self.idle_timeout = idle_timeout
        self._on_evict = on_evict
        self._clock = clock
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        # Keys whose on_evict runs now: their shard, and an event set when it ends.
        self._evicting: dict[str, tuple[int, asyncio.Event]] = {}
        self._sweeper: asyncio.Task[None] | None = None
        self._stop_sweeping = asyncio.Event()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    async def __call__(self, env: Envelope) -> bytes | None:
        key = env.key
        if not key:
            raise KeyRequiredError(
                f"message type {env.type!r} needs a key; send it with client.key(...) "
                "or request_key(...)"
            )
        entry = self._entries.get(key)
        created = entry is None
        if entry is None:
            while (evicting := self._evicting.get(key)) is not None:
                # Its state is being saved: build the new entity from what is saved.
                await evicting[1].wait()
            made = self._factory(key, env) if self._factory_env else self._factory(key)  # type: ignore[call-arg]
            handler = await made if inspect.isawaitable(made) else made
            # A concurrent caller (not through a node) may have made one meanwhile.
            entry = self._entries.get(key)
            if entry is None:
                entry = self._entries[key] = _Entry(handler, self._clock(), env.shard)
            else:
                created = False
        else:
            self._entries.move_to_end(key)
        entry.busy += 1
        try:
            if created:
                await self._evict_over_capacity()
            return await entry.handler(env)
        finally:
            entry.busy -= 1
            entry.last_used = self._clock()

    async def _evict(self, key: str) -> None:
        # Victims are chosen before the awaits of earlier evictions: re-check.
        entry = self._entries.get(key)
        if entry is None or entry.busy:
            return
        del self._entries[key]
        if self._on_evict is None:
            return
        try:
            result = self._on_evict(key, entry.handler)
            if inspect.isawaitable(result):
                # Until the save ends, a message for the key waits (see __call__).
                done = asyncio.Event()
                self._evicting[key] = (entry.shard, done)
                try:
                    await result
                finally:
                    del self._evicting[key]
                    done.set()
        except Exception:
            _log.exception("on_evict failed", key=key)

    async def _evictions_done(self, shard: int | None = None) -> None:
        """Wait for the evictions under way (of ``shard``'s keys, or of all)."""
        for evicting_shard, done in list(self._evicting.values()):
            if shard is None or evicting_shard == shard:
                await done.wait()

    async def _evict_over_capacity(self) -> None:
        excess = len(self._entries) - self.max_keys
        if excess <= 0:
            return
        victims = [k for k, e in self._entries.items() if not e.busy][:excess]
        for key in victims:
            await self._evict(key)

    async def sweep(self) -> int:
        """Evict every key idle for longer than ``idle_timeout``; return how many."""
        if self.idle_timeout is None:
            return 0
        limit = self._clock() - self.idle_timeout
        idle = [k for k, e in self._entries.items() if not e.busy and e.last_used <= limit]
        for key in idle:
            await self._evict(key)
        return len(idle)

    async def on_shard_released(self, shard: int) -> None:
        """Evict the entities of ``shard``: this node no longer owns them."""
        for key in [k for k, e in self._entries.items() if e.shard == shard and not e.busy]:
            await self._evict(key)
        # Saves already under way (a sweep's) end before the shard goes.
        await self._evictions_done(shard)

    async def evict_all(self) -> None:
        """Evict every key that is not busy (calling ``on_evict`` for each), and
        wait for evictions already under way."""
        for key in [k for k, e in self._entries.items() if not e.busy]:
            await self._evict(key)
        await self._evictions_done()

    async def _sweep_forever(self, interval: float) -> None:
        stop = self._stop_sweeping
        while True:
            try:
                async with asyncio.timeout(interval):
                    await stop.wait()
            except TimeoutError:
                try:
                    await self.sweep()
                except Exception:  # a failing clock, say: the next sweep may fare better
                    _log.exception("idle sweep failed")
            else:
                # Told to stop: between sweeps, never in the middle of a save.
                return

    async def on_start(self) -> None:
        """Start the idle sweeper (when ``idle_timeout`` is set): every
        ``idle_timeout / 2`` seconds it evicts the keys idle for longer."""
        self.start_sweeper()

    def start_sweeper(self) -> None:
        """:meth:`on_start` for callers that cannot await (idempotent)."""
        if self.idle_timeout is not None and self._sweeper is None:
            self._stop_sweeping = asyncio.Event()
            self._sweeper = asyncio.create_task(
                self._sweep_forever(max(self.idle_timeout / 2, 0.01)), name="clstr-key-sweeper"
            )

    async def on_stop(self) -> None:
        """Stop the sweeper (after the sweep under way, so that no save is cut
        short), then evict every key that is not busy, each through ``on_evict``.
        Cancelling it cancels the sweeper too."""
        sweeper, self._sweeper = self._sweeper, None
        if sweeper is not None:
            self._stop_sweeping.set()
            # Awaiting the task directly: our own cancellation cancels it too, and
            # propagates (never swallowed).
            await sweeper
        await self.evict_all()


def _takes_two(fn: Callable[..., object]) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 2
