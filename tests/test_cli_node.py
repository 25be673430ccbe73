"""`clstr node` as a process: readiness in its JSON log, serving, graceful stops,
and the errors it exits with before serving anything."""

from __future__ import annotations

import asyncio
import json
import socket
import uuid
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from clstr import Client, NoShardOwnerError, OverloadedError
from clstr.cli import build_parser, main
from clstr.demo_app import MESSAGE_TYPES, Greet, Greeting
from clstr.testing import NatsServer
from clstr.testing._processes import NodeProcess
from clstr.transports.nats import NatsTransport

NUM_SHARDS = 8


@pytest_asyncio.fixture
async def node(clstr_nats_server: NatsServer) -> AsyncIterator[tuple[NodeProcess, str]]:
    """One `clstr node` child (id `solo`, every shard) under a prefix of its own; killed
    if a test leaves it running."""
    prefix = f"node{uuid.uuid4().hex[:8]}"
    process = NodeProcess(
        "solo", clstr_nats_server.url, num_shards=NUM_SHARDS, prefix=prefix, static_nodes=["solo"]
    )
    await process.start()
    try:
        yield process, prefix
    finally:
        if process.returncode is None:
            await process.kill()
        else:
            await process.wait()


def events(process: NodeProcess) -> list[str]:
    return [r["event"] for r in process.records if isinstance(r, dict)]


def record(process: NodeProcess, event: str) -> dict[str, object]:
    return next(r for r in process.records if isinstance(r, dict) and r["event"] == event)


class TestServing:
    async def test_node_logs_ready_serves_and_stops_on_sigterm(
        self, node: tuple[NodeProcess, str], clstr_nats_server: NatsServer
    ) -> None:
        """The node says `node ready` in JSON, answers requests, and exits 0 on SIGTERM."""
        process, prefix = node
        ready = await process.wait_ready(30)
        assert ready["shards"] == NUM_SHARDS
        assert ready["pid"] == process.pid
        assert ready["level"] == "info"
        assert "timestamp" in ready
        client = await Client.connect(clstr_nats_server.url, num_shards=NUM_SHARDS, prefix=prefix)
        async with client:
            reply = await client.key("u1").call(Greet(name="x"), Greeting)
            info = await client.key("u1").node_info()
        assert reply.node == "solo"
        # Through the discovery wrapper, node info still names the demo app's types.
        assert info.message_types == sorted(MESSAGE_TYPES)
        assert await process.stop(timeout=15) == 0
        seen = events(process)
        assert seen.index("node ready") < seen.index("node stopping") < seen.index("node exit")
        stopping = next(
            r for r in process.records if isinstance(r, dict) and r["event"] == "node stopping"
        )
        assert stopping["reason"] == "SIGTERM"
        # Every line the node wrote was a JSON log record.
        assert all(isinstance(r, dict) for r in process.records)

    async def test_node_stops_when_its_parent_goes_away(
        self, node: tuple[NodeProcess, str]
    ) -> None:
        """With --watch-stdin, EOF on stdin (the parent died) stops the node cleanly."""
        process, _ = node
        await process.wait_ready(30)
        process.close_stdin()
        assert await process.wait() == 0
        stopping = next(
            r for r in process.records if isinstance(r, dict) and r["event"] == "node stopping"
        )
        assert stopping["reason"] == "stdin closed"


