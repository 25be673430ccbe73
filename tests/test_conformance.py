"""The conformance kit runs docs/protocol.md's cases against a live node over NATS."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import msgpack
import pytest

from clstr import Node, Router
from clstr.testing import NatsServer
from clstr.testing.conformance import APP_TYPES, app, run_cases
from clstr.transports.nats import NatsTransport

NUM_SHARDS = 4
PAGE = (Path(__file__).resolve().parent.parent / "docs" / "protocol.md").read_text()


@pytest.fixture
async def transports(clstr_nats_server: NatsServer) -> AsyncIterator[list[NatsTransport]]:
    made = [await NatsTransport.connect(clstr_nats_server.url) for _ in range(2)]
    try:
        yield made
    finally:
        for transport in made:
            await transport.close()


class TestConformance:
    async def test_a_clstr_node_with_the_app_passes_every_case(
        self, transports: list[NatsTransport]
    ) -> None:
        """Against a clstr node serving the conformance app, every case runs and passes."""
        node_side, runner = transports
        async with Node(node_side, app("n1"), num_shards=NUM_SHARDS, node_id="n1"):
            results = await run_cases(runner, num_shards=NUM_SHARDS)
        failed = [r for r in results if r.outcome != "pass"]
        assert failed == []
        assert len(results) >= 25
        assert {r.section for r in results} >= {
            "Request body",
            "Headers",
            "Limits",
            "Keys and shards",
            "Deadlines and clocks",
            "Error codes",
            "Idempotency (request ids)",
            "Requests and notifications",
            "Built-in messages",
        }
        for section in {r.section for r in results}:
            assert f"# {section}\n" in PAGE, section

    async def test_without_the_app_its_cases_are_skipped(
        self, transports: list[NatsTransport]
    ) -> None:
        """A node without the conformance app still passes the protocol's own cases,
        and the app's cases say skip rather than fail."""
        node_side, runner = transports
        async with Node(node_side, Router(), num_shards=NUM_SHARDS):
            results = await run_cases(runner, num_shards=NUM_SHARDS)
        assert {r.outcome for r in results} == {"pass", "skip"}
        assert any(r.outcome == "skip" for r in results)

    async def test_a_node_that_answers_ok_to_everything_fails(
        self, transports: list[NatsTransport]
    ) -> None:
        """A responder that ignores the protocol (ok to every message) fails the
        refusal cases: the kit can tell a wrong node from a right one."""
        responder, runner = transports
        info = msgpack.packb(
            {"node_id": "liar", "shards": list(range(NUM_SHARDS)), "message_types": list(APP_TYPES)}
        )

        async def handle(msg: object) -> None:
            reply = getattr(msg, "reply", None)
            if reply:
                body = {"v": 1, "ok": True, "d": info}
                await responder.nc.publish(reply, msgpack.packb(body, use_bin_type=True))

        sub = await responder.nc.subscribe("clstr.shard.*", queue="clstr", cb=handle)
        await responder.nc.flush()  # the server has the subscription before the first case
        try:
            results = await run_cases(runner, num_shards=NUM_SHARDS, timeout=2)
        finally:
            await sub.unsubscribe()
        failed = {r.name for r in results if r.outcome == "fail"}
        assert "bytes that are not msgpack" in failed
        assert "a key sent to another shard" in failed
        assert "an id reused for another request" in failed
