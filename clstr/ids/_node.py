"""A node's snowflake generator, with the machine-id source its transport calls for."""

from __future__ import annotations

import weakref
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager

from ..node import Node
from ..transports.memory import MemoryNetwork, MemoryTransport
from ._lease import LeaseSettings, MachineIdLease
from ._machine import LocalMachineIds
from ._snowflake import DEFAULT_MAX_LEAD, Snowflake

__all__ = ["node_snowflake"]

# The nodes of one memory network run in one process: one allocator per
# network keeps their machine ids apart (and goes away with the network).
_local: weakref.WeakKeyDictionary[MemoryNetwork, LocalMachineIds] = weakref.WeakKeyDictionary()


def node_snowflake(
    node: Node,
    *,
    settings: LeaseSettings | None = None,
    max_lead: float = DEFAULT_MAX_LEAD,
) -> AbstractAsyncContextManager[Snowflake]:
    """A :class:`Snowflake` for ``node``, its machine id held while the context is open.

    On NATS the id is a :class:`MachineIdLease` in the node's cluster (its
    prefix; the node id is written as the owner); on the memory transport it
    comes from an allocator shared by the nodes of the same network. Raises
    :class:`~clstr.errors.MachineIdUnavailableError` when no id is free::

        async with node_snowflake(node) as ids:
            order_id = ids.next_id()
    """
    return _node_snowflake(node, settings, max_lead)


@asynccontextmanager
async def _node_snowflake(
    node: Node, settings: LeaseSettings | None, max_lead: float
) -> AsyncIterator[Snowflake]:
    transport = node.transport
    if isinstance(transport, MemoryTransport):
        pool = _local.setdefault(transport.network, LocalMachineIds())
        with pool.take() as local:
            yield Snowflake(local, max_lead=max_lead)
        return
    from ..transports.nats import NatsTransport

    if not isinstance(transport, NatsTransport):
        raise TypeError(
            f"node_snowflake needs a MemoryTransport or a NatsTransport, got {type(transport)!r}"
        )
    lease = MachineIdLease(transport, prefix=node.prefix, owner=node.node_id, settings=settings)
    async with lease:
        yield Snowflake(lease, max_lead=max_lead)
