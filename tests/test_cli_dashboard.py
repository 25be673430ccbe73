"""`clstr dashboard` as a process against a live cluster (its page's data, a clean stop
on SIGINT, a port in use), its options and those of `dev up` and `demo`, and the
dashboard `dev up` and `demo` serve next to their cluster (`beside`). The dev
cluster's own dashboard runs in tests/test_cli_dev.py."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import sys
import types
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio

from clstr.cli import build_parser, main
from clstr.cli._common import CliError
from clstr.cli._dashboard import DASHBOARD_PORT, beside
from clstr.demo_app import app
from clstr.observe import DEFAULT_DASHBOARD_PORT, ServiceDiscovery
from clstr.testing import NatsServer, create_test_cluster
from clstr.transports.nats import NatsTransport

from _support import dashboard_snapshot

NODE_IDS = ["node-1", "node-2"]
NUM_SHARDS = 8
READY = re.compile(r"clstr dashboard: (http://127\.0\.0\.1:(\d+)/) \(Ctrl-C to stop\)")


@contextlib.contextmanager
def holding(port: int) -> Iterator[int]:
    """Keep ``port`` (0: a free one) on 127.0.0.1 taken; yields the port, which is
    taken by someone else already when it cannot be bound here."""
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            yield port  # in use already: as good for the test
            return
        sock.listen()
        yield sock.getsockname()[1]


@pytest_asyncio.fixture
async def cluster(clstr_nats_server: NatsServer) -> AsyncIterator[tuple[str, str]]:
    """Two nodes of the demo app answering service discovery, under a prefix and
    service name of their own; yields (prefix, service name)."""
    tag = uuid.uuid4().hex[:8]
    prefix, service = f"dash{tag}", f"dash-{tag}"
    nodes = create_test_cluster(
        clstr_nats_server.url, NODE_IDS, num_shards=NUM_SHARDS, handler_factory=app, prefix=prefix
    )
    discoveries: list[ServiceDiscovery] = []
    async with nodes:
        try:
            for node in nodes.nodes:
                assert isinstance(node.transport, NatsTransport)
                discovery = ServiceDiscovery(node, node.transport, name=service)
                await discovery.start()
                discoveries.append(discovery)
            yield prefix, service
        finally:
            for discovery in discoveries:
                await discovery.stop()


class TestOptions:
    def test_dashboard_defaults(self) -> None:
        """`clstr dashboard` serves on loopback, on clstr.observe's default port."""
        assert DASHBOARD_PORT == DEFAULT_DASHBOARD_PORT
        args = build_parser({}).parse_args(["dashboard"])
        assert (args.host, args.port) == ("127.0.0.1", DEFAULT_DASHBOARD_PORT)
        args = build_parser({}).parse_args(["dashboard", "--host", "0.0.0.0", "--port", "0"])
        assert (args.host, args.port) == ("0.0.0.0", 0)

    def test_dev_up_asks_for_it_and_demo_serves_it_unless_told(self) -> None:
        """`dev up` serves no dashboard unless --dashboard (or a --dashboard-port);
        `demo` serves one unless --no-dashboard."""
        parse = build_parser({}).parse_args
        up = parse(["dev", "up"])
        assert (up.dashboard, up.dashboard_port) == (False, None)
        up = parse(["dev", "up", "--dashboard", "--dashboard-port", "9000"])
        assert (up.dashboard, up.dashboard_port) == (True, 9000)
        assert (parse(["demo"]).dashboard, parse(["demo", "--no-dashboard"]).dashboard) == (
            True,
            False,
        )


class TestDashboardCommand:
    async def test_serves_the_cluster_until_sigint(
        self, cluster: tuple[str, str], clstr_nats_server: NatsServer
    ) -> None:
        """`clstr dashboard` prints its address, its page shows every node and shard
        owned (the shard count the nodes announce), and SIGINT ends it with exit 0."""
        prefix, service = cluster
        env = {k: v for k, v in os.environ.items() if not k.startswith("CLSTR_")}
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "clstr",
            "--nats-url",
            clstr_nats_server.url,
            "--prefix",
            prefix,
            "--service-name",
            service,
            "dashboard",
            "--port",
            "0",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
        )
        try:
            assert process.stdout is not None
            async with asyncio.timeout(30):
                line = (await process.stdout.readline()).decode().strip()
            ready = READY.fullmatch(line)
            assert ready, line
            snapshot = await asyncio.to_thread(
                dashboard_snapshot,
                ready[1],
                lambda s: s["state"] == "ok" and s["summary"]["answering"] == len(NODE_IDS),
            )
            assert snapshot["num_shards"] == NUM_SHARDS
            assert [n["node_id"] for n in snapshot["nodes"]] == NODE_IDS
            assert (snapshot["prefix"], snapshot["service_name"]) == (prefix, service)

            process.send_signal(signal.SIGINT)
            async with asyncio.timeout(15):
                out, err = await process.communicate()
            assert process.returncode == 0, err.decode()
            assert out.decode() == ""  # the ready line was all
            assert b"Traceback" not in err
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()

    def test_a_port_in_use_exits_2(self, capsys: pytest.CaptureFixture[str]) -> None:
        """A port already taken exits 2 with one line that names it and what to do."""
        with holding(0) as port:
            capsys.readouterr()
            code = main(["--nats-url", "nats://127.0.0.1:1", "dashboard", "--port", str(port)])
            err = capsys.readouterr().err
        assert code == 2, err
        assert err.startswith(f"clstr: error: cannot serve the dashboard on 127.0.0.1:{port}")
        assert "choose another port" in err
        assert len(err.splitlines()) == 1, err


class TestBesideTheDevCluster:
    """What `dev up --dashboard` and `demo` run next to their cluster."""

    @staticmethod
    def dev_cluster(url: str) -> types.SimpleNamespace:
        """The parts of a started DevCluster the dashboard reads."""
        return types.SimpleNamespace(
            url=url, prefix="beside", num_shards=4, seed="", service_name="clstr"
        )

    async def test_the_default_port_taken_falls_back_to_a_free_one(
        self, clstr_nats_server: NatsServer
    ) -> None:
        """With no port given and the default one taken, the dashboard serves on a
        free port, which its URL names."""
        with holding(DASHBOARD_PORT):
            async with beside(self.dev_cluster(clstr_nats_server.url), None) as dashboard:  # type: ignore[arg-type]
                assert dashboard.port not in (0, DASHBOARD_PORT)
                assert dashboard.url == f"http://127.0.0.1:{dashboard.port}/"
                assert dashboard.watch.snapshot["num_shards"] == 4

    async def test_a_port_given_and_taken_is_an_error(self, clstr_nats_server: NatsServer) -> None:
        """A --dashboard-port that cannot be bound is a usage error naming the option."""
        with holding(0) as port, pytest.raises(CliError, match="--dashboard-port") as raised:
            async with beside(self.dev_cluster(clstr_nats_server.url), port):
                pass
        assert raised.value.code == 2
