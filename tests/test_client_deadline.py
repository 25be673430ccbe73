"""One deadline per request: what the client sends as TTL, and why.

The client waits at most ``timeout``; the envelope's TTL is the same deadline
less a reserve for the reply's way back, so that a handler too slow for its
deadline ends in the node's ``HandlerTimeoutError`` reaching the caller, not in
the caller's own ``RequestTimeoutError``. These tests run on virtual time and
the memory transport, so the reply's way back takes exactly what a fault rule
says it takes.
"""

from __future__ import annotations

import asyncio

import pytest

from clstr import (
    Client,
    Envelope,
    HandlerTimeoutError,
    MemoryNetwork,
    Node,
    RequestTimeoutError,
)
from clstr.testing import virtual_time


async def stuck(env: Envelope) -> bytes:
    await asyncio.Event().wait()
    return b""


class TestReplyReserve:
    @pytest.mark.parametrize(
        ("timeout", "ttl"),
        [
            (0.02, 0.01),  # short budgets: the handler keeps half
            (0.3, 0.25),  # at least 50 ms kept back
            (1.0, 0.9),  # a tenth
            (10.0, 9.75),  # at most 250 ms
        ],
    )
    async def test_ttl_is_the_timeout_less_the_reserve(self, timeout: float, ttl: float) -> None:
        """The TTL a node receives is the call's timeout less the reply reserve:
        a tenth, at least 50 ms, at most 250 ms, never more than half."""
        seen: list[float | None] = []

        async def record(env: Envelope) -> bytes:
            seen.append(env.ttl)
            return b""

        async with virtual_time():
            network = MemoryNetwork()
            async with Node(network.connect("node"), record, num_shards=1):
                client = Client(network.connect("client"), num_shards=1)
                await client.request_shard(0, "t", timeout=timeout)
        assert seen == [pytest.approx(ttl, abs=0.0011)]

    @pytest.mark.parametrize(
        ("timeout", "held_up"), [(0.3, 0.04), (2.0, 0.15), (10.0, 0.2), (60.0, 0.24)]
    )
    async def test_node_timeout_survives_a_slow_way_back(
        self, timeout: float, held_up: float
    ) -> None:
        """When the node's timeout answer is held up on its way back for less than
        the reserve (a busy loop, a slow link), the caller still gets the node's
        HandlerTimeoutError, at about its deadline."""
        async with virtual_time():
            network = MemoryNetwork()
            network.faults.delay(held_up, src="node")
            loop = asyncio.get_running_loop()
            async with Node(network.connect("node"), stuck, num_shards=1):
                client = Client(network.connect("client"), num_shards=1)
                started = loop.time()
                with pytest.raises(HandlerTimeoutError):
                    await client.request_shard(0, "stuck", timeout=timeout)
                assert loop.time() - started <= timeout

    async def test_a_reply_later_than_the_timeout_is_the_callers_timeout(self) -> None:
        """The client never waits past its timeout: a reply held up beyond the
        reserve ends in RequestTimeoutError at the timeout itself."""
        async with virtual_time():
            network = MemoryNetwork()
            network.faults.delay(0.5, src="node")
            loop = asyncio.get_running_loop()
            async with Node(network.connect("node"), stuck, num_shards=1):
                client = Client(network.connect("client"), num_shards=1)
                started = loop.time()
                with pytest.raises(RequestTimeoutError):
                    await client.request_shard(0, "stuck", timeout=1.0)
                assert loop.time() - started == pytest.approx(1.0, abs=0.002)
