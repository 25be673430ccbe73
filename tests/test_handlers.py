"""Router and KeyHandler, driven directly with envelopes (no transport needed)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest

from clstr import (
    BadRequestError,
    ConfigurationError,
    Envelope,
    Handler,
    KeyHandler,
    KeyRequiredError,
    NoHandlerError,
    Router,
    decode_payload,
    encode_payload,
)

T = TypeVar("T")


@dataclass
class Ping:
    n: int


@dataclass
class Pong:
    n: int


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class TestRouter:
    async def test_typed_route_decodes_and_encodes(self) -> None:
        """A typed route gets the decoded dataclass and its return value is encoded."""
        router = Router()

        @router.on(Ping)
        async def ping(msg: Ping) -> Pong:
            return Pong(msg.n + 1)

        reply = await router(Envelope("Ping", encode_payload(Ping(1))))
        assert reply is not None
        assert decode_payload(reply, Pong) == Pong(2)

    async def test_handler_with_two_parameters_gets_the_envelope(self) -> None:
        """A typed handler that takes a second parameter receives the envelope."""
        router = Router()
        seen: list[str | None] = []

        @router.on(Ping)
        async def ping(msg: Ping, env: Envelope) -> None:
            seen.append(env.key)

        assert await router(Envelope("Ping", encode_payload(Ping(1)), key="k")) == b""
        assert seen == ["k"]

    async def test_raw_route_passes_bytes_through(self) -> None:
        """A route registered by type name gets the envelope and returns bytes as they are."""
        router = Router()
        router.register("echo", _echo)
        assert await router(Envelope("echo", b"\x00\x01")) == b"\x00\x01"

    async def test_unknown_type_is_no_handler(self) -> None:
        """An unregistered type raises NoHandlerError listing the known types."""
        router = Router()
        router.register("echo", _echo)
        with pytest.raises(NoHandlerError, match=r"'nope'.*\['echo'\]"):
            await router(Envelope("nope"))

    async def test_undecodable_payload_is_bad_request(self) -> None:
        """A payload that does not fit the route's class raises BadRequestError."""
        router = Router()

        @router.on(Ping)
        async def ping(msg: Ping) -> None:
            raise AssertionError("must not run")

        with pytest.raises(BadRequestError, match="Ping"):
            await router(Envelope("Ping", encode_payload({"wrong": 1})))

    async def test_mount_passes_the_envelope(self) -> None:
        """mount() routes a payload class's type to a plain handler that gets the envelope."""
        router = Router()
        router.mount(Ping, _echo)
        data = encode_payload(Ping(3))
        assert await router(Envelope("Ping", data)) == data

    async def test_node_side_validate_refuses_bad_payloads(self) -> None:
        """A payload class's validate() also runs on the node: failing it is bad_request."""

        @dataclass
        class Positive:
            n: int

            def validate(self) -> None:
                if self.n <= 0:
                    raise ValueError("n must be > 0")

        router = Router()

        @router.on(Positive)
        async def handle(msg: Positive) -> int:
            return msg.n

        assert (
            decode_payload(await router(Envelope("Positive", encode_payload({"n": 2}))) or b"", int)
            == 2
        )
        with pytest.raises(BadRequestError, match="n must be > 0"):
            await router(Envelope("Positive", encode_payload({"n": -1})))

    def test_duplicate_route_refused(self) -> None:
        """Registering the same message type twice is a configuration error."""
        router = Router()
        router.register("echo", _echo)
        with pytest.raises(ConfigurationError, match="already has a handler"):
            router.register("echo", _echo)

    async def test_lifecycle_hooks_reach_mounted_handlers(self) -> None:
        """on_start/on_stop of a router reach the handler objects mounted on it."""
        evicted: list[str] = []
        keys = KeyHandler(lambda key: _echo, on_evict=lambda key, h: evicted.append(key))
        router = Router()
        router.register("echo", keys)
        await router.on_start()
        await router(Envelope("echo", b"", key="a"))
        await router.on_stop()
        assert evicted == ["a"]


async def _echo(env: Envelope) -> bytes:
    return env.data


def counter_factory(created: list[str]) -> Callable[[str], Handler]:
    def make(key: str) -> Handler:
        created.append(key)
        count = 0

        async def handle(env: Envelope) -> bytes:
            nonlocal count
            count += 1
            return str(count).encode()

        return handle

    return make


