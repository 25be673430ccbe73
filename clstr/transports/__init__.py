"""Transports move bytes between clients and nodes.

:class:`MemoryTransport` runs a whole cluster in one process;
:class:`~clstr.transports.nats.NatsTransport` runs it over NATS. Importing
this package does not import nats-py: the NATS transport is loaded on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .base import ConnectionEvent, ConnectionListener, MessageCallback, Subscription, Transport
from .memory import MemoryNetwork, MemoryTransport

if TYPE_CHECKING:
    from .nats import NatsOptions, NatsTransport

__all__ = [
    "ConnectionEvent",
    "ConnectionListener",
    "MessageCallback",
    "Subscription",
    "Transport",
    "MemoryNetwork",
    "MemoryTransport",
    "NatsOptions",
    "NatsTransport",
]


def __getattr__(name: str) -> Any:
    if name in ("NatsTransport", "NatsOptions"):
        from . import nats

        return getattr(nats, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
