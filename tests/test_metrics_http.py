"""`clstr node --metrics-port`: Prometheus metrics over HTTP, scraped from a real
node process while it serves requests."""

from __future__ import annotations

import asyncio
import urllib.request
import uuid
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from prometheus_client.parser import text_string_to_metric_families

from clstr import Client, NoHandlerError
from clstr.demo_app import Greet, Greeting
from clstr.testing import NatsServer
from clstr.testing._processes import NodeProcess

NUM_SHARDS = 4
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> Samples:
    """Every sample of the node's /metrics, by name and labels."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


@pytest_asyncio.fixture
async def metered(clstr_nats_server: NatsServer) -> AsyncIterator[tuple[NodeProcess, str, int]]:
    """A `clstr node` child serving metrics on a free port: (process, prefix, port)."""
    prefix = f"metrics{uuid.uuid4().hex[:8]}"
    process = NodeProcess(
        "m1",
        clstr_nats_server.url,
        num_shards=NUM_SHARDS,
        prefix=prefix,
        static_nodes=["m1"],
        metrics_port=0,
    )
    await process.start()
    try:
        ready = await process.wait_ready(30)
        yield process, prefix, int(ready["metrics_port"])
    finally:
        await process.stop(timeout=15)


class TestMetricsEndpoint:
    async def test_handler_metrics_move_with_requests(
        self, metered: tuple[NodeProcess, str, int], clstr_nats_server: NatsServer
    ) -> None:
        """Requests show up in the node's request metrics (count and time in the node,
        queue wait included), clstr_cluster_handlers_total and the handler histogram."""
        _, prefix, port = metered
        before = await asyncio.to_thread(scrape, port)
        assert value(before, "clstr_cluster_shards_owned", node_id="m1") == NUM_SHARDS
        assert (
            value(before, "clstr_cluster_handlers_total", message_type="Greet", success="true") == 0
        )

        client = await Client.connect(clstr_nats_server.url, num_shards=NUM_SHARDS, prefix=prefix)
        async with client:
            for i in range(5):
                await client.key(f"user-{i}").call(Greet(name="x"), Greeting)
            with pytest.raises(NoHandlerError):
                await client.key("user-0").request_raw("no-such-type")

        after = await asyncio.to_thread(scrape, port)
        ok = {"message_type": "Greet", "success": "true"}
        assert value(after, "clstr_cluster_handlers_total", **ok) == 5
        assert (
            value(after, "clstr_cluster_handler_duration_seconds_count", message_type="Greet") == 5
        )
        assert value(after, "clstr_cluster_handler_duration_seconds_sum", message_type="Greet") > 0
        failed = {"message_type": "_unknown", "success": "false"}
        assert value(after, "clstr_cluster_handlers_total", **failed) == 1
        assert value(after, "clstr_cluster_handlers_active", node_id="m1") == 0
        assert value(after, "clstr_cluster_node_requests_total", **ok) == 5
        assert value(after, "clstr_cluster_node_requests_total", **failed) == 1
        served = "clstr_cluster_node_request_duration_seconds"
        assert value(after, f"{served}_count", message_type="Greet") == 5
        assert value(after, f"{served}_sum", message_type="Greet") >= value(
            after, "clstr_cluster_handler_duration_seconds_sum", message_type="Greet"
        )

    async def test_metrics_use_a_dedicated_registry(
        self, metered: tuple[NodeProcess, str, int]
    ) -> None:
        """Only clstr's metrics are exposed: the process's default registry is not served."""
        _, _, port = metered
        names = {name for name, _ in await asyncio.to_thread(scrape, port)}
        assert names
        assert all(name.startswith("clstr_") for name in names), sorted(names)
