"""Seeing the cluster: NATS service discovery and the cluster view.

* :class:`ServiceDiscovery` answers the NATS micro protocol (``$SRV.PING``,
  ``$SRV.INFO``, ``$SRV.STATS``) for a node, with its live shards as endpoints.
* :func:`gather_view` builds a :class:`ClusterView` from those answers and a
  probe of every shard (what ``clstr status`` shows).
"""

from __future__ import annotations

from ._discovery import (
    DEFAULT_SERVICE_NAME,
    INFO_RESPONSE_TYPE,
    PING_RESPONSE_TYPE,
    STATS_RESPONSE_TYPE,
    VERBS,
    EndpointCounters,
    ServiceDiscovery,
    ShardStats,
    control_subject,
    discover,
)
from ._status import (
    ClusterView,
    NodeView,
    announced_shards,
    gather_view,
    render_table,
    shard_ranges,
)

__all__ = [
    "DEFAULT_SERVICE_NAME",
    "VERBS",
    "INFO_RESPONSE_TYPE",
    "PING_RESPONSE_TYPE",
    "STATS_RESPONSE_TYPE",
    "ServiceDiscovery",
    "ShardStats",
    "EndpointCounters",
    "control_subject",
    "discover",
    "ClusterView",
    "NodeView",
    "announced_shards",
    "gather_view",
    "render_table",
    "shard_ranges",
]
