"""Stateful per-user sessions with KeyHandler: idle eviction, persistence, reload.

Each user key gets its own ``Session`` entity (a small class with a Router
inside). The KeyHandler creates it on the key's first message, loading any
saved state from ``STORE`` (a dict standing in for a database). A session
unused for ``idle_timeout`` seconds is evicted; the ``on_evict`` hook saves it
into ``STORE`` first. The next message for that user creates a fresh entity
that reloads the saved cart, so nothing is lost. Stopping the node evicts (and
so saves) every session that is still in memory.

Run it:  python examples/key_handler_sessions/main.py
"""

import asyncio
import logging
import sys
from dataclasses import dataclass, field

import structlog

from clstr import Client, Envelope, Handler, KeyHandler, MemoryTransport, Node, Router

#: Saved sessions by user: what a database would hold.
STORE: dict[str, list[str]] = {}
IDLE_TIMEOUT = 0.2


@dataclass
class AddItem:
    item: str


@dataclass
class GetCart:
    pass


@dataclass
class Cart:
    user: str
    items: list[str] = field(default_factory=list)
    loaded_from_store: bool = False


class Session:
    """One user's session: its cart lives here while the user is active."""

    def __init__(self, user: str, items: list[str], loaded: bool) -> None:
        self.user = user
        self.items = items
        self.loaded = loaded
        self.router = Router()
        self.router.register(AddItem, self.add_item)
        self.router.register(GetCart, self.get_cart)

    async def add_item(self, msg: AddItem) -> Cart:
        self.items.append(msg.item)
        return self.cart()

    async def get_cart(self, msg: GetCart) -> Cart:
        return self.cart()

    def cart(self) -> Cart:
        return Cart(user=self.user, items=list(self.items), loaded_from_store=self.loaded)

    async def __call__(self, env: Envelope) -> bytes | None:
        return await self.router(env)


async def load_session(user: str) -> Session:
    """The KeyHandler factory: build a user's session, from saved state if any."""
    saved = STORE.pop(user, None)
    print(f"  [load]  {user}: " + (f"reloaded {saved} from the store" if saved else "new session"))
    return Session(user, saved or [], loaded=saved is not None)


async def main() -> None:
    evicted: dict[str, asyncio.Event] = {}

    async def save_session(user: str, handler: Handler) -> None:
        """The on_evict hook: persist the session before it leaves memory."""
        assert isinstance(handler, Session)
        STORE[user] = list(handler.items)
        print(f"  [evict] {user}: saved {handler.items} to the store")
        evicted.setdefault(user, asyncio.Event()).set()

    sessions = KeyHandler(
        load_session, max_keys=1000, idle_timeout=IDLE_TIMEOUT, on_evict=save_session
    )
    network = MemoryTransport()
    async with (
        Node(network.connect("node"), sessions, node_id="node-1", num_shards=8),
        Client(network.connect("client"), num_shards=8) as client,
    ):
        alice, bob = client.key("alice"), client.key("bob")
        print("alice and bob shop:")
        await alice.call(AddItem("book"), Cart)
        await bob.call(AddItem("lamp"), Cart)
        cart = await alice.call(AddItem("pen"), Cart)
        print(f"  alice's cart: {cart.items}; sessions in memory: {len(sessions)}")

        print(f"both go idle for more than {IDLE_TIMEOUT}s:")
        for user in ("alice", "bob"):
            await evicted.setdefault(user, asyncio.Event()).wait()
        print(f"  sessions in memory: {len(sessions)}; in the store: {sorted(STORE)}")

        print("alice comes back:")
        cart = await alice.call(GetCart(), Cart)
        print(f"  alice's cart: {cart.items} (loaded from store: {cart.loaded_from_store})")
        cart = await alice.call(AddItem("ink"), Cart)
        print(f"  alice's cart: {cart.items}")

        print("the node stops (every session still in memory is saved):")
    print(f"store at exit: {dict(sorted(STORE.items()))}")


if __name__ == "__main__":
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )
    asyncio.run(main())
