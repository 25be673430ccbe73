"""`clstr dev up` and `clstr demo` as real processes: the local cluster answers
from every node, and Ctrl-C (or SIGINT, SIGHUP, a dying node, even SIGKILL of
the command itself) leaves no process behind."""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

from clstr import assign_shards, owner_of, shard_for_key
from clstr.cli import main
from clstr.observe import DEFAULT_DASHBOARD_PORT
from clstr.testing import NatsServer

from _support import dashboard_snapshot

NUM_SHARDS = 16
READY = "press Ctrl-C to stop"


def alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:  # no procfs: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_gone(pids: Iterable[int], timeout: float) -> list[int]:
    """Wait until every process of ``pids`` has exited; return those still running
    after ``timeout`` seconds. Waits on pidfds (the kernel wakes us at each exit)."""
    deadline = time.monotonic() + timeout
    if not hasattr(os, "pidfd_open"):  # pragma: no cover - not Linux: poll the condition
        while (left := [p for p in pids if alive(p)]) and time.monotonic() < deadline:
            time.sleep(0.05)
        return left
    fds: dict[int, int] = {}
    try:
        for pid in pids:
            try:
                fds[os.pidfd_open(pid)] = pid
            except ProcessLookupError:
                continue  # already gone (and reaped)
        poller = select.poll()
        for fd in fds:
            poller.register(fd, select.POLLIN)
        waiting = dict(fds)
        while waiting:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            for fd, _ in poller.poll(remaining * 1000):
                poller.unregister(fd)
                waiting.pop(fd, None)
        return sorted(waiting.values())
    finally:
        for fd in fds:
            os.close(fd)


