"""An N-node test cluster on either transport, in one process."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any, Self

from ..client import Client
from ..errors import ConfigurationError
from ..handlers import Handler
from ..hashing import owner_of
from ..node import Node
from ..transports.base import Transport
from ..transports.memory import MemoryTransport

__all__ = ["TestCluster", "create_test_cluster"]


class TestCluster:
    """Nodes sharing a static member list, plus a client, on one transport kind.

    Each node and the client get a connection of their own (a NATS
    connection each, or a memory transport each on one network), the way
    separate processes would. Use it as an async context manager: it starts
    every node (returning once all shards are served) and stops everything,
    connections included, on exit.
    """

    __test__ = False  # not a pytest test class

    def __init__(
        self,
        transport: MemoryTransport | str | Sequence[str],
        node_ids: Sequence[str],
        *,
        num_shards: int,
        seed: str,
        handler: Any,
        per_node_handler: bool,
        client_options: dict[str, Any],
        node_options: dict[str, Any],
    ) -> None:
        self._source = transport
        self.node_ids = list(node_ids)
        self.num_shards = num_shards
        self.seed = seed
        self._handler = handler
        self._per_node = per_node_handler
        self._client_options = client_options
        self._node_options = node_options
        self.nodes: list[Node] = []
        self._transports: list[Transport] = []
        self._client: Client | None = None

    @property
    def client(self) -> Client:
        """A client of the cluster (on its own connection)."""
        if self._client is None:
            raise RuntimeError("the test cluster is not started; use 'async with'")
        return self._client

    async def _connect(self, name: str) -> Transport:
        if isinstance(self._source, MemoryTransport):
            transport: Transport = self._source.connect(name)
        else:
            from ..transports.nats import NatsOptions, NatsTransport

            transport = await NatsTransport.connect(self._source, NatsOptions(name=name))
        self._transports.append(transport)
        return transport

    def node(self, node_id: str) -> Node:
        """The node with id ``node_id``."""
        for n in self.nodes:
            if n.node_id == node_id:
                return n
        raise KeyError(node_id)

    def owner_of_key(self, key: str) -> str:
        """The id of the node that owns ``key`` by HRW."""
        return owner_of(self.client.shard_for(key), self.node_ids, self.seed)

    async def start(self) -> None:
        """Connect and start every node, then the client."""
        try:
            for node_id in self.node_ids:
                handler: Any = self._handler(node_id) if self._per_node else self._handler
                node = Node(
                    await self._connect(node_id),
                    handler,
                    node_id=node_id,
                    nodes=self.node_ids,
                    num_shards=self.num_shards,
                    seed=self.seed,
                    **self._node_options,
                )
                self.nodes.append(node)
                await node.start()
            self._client = Client(
                await self._connect("client"),
                num_shards=self.num_shards,
                seed=self.seed,
                **self._client_options,
            )
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        """Stop every node and close every connection."""
        for node in self.nodes:
            await node.stop()
        if self._client is not None:
            await self._client.close()
        for transport in self._transports:
            await transport.close()
        self._transports.clear()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()


def create_test_cluster(
    transport: MemoryTransport | str | Sequence[str],
    nodes: int | Sequence[str] = 3,
    *,
    num_shards: int = 64,
    seed: str = "",
    handler: Handler | None = None,
    handler_factory: Callable[[str], Handler] | None = None,
    client_options: dict[str, Any] | None = None,
    **node_options: Any,
) -> TestCluster:
    """Build a test cluster; start it with ``async with``.

    ``transport`` is a :class:`MemoryTransport` (every member joins its
    network) or NATS server URL(s). ``nodes`` is a count (ids ``node-0``...)
    or a list of ids. Give either one ``handler`` for all nodes or a
    ``handler_factory(node_id)``. Extra keyword arguments go to every
    :class:`~clstr.Node`.
    """
    if (handler is None) == (handler_factory is None):
        raise ConfigurationError("pass exactly one of handler or handler_factory")
    node_ids = [f"node-{i}" for i in range(nodes)] if isinstance(nodes, int) else list(nodes)
    if not node_ids:
        raise ConfigurationError("a test cluster needs at least one node")
    chosen: Any = handler_factory if handler_factory is not None else handler
    return TestCluster(
        transport,
        node_ids,
        num_shards=num_shards,
        seed=seed,
        handler=chosen,
        per_node_handler=handler_factory is not None,
        client_options=client_options or {},
        node_options=node_options,
    )