class TestMaxPending:
    def test_0_is_accepted_and_a_negative_count_refused(
        self, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """--max-pending takes 0 (as Node does) and refuses a negative count."""
        argv = ["node", "--id", "n1", "--app", "clstr.demo_app:app", "--max-pending"]
        assert build_parser({}).parse_args([*argv, "0"]).max_pending == 0
        with pytest.raises(SystemExit):
            build_parser({}).parse_args([*argv, "-1"])
        assert "must be at least 0, got -1" in capsys.readouterr().err

    async def test_max_pending_0_serves_what_free_workers_start(
        self, clstr_nats_server: NatsServer
    ) -> None:
        """`clstr node --max-pending 0 --max-concurrency 1` runs: it serves a request,
        and while that one runs it answers the next `overloaded` instead of queueing it."""
        prefix = f"mp{uuid.uuid4().hex[:8]}"
        process = NodeProcess(
            "lean",
            clstr_nats_server.url,
            num_shards=NUM_SHARDS,
            prefix=prefix,
            static_nodes=["lean"],
            app="clstr.testing.conformance:app",
            extra_args=["--max-pending", "0", "--max-concurrency", "1"],
        )
        async with process:
            client = await Client.connect(
                clstr_nats_server.url, num_shards=NUM_SHARDS, prefix=prefix
            )
            stats = await NatsTransport.connect(clstr_nats_server.url)
            running = 0

            async def poll_running() -> None:
                nonlocal running
                reply = await stats.nc.request("$SRV.STATS.clstr.lean", b"", timeout=2)
                running = json.loads(reply.data)["data"]["running"]

            async with client:
                assert await client.request_key("a", "clstr.conformance.echo", b"hi") == b"hi"
                slow = asyncio.ensure_future(
                    client.request_key("a", "clstr.conformance.sleep", b"3000", timeout=10)
                )
                try:
                    # No event tells a bystander that the handler started: ask the node.
                    async with asyncio.timeout(10):
                        while running != 1:
                            await poll_running()
                    with pytest.raises(OverloadedError):
                        await client.request_key("b", "clstr.conformance.echo", b"x")
                    assert await slow == b""
                finally:
                    slow.cancel()
                    await asyncio.gather(slow, return_exceptions=True)
                    await stats.close()


class TestStartupErrors:
    def run(self, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
        capsys.readouterr()
        code = main(list(argv))
        return code, capsys.readouterr().err

    def test_unreachable_server(self, capsys: pytest.CaptureFixture[str]) -> None:
        """A node that cannot reach NATS exits 2 with one line naming the URL."""
        code, err = self.run(
            capsys,
            "--nats-url",
            "nats://127.0.0.1:1",
            "--connect-timeout",
            "0.5",
            "node",
            "--id",
            "n1",
            "--app",
            "clstr.demo_app:app",
        )
        assert code == 2
        errors = [line for line in err.splitlines() if line.startswith("clstr: error:")]
        assert len(errors) == 1
        assert "nats://127.0.0.1:1" in errors[0]
        assert "Traceback" not in err

    def test_metrics_port_in_use(self, capsys: pytest.CaptureFixture[str]) -> None:
        """A metrics port already taken exits 2 and says to choose another."""
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            code, err = self.run(
                capsys,
                "node",
                "--id",
                "n1",
                "--app",
                "clstr.demo_app:app",
                "--metrics-port",
                str(port),
                "--metrics-host",
                "127.0.0.1",
            )
        assert code == 2
        assert "choose another --metrics-port" in err

    def test_node_missing_from_its_static_list(
        self, capsys: pytest.CaptureFixture[str], clstr_nats_server: NatsServer
    ) -> None:
        """An id that is not in --static-nodes exits 2 with the node's own explanation."""
        code, err = self.run(
            capsys,
            "--nats-url",
            clstr_nats_server.url,
            "node",
            "--id",
            "n9",
            "--app",
            "clstr.demo_app:app",
            "--static-nodes",
            "n1,n2",
        )
        assert code == 2
        assert "n9" in err
        assert "Traceback" not in err


class TestDynamicMembership:
    async def test_kv_nodes_share_shards_and_drain_from_the_shell(
        self, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Two `clstr node --membership kv` processes split the shards; `clstr drain`
        moves every shard of one to the other."""
        async with NatsServer() as server:
            prefix = f"kv{uuid.uuid4().hex[:8]}"
            procs = [
                NodeProcess(
                    name,
                    server.url,
                    num_shards=NUM_SHARDS,
                    prefix=prefix,
                    extra_args=["--membership", "kv"],
                )
                for name in ("kv-a", "kv-b")
            ]
            try:
                for proc in procs:
                    await proc.start()
                    await proc.wait_ready(30)
                client = await Client.connect(server.url, num_shards=NUM_SHARDS, prefix=prefix)
                async with client:

                    async def owners() -> set[str | None]:
                        """Who serves each shard (None: nobody, for a moment, mid-handoff)."""
                        found: set[str | None] = set()
                        for s in range(NUM_SHARDS):
                            try:
                                found.add((await client.shard(s).node_info()).node_id)
                            except NoShardOwnerError:
                                found.add(None)
                        return found

                    # kv-b's shards move over from kv-a right after kv-b is ready.
                    async with asyncio.timeout(15):
                        while await owners() != {"kv-a", "kv-b"}:  # noqa: ASYNC110
                            await asyncio.sleep(0.05)
                    argv = ["--nats-url", server.url, "--prefix", prefix, "drain", "kv-b"]
                    code = await asyncio.to_thread(main, argv)
                    assert code == 0
                    assert "kv-b: drain done" in capsys.readouterr().out
                    # drain returns once kv-a holds every key; its subscriptions follow.
                    async with asyncio.timeout(15):
                        while await owners() != {"kv-a"}:  # noqa: ASYNC110
                            await asyncio.sleep(0.05)
                for proc in procs:
                    assert await proc.stop(timeout=15) == 0
            finally:
                for proc in procs:
                    if proc.returncode is None:
                        await proc.kill()

    def test_drain_of_an_unknown_node_says_so(
        self, capsys: pytest.CaptureFixture[str], clstr_nats_server: NatsServer
    ) -> None:
        """Draining a node id nobody answers for exits 2 with a hint."""
        code = main(["--nats-url", clstr_nats_server.url, "drain", "ghost", "--timeout", "2"])
        assert code == 2
        assert "no node 'ghost'" in capsys.readouterr().err


class TestUvloop:
    async def test_node_runs_on_uvloop(self, clstr_nats_server: NatsServer) -> None:
        """`clstr node --uvloop` serves on the uvloop event loop."""
        prefix = f"uv{uuid.uuid4().hex[:8]}"
        process = NodeProcess(
            "fast",
            clstr_nats_server.url,
            num_shards=NUM_SHARDS,
            prefix=prefix,
            extra_args=["--uvloop"],
        )
        await process.start()
        try:
            ready = await process.wait_ready(30)
            assert ready["loop"] == "uvloop"
            client = await Client.connect(
                clstr_nats_server.url, num_shards=NUM_SHARDS, prefix=prefix
            )
            async with client:
                reply = await client.key("u1").call(Greet(name="x"), Greeting)
            assert reply.node == "fast"
            assert await process.stop(timeout=15) == 0
        finally:
            if process.returncode is None:
                await process.kill()
