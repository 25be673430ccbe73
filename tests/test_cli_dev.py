"""`clstr dev up` and `clstr demo` as real processes: the local cluster answers
from every node, and Ctrl-C (or SIGINT, or a dying node) leaves no process behind."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from clstr.cli import main

NUM_SHARDS = 16
READY = "press Ctrl-C to stop"


@pytest.fixture(autouse=True)
def restore_structlog() -> Iterator[None]:
    """main() configures structlog globally; put the previous configuration back."""
    saved = structlog.get_config()
    try:
        yield
    finally:
        structlog.configure(**saved)


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


class Child:
    """A `clstr` command in a session of its own, its output collected by two threads."""

    def __init__(self, *argv: str) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CLSTR_")}
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

    def kill_everything(self, pids: dict[str, int]) -> None:
        """The safety net: SIGKILL the command's group and every process it announced."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
        for pid in pids.values():
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        self.wait()


@pytest.fixture
def dev_up() -> Iterator[Child]:
    """A running `clstr dev up` of 3 nodes on a free port; everything it started is
    killed after the test if still alive."""
    child = Child("dev", "up", "--port", "0", "--shards", str(NUM_SHARDS), "--nodes", "3")
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
        assert dev_up.out[-1] == "stopped"
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

    def test_a_dying_node_takes_the_cluster_down(self, dev_up: Child) -> None:
        """When a node dies, dev up says so, stops the rest and exits 1."""
        pids = dev_up.pids()
        os.kill(pids["node-2"], signal.SIGKILL)
        assert dev_up.wait() == 1, dev_up.describe()
        assert any("node-2 exited with code" in line for line in dev_up.err), dev_up.describe()
        assert not [name for name, pid in pids.items() if alive(pid)]


class TestDemo:
    def test_demo_runs_and_exits_by_itself(self) -> None:
        """`clstr demo` starts the cluster, shows each key answered by its owner, and exits 0."""
        child = Child("demo", "--keys", "12", "--rounds", "2")
        try:
            assert child.wait(60) == 0, child.describe()
        finally:
            if child.process.poll() is None:
                child.kill_everything({})
        answers = re.findall(r"user-\d+\s+shard\s+\d+ -> (node-\d)", child.stdout)
        assert len(answers) == 12
        assert set(answers) == {"node-1", "node-2", "node-3"}
        assert "requests answered per node" in child.stdout
        assert "node-1 exit 0, node-2 exit 0, node-3 exit 0" in child.stdout
