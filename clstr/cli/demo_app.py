"""The demo service that ``clstr dev up`` and ``clstr demo`` run on every node.

Run it yourself with ``clstr node --app clstr.demo_app:app ...``. Every key is
an entity (a :class:`~clstr.KeyHandler` entry, behind a :class:`~clstr.Router`
of the types below) with its own state, and every
reply names the node that made it, so you can watch keys land on their owner:

============  ======================  =========================================
type          payload (JSON)          reply
============  ======================  =========================================
``Greet``     ``{"name": "ann"}``     ``{"text", "node", "visits"}``; visits
                                      counts this key's greetings
``counter.add`` ``{"by": 1}``         ``{"key", "value", "node"}``
``counter.get`` none                  ``{"key", "value", "node"}``
``whoami``    none                    ``{"key", "shard", "node"}``
``echo``      anything                the payload itself
============  ======================  =========================================
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Final

import structlog

from ..codec import encode_payload
from ..envelope import Envelope
from ..handlers import KeyHandler, Router

__all__ = ["MESSAGE_TYPES", "Greet", "Greeting", "Add", "Count", "Where", "app"]

_log = structlog.get_logger("clstr.demo")


@dataclass
class Greet:
    """Greet the user the key names."""

    name: str


@dataclass
class Greeting:
    """The greeting, the node that made it, and how often this key was greeted."""

    text: str
    node: str
    visits: int


@dataclass
class Add:
    """Add ``by`` to the key's counter."""

    message_type: ClassVar[str] = "counter.add"

    by: int = 1


@dataclass
class Count:
    """A counter's value and the node that holds it."""

    key: str
    value: int
    node: str


@dataclass
class Where:
    """Where a key lives."""

    key: str
    shard: int
    node: str


#: The message types of the demo app.
MESSAGE_TYPES: Final = ("Greet", "counter.add", "counter.get", "whoami", "echo")


def app(node_id: str) -> Router:
    """The demo handler of the node ``node_id``: one entity per key.

    A :class:`~clstr.Router` in front of the entities' :class:`~clstr.KeyHandler`
    names the message types, so a node's info lists them (``clstr request``
    refuses an unknown type before sending it) and an unknown type creates no
    entity.
    """

    def entity(key: str) -> Router:
        visits = 0
        value = 0
        router = Router()

        @router.on(Greet)
        async def greet(msg: Greet) -> Greeting:
            nonlocal visits
            visits += 1
            _log.debug("greet", key=key, visits=visits)
            return Greeting(f"hello {msg.name}", node_id, visits)

        @router.on(Add)
        async def add(msg: Add) -> Count:
            nonlocal value
            value += msg.by
            return Count(key, value, node_id)

        @router.on("counter.get")
        async def get(env: Envelope) -> bytes:
            return encode_payload(Count(key, value, node_id))

        @router.on("whoami")
        async def whoami(env: Envelope) -> bytes:
            return encode_payload(Where(key, env.shard, node_id))

        @router.on("echo")
        async def echo(env: Envelope) -> bytes:
            return env.data

        return router

    entities = KeyHandler(entity, max_keys=100_000, idle_timeout=600.0)
    front = Router()
    for name in MESSAGE_TYPES:
        front.mount(name, entities)
    return front