class Child:
    """A `clstr` command in a session of its own, its output collected by two threads."""

    def __init__(self, *argv: str, env: dict[str, str] | None = None) -> None:
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("CLSTR_")},
            **(env or {}),
        }
        env["PYTHONUNBUFFERED"] = "1"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "clstr", *argv],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            start_new_session=True,
        )
        self.out: list[str] = []
        self.err: list[str] = []
        self._changed = threading.Condition()
        self._readers = [
            threading.Thread(target=self._pump, args=(self.process.stdout, self.out), daemon=True),
            threading.Thread(target=self._pump, args=(self.process.stderr, self.err), daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    def _pump(self, stream: object, lines: list[str]) -> None:
        for raw in stream:  # type: ignore[attr-defined]
            with self._changed:
                lines.append(raw.decode("utf-8", "replace").rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def wait_for(self, text: str, timeout: float = 40.0) -> None:
        """Wait until a line of stdout contains ``text``; fail if the process ends first."""
        with self._changed:
            found = self._changed.wait_for(
                lambda: any(text in line for line in self.out) or self.process.poll() is not None,
                timeout,
            )
            if not found or not any(text in line for line in self.out):
                pytest.fail(f"no {text!r} on stdout: {self.describe()}")

    def wait(self, timeout: float = 40.0) -> int:
        code = self.process.wait(timeout)
        for reader in self._readers:
            reader.join(timeout)
        for stream in (self.process.stdout, self.process.stderr):
            if stream is not None:
                stream.close()
        return code

    def describe(self) -> str:
        return (
            f"exit {self.process.poll()}\nstdout:\n"
            + "\n".join(self.out)
            + "\nstderr:\n"
            + "\n".join(self.err[-40:])
        )

    @property
    def stdout(self) -> str:
        return "\n".join(self.out)

    def pids(self) -> dict[str, int]:
        """The processes the banner announced: nats-server and node-N."""
        found: dict[str, int] = {}
        for line in self.out:
            server = re.search(r"nats-server .*\bpid (\d+)\)", line)
            if server:
                found["nats-server"] = int(server.group(1))
            node = re.match(r"\s+(node-\d+)\s+pid (\d+)", line)
            if node:
                found[node.group(1)] = int(node.group(2))
        return found

    def url(self) -> str:
        match = re.search(r"nats://127\.0\.0\.1:\d+", self.stdout)
        assert match, self.describe()
        return match.group(0)

    def dashboard_url(self) -> str:
        """The dashboard's address, from its banner line."""
        match = re.search(r"^  dashboard    (http://127\.0\.0\.1:\d+/)$", self.stdout, re.M)
        assert match, self.describe()
        return match.group(1)

    def kill_everything(self, pids: dict[str, int]) -> None:
        """The safety net: SIGKILL the command's group and every process it announced."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
        for pid in pids.values():
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        self.wait()


@pytest.fixture
def tmpdir_env(tmp_path: Path) -> dict[str, str]:
    """A TMPDIR of the test's own, to see what temporary files a command leaves."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    return {"TMPDIR": str(scratch)}


@pytest.fixture
def dev_up(tmpdir_env: dict[str, str]) -> Iterator[Child]:
    """A running `clstr dev up` of 3 nodes on a free port; everything it started is
    killed after the test if still alive."""
    child = Child(
        "dev", "up", "--port", "0", "--shards", str(NUM_SHARDS), "--nodes", "3", env=tmpdir_env
    )
    pids: dict[str, int] = {}
    try:
        child.wait_for(READY)
        pids = child.pids()
        assert set(pids) == {"nats-server", "node-1", "node-2", "node-3"}, child.describe()
        yield child
    finally:
        child.kill_everything(pids or child.pids())


def cli(capsys: pytest.CaptureFixture[str], url: str, *argv: str) -> tuple[int, str]:
    capsys.readouterr()
    code = main(["--nats-url", url, "--shards", str(NUM_SHARDS), *argv])
    return code, capsys.readouterr().out


class TestDevUp:
    def test_every_node_answers_and_sigint_leaves_nothing(
        self, dev_up: Child, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Requests land on all three nodes; SIGINT stops every node and the nats-server."""
        url = dev_up.url()
        pids = dev_up.pids()
        answered = set()
        for i in range(24):
            code, out = cli(capsys, url, "request", f"user-{i}", "whoami", "--json")
            assert code == 0
            answered.add(json.loads(out)["node"])
        assert answered == {"node-1", "node-2", "node-3"}
        code, out = cli(capsys, url, "status", "--json")
        view = json.loads(out)
        assert code == 0
        assert view["complete"]
        assert [n["node_id"] for n in view["nodes"]] == ["node-1", "node-2", "node-3"]

        dev_up.process.send_signal(signal.SIGINT)
        assert dev_up.wait() == 0, dev_up.describe()
        assert dev_up.out[-1] == (
            "stopped: node-1 (exit 0), node-2 (exit 0), node-3 (exit 0), nats-server"
        )
        left = {name: pid for name, pid in pids.items() if alive(pid)}
        assert not left, f"left running: {left}"

    def test_ctrl_c_in_a_terminal_stops_nodes_before_the_server(self, dev_up: Child) -> None:
        """SIGINT to the whole process group (a terminal's Ctrl-C) ends in a clean, ordered stop."""
        pids = dev_up.pids()
        os.killpg(dev_up.process.pid, signal.SIGINT)
        assert dev_up.wait() == 0, dev_up.describe()
        assert not [pid for pid in pids.values() if alive(pid)]
        log = "\n".join(dev_up.err)
        # Each node was stopped by its parent and drained while NATS was still up.
        assert log.count("reason=SIGTERM") == 3, log
        assert log.count("node exit") == 3, log
        assert "disconnected" not in log

    def test_dashboard_serves_beside_the_cluster_on_a_free_port_when_its_own_is_taken(
        self, tmpdir_env: dict[str, str]
    ) -> None:
        """`dev up --dashboard` prints the dashboard in its banner, on a free port when
        the default one is taken; the page shows the three nodes owning every shard;
        SIGINT stops it all."""
        with socket.socket() as taken:
            with contextlib.suppress(OSError):  # taken already: as good
                taken.bind(("127.0.0.1", DEFAULT_DASHBOARD_PORT))
                taken.listen()
            argv = ["dev", "up", "--port", "0", "--shards", str(NUM_SHARDS), "--dashboard"]
            child = Child(*argv, env=tmpdir_env)
            pids: dict[str, int] = {}
            try:
                child.wait_for(READY)
                pids = child.pids()
                url = child.dashboard_url()
                assert f":{DEFAULT_DASHBOARD_PORT}/" not in url
                snapshot = dashboard_snapshot(
                    url, lambda s: s["state"] == "ok" and s["summary"]["answering"] == 3
                )
                assert snapshot["num_shards"] == NUM_SHARDS
                assert [n["node_id"] for n in snapshot["nodes"]] == ["node-1", "node-2", "node-3"]
                child.process.send_signal(signal.SIGINT)
                assert child.wait() == 0, child.describe()
            finally:
                child.kill_everything(pids)
        assert child.out[-1].startswith("stopped: node-1 (exit 0)"), child.describe()
        assert not [name for name, pid in pids.items() if alive(pid)]

    def test_a_dying_node_takes_the_cluster_down(self, dev_up: Child) -> None:
        """When a node dies, dev up says so, stops the rest and exits 1."""
        pids = dev_up.pids()
        os.kill(pids["node-2"], signal.SIGKILL)
        assert dev_up.wait() == 1, dev_up.describe()
        assert any("node-2 exited with code" in line for line in dev_up.err), dev_up.describe()
        assert not [name for name, pid in pids.items() if alive(pid)]


class TestKvMembership:
    def test_a_killed_nodes_shards_are_served_by_the_others(
        self, tmpdir_env: dict[str, str], capsys: pytest.CaptureFixture[str]
    ) -> None:
        """`dev up --membership kv` starts the nodes on the embedded server's JetStream
        KV, ready once each holds its HRW share; after a SIGKILL of node-2 it warns and
        serves on: the dashboard shows node-2's shards held by node-1 and node-3 as HRW
        places them, and node-2's keys are answered by them. SIGINT stops the rest."""
        argv = ["dev", "up", "--port", "0", "--shards", str(NUM_SHARDS), "--membership", "kv"]
        child = Child(*argv, "--dashboard-port", "0", env=tmpdir_env)
        nodes = ["node-1", "node-2", "node-3"]
        pids: dict[str, int] = {}
        try:
            child.wait_for(READY)
            pids = child.pids()
            assert set(pids) == {"nats-server", *nodes}, child.describe()
            assert child.out[0].endswith(", kv membership"), child.describe()
            placed = assign_shards(nodes, NUM_SHARDS)
            for node in nodes:
                share = sum(owner == node for owner in placed.values())
                assert re.search(rf"^  {node}  pid \d+  {share} shards$", child.stdout, re.M)
            url = child.url()
            key = next(
                k
                for i in range(1000)
                if placed[shard_for_key(k := f"user-{i}", NUM_SHARDS)] == "node-2"
            )
            code, out = cli(capsys, url, "request", key, "whoami", "--json")
            assert (code, json.loads(out)["node"]) == (0, "node-2")

            os.kill(pids["node-2"], signal.SIGKILL)
            survivors = assign_shards(["node-1", "node-3"], NUM_SHARDS)
            snapshot = dashboard_snapshot(
                child.dashboard_url(),
                lambda s: s["state"] == "ok" and s["summary"]["members"] == 2,
            )
            assert [s["owner"] for s in snapshot["shards"]] == [
                survivors[shard] for shard in range(NUM_SHARDS)
            ]
            code, out = cli(capsys, url, "request", key, "whoami", "--json")
            assert code == 0
            assert json.loads(out)["node"] == survivors[shard_for_key(key, NUM_SHARDS)]
            assert child.process.poll() is None, child.describe()
            warning = (
                "clstr: warning: node-2 exited with code -9; its shards move to the other nodes"
            )
            assert warning in child.err, child.describe()

            child.process.send_signal(signal.SIGINT)
            assert child.wait() == 0, child.describe()
        finally:
            child.kill_everything(pids)
        assert child.out[-1] == (
            "stopped: node-1 (exit 0), node-2 (exit -9), node-3 (exit 0), nats-server"
        ), child.describe()
        assert not [name for name, pid in pids.items() if alive(pid)]


class TestParentGone:
    """Whatever ends `clstr dev up`, none of its processes outlives it."""

    def test_sighup_stops_everything_and_removes_the_temp_dirs(
        self, dev_up: Child, tmpdir_env: dict[str, str]
    ) -> None:
        """A closed terminal (SIGHUP) stops the cluster in order, like Ctrl-C, and
        leaves neither a process nor a temporary directory."""
        pids = dev_up.pids()
        scratch = Path(tmpdir_env["TMPDIR"])
        assert list(scratch.iterdir()), "the cluster should keep its files in TMPDIR"
        dev_up.process.send_signal(signal.SIGHUP)
        assert dev_up.wait() == 0, dev_up.describe()
        assert dev_up.out[-1].startswith("stopped: node-1 (exit 0)"), dev_up.describe()
        assert not [name for name, pid in pids.items() if alive(pid)]
        assert not list(scratch.iterdir())

    def test_sigkill_of_dev_up_leaves_no_process(self, dev_up: Child) -> None:
        """Killed with SIGKILL, `clstr dev up` cannot stop anything; its nodes stop
        when their stdin closes, and its nats-server when the kernel says its parent died."""
        pids = dev_up.pids()
        dev_up.process.kill()
        assert dev_up.wait() == -signal.SIGKILL
        left = wait_gone(pids.values(), timeout=15.0)
        names = {pid: name for name, pid in pids.items()}
        assert not left, f"still running after 15 s: {[names[pid] for pid in left]}"

    def test_external_server_keeps_running(
        self, capsys: pytest.CaptureFixture[str], tmpdir_env: dict[str, str]
    ) -> None:
        """With --nats-url, dev up starts only nodes on that server; Ctrl-C stops
        them and leaves the server serving."""
        with NatsServer(jetstream=False) as server:
            child = Child(
                "dev", "up", "--nats-url", server.url, "--shards", str(NUM_SHARDS), env=tmpdir_env
            )
            pids: dict[str, int] = {}
            try:
                child.wait_for(READY)
                pids = child.pids()
                assert set(pids) == {"node-1", "node-2", "node-3"}, child.describe()
                assert f"nats-server  {server.url}  (external)" in child.stdout
                assert f"export CLSTR_NATS_URL={server.url}" in child.stdout
                code, out = cli(capsys, server.url, "request", "user-1", "whoami", "--json")
                assert code == 0
                assert json.loads(out)["node"] in pids
                child.process.send_signal(signal.SIGINT)
                assert child.wait() == 0, child.describe()
            finally:
                child.kill_everything(pids)
            assert child.out[-1] == (
                "stopped: node-1 (exit 0), node-2 (exit 0), node-3 (exit 0); "
                f"the external nats-server at {server.url} keeps running"
            )
            assert not [name for name, pid in pids.items() if alive(pid)]
            assert server.running
            code, out = cli(capsys, server.url, "status", "--json", "--timeout", "0.5")
            assert code == 1  # the server answers; no node serves any more
            assert json.loads(out)["nodes"] == []


def demo_answers(stdout: str) -> list[tuple[str, int, str]]:
    """The (key, shard, node) lines the demo printed."""
    return [
        (key, int(shard), node)
        for key, shard, node in re.findall(r"(user-\d+)\s+shard\s+(\d+) -> (node-\d)", stdout)
    ]


class TestDemo:
    @pytest.mark.parametrize("membership", ["static", "kv"])
    def test_demo_once_answers_from_each_owner_and_exits(self, membership: str) -> None:
        """`clstr demo --once` starts the cluster (under KV membership: until the shards
        have settled), shows each key answered by its HRW owner, stops every process
        and exits 0."""
        argv = ["--once", "--keys", "12", "--rounds", "2", "--membership", membership]
        child = Child("demo", *argv)
        try:
            assert child.wait(60) == 0, child.describe()
        finally:
            if child.process.poll() is None:
                child.kill_everything({})
        answers = demo_answers(child.stdout)
        assert [key for key, _, _ in answers] == [f"user-{i}" for i in range(12)]
        nodes = ["node-1", "node-2", "node-3"]
        for key, shard, node in answers:
            assert shard == shard_for_key(key, 64)
            assert node == owner_of(shard, nodes), key
        assert {node for _, _, node in answers} == set(nodes)
        assert "requests answered per node" in child.stdout
        assert "shard map" not in child.stdout
        assert READY not in child.stdout
        assert "dashboard" not in child.stdout  # nobody could open it in time
        assert child.out[-1] == (
            "stopped: node-1 (exit 0), node-2 (exit 0), node-3 (exit 0), nats-server"
        )
        assert not [pid for pid in child.pids().values() if alive(pid)]

    def test_demo_serves_until_sigint(self, capsys: pytest.CaptureFixture[str]) -> None:
        """`clstr demo` shows the shard map and serves: `clstr status` sees the map;
        SIGINT then stops the nodes and the nats-server, and nothing is left."""
        child = Child("demo", "--port", "0", "--shards", str(NUM_SHARDS), "--keys", "6")
        pids: dict[str, int] = {}
        try:
            child.wait_for(READY)
            pids = child.pids()
            assert set(pids) == {"nats-server", "node-1", "node-2", "node-3"}, child.describe()
            url = child.url()
            assert f"export CLSTR_NATS_URL={url} CLSTR_SHARDS={NUM_SHARDS}" in child.stdout
            assert f"{NUM_SHARDS} shards, 3 nodes, all shards owned" in child.stdout
            assert "shard map (. no owner, ? no answer):" in child.stdout
            snapshot = dashboard_snapshot(
                child.dashboard_url(), lambda s: s["summary"]["answering"] == 3
            )
            assert snapshot["num_shards"] == NUM_SHARDS

            code, out = cli(capsys, url, "status")
            assert code == 0, out
            assert "shard map (. no owner, ? no answer):" in out
            code, out = cli(capsys, url, "status", "--json")
            view = json.loads(out)
            assert view["complete"]
            for key, shard, node in demo_answers(child.stdout):
                assert view["owners"][str(shard)] == node, key

            child.process.send_signal(signal.SIGINT)
            assert child.wait() == 0, child.describe()
        finally:
            child.kill_everything(pids)
        assert child.out[-2:] == [
            "stopping: the nodes first, then nats-server",
            "stopped: node-1 (exit 0), node-2 (exit 0), node-3 (exit 0), nats-server",
        ]
        left = {name: pid for name, pid in pids.items() if alive(pid)}
        assert not left, f"left running: {left}"
