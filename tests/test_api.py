"""The public surface: exports, typing marker, metrics, the testing kit's fixtures."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import nats.aio.client
import pytest
import structlog
from prometheus_client import CollectorRegistry

import clstr
from clstr import (
    Client,
    ConfigurationError,
    ConnectionFailedError,
    Envelope,
    MemoryTransport,
    MissingKeyError,
    Node,
    PrometheusMetrics,
    Router,
    errors,
)
from clstr.testing import TestCluster, create_test_cluster
from clstr.transports.nats import NatsConnection, NatsOptions, NatsTransport


class TestExports:
    def test_all_is_exactly_the_public_surface(self) -> None:
        """clstr.__all__ names exactly the package's public module-level names."""
        public = {
            name
            for name, value in vars(clstr).items()
            if not name.startswith(("_", "@"))  # "@py_builtins": pytest's assertion rewriting
            and not getattr(value, "__name__", "").startswith("clstr.")  # submodules
            and name not in {"annotations"}
        }
        assert set(clstr.__all__) == public
        assert len(clstr.__all__) == len(set(clstr.__all__))

    def test_package_is_typed(self) -> None:
        """The package ships the py.typed marker."""
        assert (Path(clstr.__file__).parent / "py.typed").exists()

    def test_importing_does_not_import_nats_transport(self) -> None:
        """The NATS transport loads lazily: importing clstr.transports does not need it."""
        import clstr.transports as transports

        assert "NatsTransport" in transports.__all__
        assert transports.NatsTransport is NatsTransport

    def test_importing_clstr_loads_neither_nats_nor_prometheus(self) -> None:
        """A process that only imports clstr (memory transport, no-op metrics) does not
        pay the start-up of nats-py or prometheus_client."""
        probe = (
            "import sys, clstr; "
            "print(sorted(m for m in ('nats', 'prometheus_client') if m in sys.modules))"
        )
        out = subprocess.run(
            [sys.executable, "-c", probe], capture_output=True, text=True, check=True
        ).stdout
        assert out.strip() == "[]"


class TestErrors:
    def test_every_error_class_is_a_clstr_error(self) -> None:
        """Every exception class clstr.errors defines derives from ClstrError, is
        listed in its __all__ and exported by clstr itself."""
        defined = {
            name: value
            for name, value in vars(errors).items()
            if isinstance(value, type)
            and issubclass(value, BaseException)
            and value.__module__ == errors.__name__
        }
        assert len(defined) >= 20
        for name, cls in defined.items():
            assert issubclass(cls, errors.ClstrError), name
            assert name in errors.__all__, name
            assert getattr(clstr, name) is cls, name

    async def test_empty_key_is_missing_key_error(self) -> None:
        """Every key-routed call given an empty key raises MissingKeyError (a
        ValueError) before anything is sent."""
        transport = MemoryTransport()
        client = Client(transport, num_shards=4)
        with pytest.raises(MissingKeyError, match="needs a key"):
            await client.request_key("", "t")
        with pytest.raises(MissingKeyError):
            await client.notify_key("", "t")
        with pytest.raises(MissingKeyError):
            client.key("")
        assert issubclass(MissingKeyError, ValueError)


