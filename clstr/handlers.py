"""Handlers: what a node runs for each envelope.

A handler is any ``async`` callable ``(Envelope) -> bytes | None``. Two
building blocks:

* :class:`Router` dispatches by message type to typed handlers: it decodes
  the payload into the declared class and encodes what the handler returns.
* :class:`KeyHandler` keeps one handler per key (an actor-like entity with
  its own state), bounded by an LRU and evicted when idle.

A handler object may also define ``async on_start()``, ``async on_stop()`` and
``async on_shard_released(shard)``; the node calls them when it starts, stops,
and hands a shard to another node (:class:`KeyHandler` uses them to run its
idle sweeper, and to evict, and so persist, the entities it must no longer
hold: all of them on stop, a shard's on handoff, so that a shard coming back
never finds stale state).
"""

from __future__ import annotations

import asyncio
import inspect
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar, overload

import structlog

from ._clock import monotonic
from .codec import decode_payload, encode_payload, message_type
from .envelope import Envelope
from .errors import (
    BadRequestError,
    ConfigurationError,
    KeyRequiredError,
    NoHandlerError,
    PayloadError,
)

__all__ = ["Handler", "Router", "KeyHandler", "start_handler", "stop_handler", "shard_released"]

#: The shape of every handler a node runs.
Handler = Callable[[Envelope], Awaitable[bytes | None]]

M = TypeVar("M")
R = TypeVar("R")

_log = structlog.get_logger("clstr.handlers")


class _Lifecycle(Protocol):
    async def on_start(self) -> None: ...

    async def on_stop(self) -> None: ...


async def start_handler(handler: object) -> None:
    """Call ``handler.on_start()`` when it has one."""
    hook = getattr(handler, "on_start", None)
    if hook is not None:
        await hook()


async def shard_released(handler: object, shard: int) -> None:
    """Call ``handler.on_shard_released(shard)`` when it has one; log, never raise."""
    hook = getattr(handler, "on_shard_released", None)
    if hook is not None:
        try:
            await hook(shard)
        except Exception:
            _log.exception("handler on_shard_released failed", shard=shard)


async def stop_handler(handler: object) -> None:
    """Call ``handler.on_stop()`` when it has one; log, never raise, on failure."""
    hook = getattr(handler, "on_stop", None)
    if hook is not None:
        try:
            await hook()
        except Exception:
            _log.exception("handler on_stop failed")


def _wants_envelope(fn: Callable[..., Any]) -> bool:
    params = [
        p
        for p in inspect.signature(fn).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    return len(params) >= 2


class Router:
    """Dispatch envelopes by message type.

    Typed routes take a payload class (a dataclass or a plain type); the
    handler gets the decoded instance (and the envelope, when it takes a
    second argument) and returns a value that is msgpack-encoded as the reply
    (``None`` becomes an empty reply). Raw routes take a type name and a
    handler of the plain :data:`Handler` shape. An unknown type is answered
    with ``no_handler``; a payload that does not decode, with ``bad_request``.

    ::

        router = Router()

        @router.on(GetUser)
        async def get_user(msg: GetUser) -> User: ...
    """

    def __init__(self) -> None:
        self._routes: dict[str, Handler] = {}
        self._objects: list[object] = []

    @property
    def message_types(self) -> list[str]:
        """The message types this router serves."""
        return sorted(self._routes)

    def register(self, message: type[Any] | str, handler: Callable[..., Awaitable[Any]]) -> None:
        """Route ``message`` (a payload class or a raw type name) to ``handler``.

        Raises :class:`ConfigurationError` when the type already has a route.
        """
        if isinstance(message, str):
            self.mount(message, handler)
        else:
            self._add(message_type(message), _typed(message, handler), handler)

    def mount(self, message: type[Any] | str, handler: Handler) -> None:
        """Route ``message`` to a handler of the plain :data:`Handler` shape, which
        gets the envelope itself (e.g. a :class:`KeyHandler` of entities).

        Raises :class:`ConfigurationError` when the type already has a route.
        """
        name = message if isinstance(message, str) else message_type(message)
        self._add(name, handler, handler)

    def _add(self, name: str, route: Handler, target: object) -> None:
        if name in self._routes:
            raise ConfigurationError(f"message type {name!r} already has a handler")
        self._routes[name] = route
        if any(hasattr(target, hook) for hook in _HOOKS) and target not in self._objects:
            self._objects.append(target)

    @overload
    def on(
        self, message: type[M]
    ) -> Callable[[Callable[..., Awaitable[R]]], Callable[..., Awaitable[R]]]: ...

    @overload
    def on(self, message: str) -> Callable[[Handler], Handler]: ...

    def on(self, message: type[Any] | str) -> Callable[[Any], Any]:
        """Decorator form of :meth:`register`."""

        def decorate(fn: Any) -> Any:
            self.register(message, fn)
            return fn

        return decorate

    async def __call__(self, env: Envelope) -> bytes | None:
        route = self._routes.get(env.type)
        if route is None:
            raise NoHandlerError(
                f"no handler for message type {env.type!r}; known types: {self.message_types}"
            )
        return await route(env)

    async def on_start(self) -> None:
        """Start every handler object routed here that has ``on_start``, in the
        order they were registered; what one raises propagates (the node then
        does not start)."""
        for obj in self._objects:
            await start_handler(obj)

    async def on_stop(self) -> None:
        """Stop every handler object routed here that has ``on_stop``: each one
        is called even when an earlier one fails (failures are logged)."""
        for obj in self._objects:
            await stop_handler(obj)

    async def on_shard_released(self, shard: int) -> None:
        """Tell every handler object routed here that has ``on_shard_released``
        that this node no longer owns ``shard``; failures are logged, never raised."""
        for obj in self._objects:
            await shard_released(obj, shard)


_HOOKS = ("on_start", "on_stop", "on_shard_released")


def _typed(cls: type[Any], fn: Callable[..., Awaitable[Any]]) -> Handler:
    pass_env = _wants_envelope(fn)

    validates = callable(getattr(cls, "validate", None))

    async def typed(env: Envelope) -> bytes:
        try:
            msg = decode_payload(env.data, cls)
            if validates:
                # Peers in other languages may skip the sender-side check.
                msg.validate()
        except PayloadError as exc:
            raise BadRequestError(f"payload of {env.type!r} does not decode: {exc}") from exc
        except Exception as exc:
            raise BadRequestError(f"invalid {env.type!r} payload: {exc}") from exc
        result = await (fn(msg, env) if pass_env else fn(msg))
        return b"" if result is None else encode_payload(result)

    return typed


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

    ``factory(key)`` builds the key's handler (sync or async). At most
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
        factory: Callable[[str], Handler | Awaitable[Handler]],
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
            made = self._factory(key)
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
