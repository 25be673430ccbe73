"""pytest plugin of the clstr testing kit (registered through the ``pytest11``
entry point, so installing clstr is enough).

Fixtures:

* ``clstr_nats_server``: a real nats-server with JetStream, one per test session.
* ``clstr_nats_url``: its URL.
* ``clstr_memory_transport``: a fresh :class:`~clstr.MemoryTransport`, closed after the test.
* ``clstr_cluster``: a factory ``clstr_cluster(transport, nodes=3, handler=...)`` that
  builds, starts and (after the test) stops :class:`~clstr.testing.TestCluster`\\ s.

The async fixtures need pytest-asyncio (``pip install 'clstr[testing]'``);
without it only the server fixtures exist.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest

from ..transports.memory import MemoryTransport
from ._cluster import TestCluster, create_test_cluster
from ._server import NatsServer


@pytest.fixture(scope="session")
def clstr_nats_server() -> Iterator[NatsServer]:
    """A real nats-server (JetStream on) on a free port for the whole session."""
    with NatsServer() as server:
        yield server


@pytest.fixture(scope="session")
def clstr_nats_url(clstr_nats_server: NatsServer) -> str:
    """The URL of :func:`clstr_nats_server`."""
    return str(clstr_nats_server.url)


try:
    import pytest_asyncio

    _HAVE_PYTEST_ASYNCIO = True
except ImportError:  # pragma: no cover - the testing extra brings it
    _HAVE_PYTEST_ASYNCIO = False

if _HAVE_PYTEST_ASYNCIO:

    @pytest_asyncio.fixture
    async def clstr_memory_transport() -> AsyncIterator[MemoryTransport]:
        """A fresh in-memory transport (its own network), closed after the test."""
        transport = MemoryTransport()
        try:
            yield transport
        finally:
            await transport.close()

    @pytest_asyncio.fixture
    async def clstr_cluster() -> AsyncIterator[Callable[..., Awaitable[TestCluster]]]:
        """A factory of started test clusters, all stopped after the test."""
        started: list[TestCluster] = []

        async def make(*args: Any, **kwargs: Any) -> TestCluster:
            cluster = create_test_cluster(*args, **kwargs)
            await cluster.start()
            started.append(cluster)
            return cluster

        try:
            yield make
        finally:
            for cluster in reversed(started):
                await cluster.stop()