class TestLogging:
    def test_using_clstr_leaves_global_logging_alone(self) -> None:
        """Importing clstr and running a node and a client (one handler failing, so
        the node logs) changes neither structlog's global configuration nor the
        standard library's logging: no handler, no level (the CLI configures, the
        library never does)."""
        probe = """
import asyncio, logging, structlog

def snapshot():
    config = {k: list(v) if isinstance(v, list) else v for k, v in structlog.get_config().items()}
    loggers = {
        name: (list(logger.handlers), logger.level)
        for name, logger in logging.Logger.manager.loggerDict.items()
        if isinstance(logger, logging.Logger)
    }
    return (config, structlog.is_configured(), list(logging.root.handlers),
            logging.root.level, {k: v for k, v in loggers.items() if v != ([], 0)})

before = snapshot()
import clstr

async def main():
    transport = clstr.MemoryTransport()

    async def handler(env):
        if env.type == "fail":
            raise ValueError("boom")
        return env.data

    async with clstr.Node(transport, handler, num_shards=2):
        client = clstr.Client(transport.connect("c"), num_shards=2)
        assert await client.request_key("k", "echo", b"x") == b"x"
        try:
            await client.request_key("k", "fail")
        except clstr.RemoteHandlerError:
            pass

asyncio.run(main())
after = snapshot()
assert after == before, (before, after)
print("unchanged")
"""
        result = subprocess.run(
            [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip().endswith("unchanged")


class TestMetrics:
    async def test_prometheus_metrics_move(self) -> None:
        """Requests, handler runs and rejections show up under the Go original's names."""
        registry = CollectorRegistry()
        metrics = PrometheusMetrics(registry)
        transport = MemoryTransport()

        async def echo(env: Envelope) -> bytes:
            return env.data

        async with Node(transport, echo, num_shards=4, node_id="n1", metrics=metrics):
            client = Client(transport.connect("c"), num_shards=4, metrics=metrics)
            for _ in range(3):
                await client.request_shard(1, "echo", b"x")
            raw = await transport.connect("raw").request("clstr.shard.1", b"junk", 1)
            assert raw  # a bad_request reply

        def value(name: str, **labels: str) -> float:
            got = registry.get_sample_value(name, labels)
            return 0.0 if got is None else got

        assert value("clstr_cluster_requests_total", message_type="echo", success="true") == 3
        assert value("clstr_cluster_handlers_total", message_type="echo", success="true") == 3
        assert value("clstr_cluster_handler_duration_seconds_count", message_type="echo") == 3
        assert value("clstr_cluster_request_duration_seconds_count", message_type="echo") == 3
        assert value("clstr_cluster_envelopes_rejected_total", reason="bad_request") == 1
        assert value("clstr_cluster_shards_owned", node_id="n1") == 0  # released on stop
        assert value("clstr_cluster_handlers_active", node_id="n1") == 0


class TestNatsConnect:
    async def test_unreachable_server_fails_fast_and_clearly(self) -> None:
        """Connecting to a port nobody listens on raises ConnectionFailedError within the
        connect deadline, naming the URL."""
        started = time.monotonic()
        with pytest.raises(ConnectionFailedError, match=r"nats://127\.0\.0\.1:1"):
            await NatsTransport.connect(
                "nats://127.0.0.1:1", NatsOptions(connect_deadline=1.0, connect_timeout=0.5)
            )
        assert time.monotonic() - started < 5

    async def test_cancelled_flush_does_not_kill_the_connection(self, clstr_nats_url: str) -> None:
        """A flush cancelled before its PONG arrives leaves the connection working
        (plain nats-py 2.16 stops reading for good: nats-io/nats.py#914)."""
        transport = await NatsTransport.connect(clstr_nats_url)
        try:
            flush = asyncio.ensure_future(transport.nc.flush())
            await asyncio.sleep(0)  # the PING is out
            flush.cancel()
            with pytest.raises(asyncio.CancelledError):
                await flush

            async def echo(env: Envelope) -> bytes:
                return env.data

            async with Node(transport, echo, num_shards=2, prefix="pong"):
                client = Client(transport, num_shards=2, prefix="pong", timeout=2)
                assert await client.request_shard(0, "e", b"alive") == b"alive"
        finally:
            await transport.close()

    async def test_own_connection_must_be_a_nats_connection(self, clstr_nats_url: str) -> None:
        """A transport wraps a NatsConnection the caller connected and still owns; a
        plain nats-py client is refused with what to use instead."""
        with pytest.raises(ConfigurationError, match="NatsConnection"):
            NatsTransport(nats.aio.client.Client())  # type: ignore[arg-type]
        nc = NatsConnection()
        await nc.connect(clstr_nats_url)
        try:
            transport = NatsTransport(nc)

            async def echo(env: Envelope) -> bytes:
                return env.data

            async with Node(transport, echo, num_shards=2, prefix="own"):
                client = Client(transport, num_shards=2, prefix="own", timeout=2)
                assert await client.request_shard(1, "e", b"mine") == b"mine"
            await transport.close()
            assert nc.is_connected  # not the transport's to close
        finally:
            await nc.close()

    async def test_a_raising_subscriber_does_not_stop_the_connection(
        self, clstr_nats_url: str
    ) -> None:
        """A subscriber callback that raises is logged; the read loop goes on and the
        next messages arrive."""
        transport = await NatsTransport.connect(clstr_nats_url)
        got: list[bytes] = []
        arrived = asyncio.Event()

        def callback(data: bytes, reply: str | None) -> None:
            if data == b"boom":
                raise RuntimeError("subscriber bug")
            got.append(data)
            arrived.set()

        try:
            with structlog.testing.capture_logs() as logs:
                sub = await transport.subscribe("direct.test", callback)
                transport.publish_nowait("direct.test", b"boom")
                await transport.publish("direct.test", b"after")
                await arrived.wait()
            assert got == [b"after"]
            assert any(e["event"] == "subscriber callback raised" for e in logs)
            await sub.unsubscribe()
            assert transport.nc._direct == {}  # no callback kept for an ended subscription
            await transport.publish("direct.test", b"gone")
            await transport.nc.flush()
            assert got == [b"after"]
        finally:
            await transport.close()

    async def test_replies_arrive_on_a_non_ascii_inbox_prefix(self, clstr_nats_url: str) -> None:
        """Reply subjects are matched as bytes: an inbox prefix outside ASCII works."""
        transport = await NatsTransport.connect(
            clstr_nats_url, NatsOptions(inbox_prefix="_INBOX_clé")
        )
        try:

            async def echo(env: Envelope) -> bytes:
                return env.data

            async with Node(transport, echo, num_shards=1, prefix="utf"):
                client = Client(transport, num_shards=1, prefix="utf", timeout=2)
                assert await client.request_shard(0, "e", b"accent") == b"accent"
        finally:
            await transport.close()

    async def test_empty_server_list_is_refused(self) -> None:
        """An empty list of URLs is refused with a message saying what to pass."""
        with pytest.raises(ConnectionFailedError, match="at least one"):
            await NatsTransport.connect([])

    async def test_client_connect_owns_its_connection(self, clstr_nats_url: str) -> None:
        """Client.connect builds a NATS transport that closing the client closes."""
        client = await Client.connect(clstr_nats_url, num_shards=8)
        transport = client.transport
        assert isinstance(transport, NatsTransport)
        await client.close()
        assert transport.nc.is_closed


class TestTestingKit:
    async def test_memory_cluster_fixture(
        self,
        clstr_memory_transport: MemoryTransport,
        clstr_cluster: Callable[..., Awaitable[TestCluster]],
    ) -> None:
        """The plugin's fixtures build a started memory cluster whose keys reach their owners."""

        def handler_for(node_id: str) -> clstr.Handler:
            async def handle(env: Envelope) -> bytes:
                return node_id.encode()

            return handle

        cluster = await clstr_cluster(clstr_memory_transport, 3, handler_factory=handler_for)
        for key in ("a", "b", "c", "d"):
            assert (await cluster.client.request_key(key, "who")).decode() == cluster.owner_of_key(
                key
            )

    async def test_nats_test_cluster(self, clstr_nats_url: str) -> None:
        """create_test_cluster over NATS: one connection per node, every shard served."""
        router = Router()

        @router.on("ping")
        async def ping(env: Envelope) -> bytes:
            return b"pong"

        async with create_test_cluster(
            clstr_nats_url, ["x", "y"], num_shards=16, handler=router
        ) as c:
            replies = await asyncio.gather(
                *(c.client.request_key(f"k{i}", "ping") for i in range(20))
            )
            assert set(replies) == {b"pong"}
            assert {n.node_id for n in c.nodes} == {"x", "y"}
            assert sorted(c.node("x").shards + c.node("y").shards) == list(range(16))

    def test_cluster_needs_exactly_one_handler_source(self) -> None:
        """create_test_cluster refuses both or neither of handler and handler_factory."""
        with pytest.raises(clstr.ConfigurationError):
            create_test_cluster(MemoryTransport())