class TestKeyHandler:
    async def test_one_entity_per_key(self) -> None:
        """Each key gets its own handler, built once and reused."""
        created: list[str] = []
        keys = KeyHandler(counter_factory(created))
        for _ in range(3):
            await keys(Envelope("inc", key="a"))
        assert await keys(Envelope("inc", key="a")) == b"4"
        assert await keys(Envelope("inc", key="b")) == b"1"
        assert created == ["a", "b"]

    async def test_async_factory(self) -> None:
        """The factory may be async (load the entity's state first)."""

        async def make(key: str) -> Handler:
            return _echo

        keys = KeyHandler(make)
        assert await keys(Envelope("e", b"x", key="k")) == b"x"

    async def test_missing_key_is_key_required(self) -> None:
        """A message without a key raises KeyRequiredError."""
        keys = KeyHandler(lambda key: _echo)
        with pytest.raises(KeyRequiredError, match="needs a key"):
            await keys(Envelope("e"))

    async def test_lru_bound_evicts_least_recently_used(self) -> None:
        """Past max_keys the least recently used key is evicted, and on_evict hears of it."""
        evicted: list[str] = []
        keys = KeyHandler(
            lambda key: _echo, max_keys=2, on_evict=lambda key, h: evicted.append(key)
        )
        for key in ("a", "b", "a", "c"):
            await keys(Envelope("e", key=key))
        assert evicted == ["b"]
        assert "a" in keys
        assert "c" in keys
        assert len(keys) == 2

    async def test_busy_entity_is_never_evicted(self) -> None:
        """An entity in the middle of a message is skipped by LRU eviction."""
        gate = asyncio.Event()
        entered = asyncio.Event()

        async def slow(env: Envelope) -> bytes:
            entered.set()
            await gate.wait()
            return b""

        evicted: list[str] = []
        keys = KeyHandler(
            lambda key: slow if key == "busy" else _echo,
            max_keys=1,
            on_evict=lambda key, h: evicted.append(key),
        )
        busy = asyncio.create_task(keys(Envelope("e", key="busy")))
        await entered.wait()
        await keys(Envelope("e", key="other"))
        assert "busy" in keys
        assert evicted == []  # nothing evictable: the only older entry is busy
        gate.set()
        await busy

    async def test_idle_entities_are_swept(self) -> None:
        """sweep() evicts keys unused for idle_timeout, on a controlled clock."""
        clock = FakeClock()
        evicted: list[str] = []

        async def on_evict(key: str, handler: Handler) -> None:
            evicted.append(key)

        keys = KeyHandler(lambda key: _echo, idle_timeout=10, on_evict=on_evict, clock=clock)
        await keys(Envelope("e", key="old"))
        clock.now = 8
        await keys(Envelope("e", key="new"))
        clock.now = 12
        assert await keys.sweep() == 1
        assert evicted == ["old"]
        assert "new" in keys

    async def test_shard_handoff_evicts_that_shards_entities(self) -> None:
        """on_shard_released evicts (through on_evict) exactly the entities of that shard."""
        evicted: list[str] = []
        keys = KeyHandler(lambda key: _echo, on_evict=lambda key, h: evicted.append(key))
        await keys(Envelope("e", key="on-3", shard=3))
        await keys(Envelope("e", key="also-3", shard=3))
        await keys(Envelope("e", key="on-5", shard=5))
        await keys.on_shard_released(3)
        assert sorted(evicted) == ["also-3", "on-3"]
        assert "on-5" in keys

    async def test_on_stop_evicts_everything(self) -> None:
        """on_stop evicts every entity so each can persist its state."""
        evicted: list[str] = []
        keys = KeyHandler(lambda key: _echo, on_evict=lambda key, h: evicted.append(key))
        await keys.on_start()
        for key in ("a", "b"):
            await keys(Envelope("e", key=key))
        await keys.on_stop()
        assert sorted(evicted) == ["a", "b"]
        assert len(keys) == 0

    async def test_failing_on_evict_does_not_break_the_handler(self) -> None:
        """An exception in on_evict is logged; eviction and handling go on."""

        def boom(key: str, handler: Handler) -> None:
            raise RuntimeError("disk full")

        keys = KeyHandler(lambda key: _echo, max_keys=1, on_evict=boom)
        await keys(Envelope("e", key="a"))
        assert await keys(Envelope("e", b"ok", key="b")) == b"ok"
        assert "a" not in keys

    @pytest.mark.parametrize(
        "kwargs", [{"max_keys": 0}, {"idle_timeout": 0}, {"idle_timeout": -1.0}]
    )
    def test_bad_settings_refused(self, kwargs: dict[str, float]) -> None:
        """Out-of-range settings raise ConfigurationError."""
        with pytest.raises(ConfigurationError):
            KeyHandler(lambda key: _echo, **kwargs)  # type: ignore[arg-type]


