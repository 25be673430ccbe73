"""Defining an entity type: a class with typed message handlers and optional state.

::

    @dataclass
    class CartState:
        items: list[str] = field(default_factory=list)

    class Cart(Entity[CartState]):
        state_type = CartState          # persisted when the host has a state store
        idle_timeout = 300.0            # passivate after 5 idle minutes

        @handles
        async def add(self, msg: AddItem) -> Total:
            self.state.items.append(msg.item)
            return Total(len(self.state.items))

An instance lives on the node that owns its shard, one per entity id, created
on its first message, passivated when idle (its state saved), moved with its
shard. Per-key order holds: one message at a time per entity.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, TypeVar, overload

from ..codec import message_type
from ..errors import ConfigurationError
from ..protocol import ENTITY_SEPARATOR, entity_type_name
from ._store import RECORD_REPLIES

__all__ = ["Entity", "EntityContext", "EntitySpec", "handles", "spec_of"]

S = TypeVar("S")
F = TypeVar("F", bound=Callable[..., Any])

_HANDLES: typing.Final = "__clstr_handles__"


@dataclass(frozen=True, slots=True)
class EntityContext:
    """Where an entity instance lives: its type, id, shard and node."""

    entity_type: str
    entity_id: str
    shard: int
    node_id: str


class Entity(Generic[S]):
    """Base class of entity types (see the module docstring).

    Class settings (override in the subclass):

    * ``type_name``: the name on the wire (default: the class name; no ``/``).
    * ``state_type``: a dataclass (or ``None``): ``self.state`` starts as
      ``state_type()`` or as loaded from the host's state store.
    * ``save_every``: with a store, save after every ``n`` handled messages
      (``1``, the default: write-through, saved before the reply goes out;
      ``0``: only when passivated or handed off).
    * ``idle_timeout``: seconds unused before passivation (``None``: never).
    * ``max_instances``: live instances of this type per node (least recently
      used passivate first).
    * ``shard_group``: the shard group (see :class:`~clstr.entities.Sharding`).
    * ``stored_replies``: with a store, how many replies of the requests that
      changed the state are kept with it (the newest; at most 64), so that a
      retry after a crash gets its first reply; ``0`` for an entity that answers
      repeats itself (the ledger's accounts find them by their nonce).

    Hooks: ``async on_start()`` after the state is loaded, ``async on_stop()``
    before it is saved on passivation.
    """

    type_name: ClassVar[str]
    state_type: ClassVar[type[Any] | None] = None
    save_every: ClassVar[int] = 1
    idle_timeout: ClassVar[float | None] = 600.0
    max_instances: ClassVar[int] = 10_000
    shard_group: ClassVar[str] = "default"
    stored_replies: ClassVar[int] = 64

    def __init__(self, context: EntityContext, state: S) -> None:
        self.context = context
        self.state = state

    @property
    def id(self) -> str:
        """This instance's entity id."""
        return self.context.entity_id

    async def on_start(self) -> None:
        """Called once the instance exists and its state is loaded."""

    async def on_stop(self) -> None:
        """Called when the instance passivates (idle, evicted, its shard moving,
        the node stopping), before its state is saved."""


@overload
def handles(fn: F, /) -> F: ...


@overload
def handles(message: type[Any], /) -> Callable[[F], F]: ...


def handles(arg: Any, /) -> Any:
    """Mark an entity method as the handler of a message class: ``@handles`` reads
    the class from the annotation of its first parameter, ``@handles(AddItem)``
    names it. The method returns the reply (msgpack-encoded; ``None``: empty)."""
    if isinstance(arg, type):
        message = arg

        def mark(fn: F) -> F:
            setattr(fn, _HANDLES, message)
            return fn

        return mark
    setattr(arg, _HANDLES, None)  # resolved from the annotation by spec_of
    return arg


@dataclass(frozen=True, slots=True)
class EntitySpec:
    """What the host needs of an entity class, read once."""

    cls: type[Entity[Any]]
    type_name: str
    state_type: type[Any] | None
    save_every: int
    idle_timeout: float | None
    max_instances: int
    shard_group: str
    stored_replies: int
    #: message type -> (payload class, unbound method)
    routes: dict[str, tuple[type[Any], Callable[..., Awaitable[Any]]]]

    @property
    def message_types(self) -> list[str]:
        return sorted(self.routes)


_SPECS: dict[type[Any], EntitySpec] = {}


def spec_of(cls: type[Entity[Any]]) -> EntitySpec:
    """The :class:`EntitySpec` of an entity class, checked (once per class).

    Raises :class:`ConfigurationError` saying what is wrong with the class.
    """
    spec = _SPECS.get(cls)
    if spec is None:
        spec = _SPECS[cls] = _build(cls)
    return spec


def _build(cls: type[Entity[Any]]) -> EntitySpec:
    if not (isinstance(cls, type) and issubclass(cls, Entity)):
        raise ConfigurationError(f"an entity type is a subclass of clstr.Entity, got {cls!r}")
    name = entity_type_name(cls)
    if ENTITY_SEPARATOR in name:
        raise ConfigurationError(f"entity type name {name!r} may not contain {ENTITY_SEPARATOR!r}")
    if cls.save_every < 0:
        raise ConfigurationError(f"{name}.save_every must be >= 0, got {cls.save_every}")
    if cls.max_instances < 1:
        raise ConfigurationError(f"{name}.max_instances must be >= 1, got {cls.max_instances}")
    if not 0 <= cls.stored_replies <= RECORD_REPLIES:
        raise ConfigurationError(
            f"{name}.stored_replies must be 0 to {RECORD_REPLIES}, got {cls.stored_replies}"
        )
    if cls.state_type is not None:
        try:
            cls.state_type()
        except Exception as exc:
            raise ConfigurationError(
                f"{name}.state_type must build its initial state without arguments "
                f"(give its fields defaults): {exc}"
            ) from exc
    routes: dict[str, tuple[type[Any], Callable[..., Awaitable[Any]]]] = {}
    for attr, fn in inspect.getmembers(cls, _is_async):
        if not hasattr(fn, _HANDLES):
            continue
        message = getattr(fn, _HANDLES) or _annotated_message(cls, fn)
        msg_type = message_type(message)
        if msg_type in routes:
            raise ConfigurationError(
                f"{name}: message type {msg_type!r} has two handlers ({attr} and another)"
            )
        routes[msg_type] = (message, fn)
    if not routes:
        raise ConfigurationError(f"entity type {name} has no @handles methods")
    return EntitySpec(
        cls,
        name,
        cls.state_type,
        cls.save_every,
        cls.idle_timeout,
        cls.max_instances,
        cls.shard_group,
        cls.stored_replies,
        routes,
    )


def _is_async(fn: object) -> bool:
    return inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn)


def _annotated_message(cls: type[Any], fn: Callable[..., Any]) -> type[Any]:
    params = list(inspect.signature(fn).parameters.values())[1:]  # after self
    hints = typing.get_type_hints(fn, globalns=vars(inspect.getmodule(cls) or object))
    if not params or params[0].name not in hints or not isinstance(hints[params[0].name], type):
        raise ConfigurationError(
            f"{cls.__name__}.{fn.__name__}: annotate the message parameter with its class, "
            "or name it: @handles(MessageClass)"
        )
    message: type[Any] = hints[params[0].name]
    return message
