"""Router and the handler lifecycle.

A handler is any ``async`` callable ``(Envelope) -> bytes | None``.
:class:`Router` dispatches by message type to typed handlers: it decodes the
payload into the declared class and encodes what the handler returns. The
``*_handler`` functions call a handler object's optional lifecycle hooks
(``on_start``, ``on_stop``, ``on_shard_released``), which the node calls when
it starts, stops, and hands a shard to another node (:class:`KeyHandler`
uses them to run its idle sweeper, and to evict, and so persist, the entities
it must no longer hold: all of them on stop, a shard's on handoff, so that a
shard coming back never finds stale state).
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar, overload

import structlog

from ..codec import decode_payload, encode_payload, message_type
from ..envelope import Envelope
from ..errors import (
    BadRequestError,
    ConfigurationError,
    NoHandlerError,
    PayloadError,
)
from ._stream import stream_to

__all__ = [
    "Handler",
    "Router",
    "decode_message",
    "start_handler",
    "stop_handler",
    "shard_released",
]

#: The shape of every handler a node runs.
Handler = Callable[[Envelope], Awaitable[bytes | None]]

M = TypeVar("M")
#: A typed route: ``async def (msg[, env]) -> reply`` or an async generator.
F = TypeVar("F", bound=Callable[..., Any])

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

    def register(self, message: type[Any] | str, handler: Callable[..., Any]) -> None:
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
    def on(self, message: type[M]) -> Callable[[F], F]: ...

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


def decode_message(env: Envelope, cls: type[M]) -> M:
    """The payload of ``env`` as a ``cls``, validated (its ``validate()``, when it has
    one: peers in other languages may skip the sender-side check).

    Raises :class:`BadRequestError` saying why it does not decode or is invalid.
    """
    try:
        msg = decode_payload(env.data, cls)
        validate = getattr(msg, "validate", None)
        if callable(validate):
            validate()
    except PayloadError as exc:
        raise BadRequestError(f"payload of {env.type!r} does not decode: {exc}") from exc
    except Exception as exc:
        raise BadRequestError(f"invalid {env.type!r} payload: {exc}") from exc
    return msg


def _typed(cls: type[Any], fn: Callable[..., Any]) -> Handler:
    pass_env = _wants_envelope(fn)
    if inspect.isasyncgenfunction(fn):

        async def streamed(env: Envelope) -> bytes | None:
            msg = decode_message(env, cls)
            return await stream_to(fn(msg, env) if pass_env else fn(msg), encode_payload)

        return streamed

    async def typed(env: Envelope) -> bytes:
        msg = decode_message(env, cls)
        result = await (fn(msg, env) if pass_env else fn(msg))
        return b"" if result is None else encode_payload(result)

    return typed