class Account:
    """An entity that loads its total from a store and is saved back on eviction."""

    def __init__(self, store: dict[str, int], key: str) -> None:
        self.total = store[key]

    async def __call__(self, env: Envelope) -> bytes:
        self.total += 1
        return str(self.total).encode()


class GatedStore:
    """A store whose saves (on_evict) wait at a gate, like a slow database write."""

    def __init__(self) -> None:
        self.data = {"k": 0}
        self.saving = asyncio.Event()
        self.release = asyncio.Event()

    async def save(self, key: str, entity: Handler) -> None:
        self.saving.set()
        await self.release.wait()
        assert isinstance(entity, Account)
        self.data[key] = entity.total

    def key_handler(self, clock: FakeClock, idle_timeout: float = 1.0) -> KeyHandler:
        return KeyHandler(
            lambda key: Account(self.data, key),
            idle_timeout=idle_timeout,
            on_evict=self.save,
            clock=clock,
        )


async def run_until_blocked(coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
    """Start ``coro`` in a task; return once it has run up to its first real wait
    (or to its end): no sleeping, no guessing."""
    began = asyncio.Event()

    async def run() -> T:
        began.set()  # does not yield: coro runs on in this same step
        return await coro

    task = asyncio.create_task(run())
    await began.wait()
    return task


class TestEvictionRaces:
    async def test_message_during_a_save_waits_and_sees_the_saved_state(self) -> None:
        """A message for a key whose eviction is still saving waits for the save, and
        its new entity starts from the saved state (not from the stale store)."""
        store, clock = GatedStore(), FakeClock()
        keys = store.key_handler(clock)
        env = Envelope("inc", key="k")
        assert [await keys(env), await keys(env)] == [b"1", b"2"]
        clock.now = 10  # idle
        sweep = asyncio.create_task(keys.sweep())
        await store.saving.wait()
        message = await run_until_blocked(keys(env))
        assert not message.done()  # it waits for the save
        store.release.set()
        assert await message == b"3"
        assert await sweep == 1
        await keys.evict_all()
        assert store.data == {"k": 3}

    async def test_shard_release_waits_for_a_save_under_way(self) -> None:
        """on_shard_released returns only once a sweep's save of that shard's key
        has ended, so the next owner loads what was saved."""
        store, clock = GatedStore(), FakeClock()
        keys = store.key_handler(clock)
        await keys(Envelope("inc", key="k", shard=3))
        clock.now = 10
        sweep = asyncio.create_task(keys.sweep())
        await store.saving.wait()
        released = await run_until_blocked(keys.on_shard_released(3))
        assert not released.done()
        store.release.set()
        await released
        assert store.data == {"k": 1}
        await sweep

    async def test_stop_lets_the_sweepers_save_finish(self) -> None:
        """on_stop does not cut short a save the idle sweeper has started."""
        store, clock = GatedStore(), FakeClock()
        keys = store.key_handler(clock, idle_timeout=0.02)
        await keys.on_start()
        await keys(Envelope("inc", key="k"))
        clock.now = 10
        await store.saving.wait()  # the sweeper is saving "k"
        stopping = await run_until_blocked(keys.on_stop())
        assert not stopping.done()
        store.release.set()
        await stopping
        assert store.data == {"k": 1}

    async def test_cancelling_on_stop_is_not_swallowed(self) -> None:
        """Cancelling on_stop while it waits for the sweeper raises CancelledError
        in the caller (and ends the sweeper), instead of being swallowed."""
        store, clock = GatedStore(), FakeClock()
        keys = store.key_handler(clock, idle_timeout=0.02)
        await keys.on_start()
        await keys(Envelope("inc", key="k"))
        clock.now = 10
        await store.saving.wait()
        stopping = await run_until_blocked(keys.on_stop())
        stopping.cancel()
        with pytest.raises(asyncio.CancelledError):
            await stopping


class TestNodeHooks:
    async def test_node_tells_handlers_when_a_shard_moves_away(self) -> None:
        """Releasing a shard on a running node evicts that shard's KeyHandler entities."""
        from clstr import Client, MemoryTransport, Node

        evicted: list[str] = []
        keys = KeyHandler(lambda key: _echo, on_evict=lambda key, h: evicted.append(key))
        transport = MemoryTransport()
        async with Node(transport, keys, num_shards=4) as node:
            client = Client(transport.connect("c"), num_shards=4)
            key = "k"
            shard = client.shard_for(key)
            await client.request_key(key, "e")
            await node.release(shard)
            assert evicted == [key]
            assert shard not in node.shards
