"""Shared fixtures: both transports for the contract suite, the task-leak guard, and
structlog's configuration put back after each test."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import pytest
import pytest_asyncio
import structlog

from clstr import MemoryNetwork, MemoryTransport, Transport
from clstr.testing import NatsServer

Connect = Callable[[str], Awaitable[Transport]]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Every async test gets the leak guard.
    for item in items:
        fn = getattr(item, "function", None)
        if fn is not None and inspect.iscoroutinefunction(fn):
            item.fixturenames.insert(0, "no_leaked_tasks")  # type: ignore[attr-defined]


@pytest.fixture(autouse=True)
def restore_structlog() -> Iterator[None]:
    """Whatever a test configures (``clstr.cli.main`` configures structlog globally, as a
    command does), the next test starts from the configuration before it: a filter
    left behind would hide the log lines later tests check."""
    saved = structlog.get_config()
    try:
        yield
    finally:
        structlog.configure(**saved)


@pytest_asyncio.fixture
async def no_leaked_tasks() -> AsyncIterator[None]:
    """Fail the test if it leaves a task running (after a short grace for cancellations)."""
    before = asyncio.all_tasks()
    yield
    me = asyncio.current_task()
    left = {t for t in asyncio.all_tasks() - before if t is not me and not t.done()}
    if left:
        _, pending = await asyncio.wait(left, timeout=2.0)
        assert not pending, f"tasks leaked by the test: {[repr(t.get_coro()) for t in pending]}"


@pytest.fixture(params=["memory", "nats"])
def transport_kind(request: pytest.FixtureRequest) -> str:
    """Run the test once per transport."""
    return str(request.param)


@pytest_asyncio.fixture
async def connect(transport_kind: str, request: pytest.FixtureRequest) -> AsyncIterator[Connect]:
    """A factory of transports that all reach each other (one network / one server).

    Every transport it made is closed after the test.
    """
    made: list[Transport] = []
    if transport_kind == "memory":
        network = MemoryNetwork()

        async def make(name: str) -> Transport:
            transport = MemoryTransport(network, name=name)
            made.append(transport)
            return transport

    else:
        server: NatsServer = request.getfixturevalue("clstr_nats_server")
        from clstr.transports.nats import NatsOptions, NatsTransport

        async def make(name: str) -> Transport:
            transport = await NatsTransport.connect(server.url, NatsOptions(name=name))
            made.append(transport)
            return transport

    try:
        yield make
    finally:
        for transport in made:
            await transport.close()
