"""Seeing the cluster: NATS service discovery and the cluster view.

* :class:`ServiceDiscovery` answers the NATS micro protocol (``$SRV.PING``,
  ``$SRV.INFO``, ``$SRV.STATS``) for a node, with its live shards as endpoints.
* :func:`gather_view` builds a :class:`ClusterView` from those answers and a
  probe of every shard (what ``clstr status`` shows).
* :class:`Dashboard` (and :func:`serve_dashboard`) serves a live web page of
  the cluster from the same answers and the membership buckets
  (docs/observability.md); :class:`ClusterWatch` is its data alone.
* :class:`LatencyHistogram` is the bounded histogram behind the time in node
  (p50/p99) that nodes publish.
"""

from __future__ import annotations

from ._collector import ClusterWatch
from ._dashboard import DEFAULT_DASHBOARD_PORT, Dashboard, serve_dashboard
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
from ._latency import LatencyHistogram
from ._settings import DashboardSettings
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
    "Dashboard",
    "DashboardSettings",
    "DEFAULT_DASHBOARD_PORT",
    "serve_dashboard",
    "ClusterWatch",
    "LatencyHistogram",
]
