"""Every example in examples/ runs on its own, exits 0 and prints what it promises.

Each example runs once per test session, as a subprocess with this interpreter
(``sys.executable examples/<name>.py``), and the tests read its output.
"""

from __future__ import annotations

import ast
import functools
import os
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
EXAMPLE_FILES = sorted(p.name for p in EXAMPLES.glob("*.py"))
# Below the per-test timeout of 60 s, so a hung example fails with its output.
RUN_TIMEOUT = 50.0


@dataclass(frozen=True)
class Run:
    """The outcome of one example run."""

    name: str
    returncode: int
    stdout: str
    stderr: str

    def explain(self) -> str:
        return (
            f"{self.name} exited {self.returncode}\n"
            f"--- stdout\n{self.stdout}\n--- stderr\n{self.stderr}"
        )


@functools.cache
def _run(name: str) -> Run:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / name)],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        cwd=EXAMPLES.parent,
        env=env,
        check=False,
    )
    return Run(name, done.returncode, done.stdout, done.stderr)


@pytest.fixture(scope="session")
def run_example() -> Callable[[str], Run]:
    """Run an example (once per session) and return its outcome."""
    return _run


class TestEveryExample:
    """Each example is documented, runs to completion and exits 0."""

    def test_the_expected_examples_exist(self) -> None:
        """The four examples the README and examples/README.md describe are all there."""
        assert set(EXAMPLE_FILES) >= {
            "quickstart.py",
            "key_handler_sessions.py",
            "typed_calls.py",
            "multiprocess_cluster.py",
        }

    @pytest.mark.parametrize("name", EXAMPLE_FILES)
    def test_exits_zero(self, name: str, run_example: Callable[[str], Run]) -> None:
        """The example finishes on its own within the timeout with exit code 0."""
        run = run_example(name)
        assert run.returncode == 0, run.explain()

    @pytest.mark.parametrize("name", EXAMPLE_FILES)
    def test_has_a_docstring_and_a_readme_entry(self, name: str) -> None:
        """The example opens with a docstring and examples/README.md describes it."""
        module = ast.parse((EXAMPLES / name).read_text(encoding="utf-8"))
        assert ast.get_docstring(module), f"{name} has no docstring header"
        assert f"`{name}`" in (EXAMPLES / "README.md").read_text(encoding="utf-8")


class TestQuickstart:
    """The quickstart serves keyed requests on both transports."""

    def test_both_transports_answer_from_both_nodes(
        self, run_example: Callable[[str], Run]
    ) -> None:
        """In memory and over NATS, greetings come back, from node-a and from node-b."""
        out = run_example("quickstart.py").stdout
        memory, _, nats = out.partition("over NATS at nats://")
        for part in (memory, nats):
            answered = set(re.findall(r"-> (node-[ab]): hello \w+", part))
            assert answered == {"node-a", "node-b"}, out

    def test_counter_keeps_state_per_key(self, run_example: Callable[[str], Run]) -> None:
        """Three increments of 2 on one key count to 6, on each transport."""
        out = run_example("quickstart.py").stdout
        assert len(re.findall(r"page:home counted to 6 on node-[ab]", out)) == 2, out


class TestKeyHandlerSessions:
    """An idle session is evicted, saved, and reloaded with its state."""

    def test_idle_sessions_are_evicted_and_saved(self, run_example: Callable[[str], Run]) -> None:
        """Both idle sessions go through on_evict with their carts before alice returns."""
        out = run_example("key_handler_sessions.py").stdout
        before_return = out.partition("alice comes back:")[0]
        assert "[evict] alice: saved ['book', 'pen'] to the store" in before_return, out
        assert "[evict] bob: saved ['lamp'] to the store" in before_return, out
        assert "sessions in memory: 0; in the store: ['alice', 'bob']" in before_return, out

    def test_returning_user_gets_the_saved_state(self, run_example: Callable[[str], Run]) -> None:
        """The next message for alice reloads her cart from the store and extends it."""
        out = run_example("key_handler_sessions.py").stdout
        assert "[load]  alice: reloaded ['book', 'pen'] from the store" in out, out
        assert "alice's cart: ['book', 'pen'] (loaded from store: True)" in out, out
        assert "alice's cart: ['book', 'pen', 'ink']" in out, out

    def test_stopping_the_node_saves_live_sessions(self, run_example: Callable[[str], Run]) -> None:
        """The node's stop evicts alice's live session, so the store holds everything."""
        out = run_example("key_handler_sessions.py").stdout
        assert "store at exit: {'alice': ['book', 'pen', 'ink'], 'bob': ['lamp']}" in out, out


class TestTypedCalls:
    """Typed calls return dataclasses and each failure surfaces as its own exception."""

    def test_typed_replies(self, run_example: Callable[[str], Run]) -> None:
        """Replies decode into dataclasses, nested ones and the header-carried note included."""
        out = run_example("typed_calls.py").stdout
        assert "deposit 100      -> Balance(account='acct-42', balance=100)" in out, out
        assert "Entry(amount=100, note='salary'), Entry(amount=-30, note='withdrawal')" in out

    def test_each_error_has_its_class(self, run_example: Callable[[str], Run]) -> None:
        """validate(), a raising handler, an unknown type and a slow handler map to their errors."""
        out = run_example("typed_calls.py").stdout
        assert "deposit -5       -> PayloadError (nothing sent)" in out, out
        assert "RemoteHandlerError: remote_type=InsufficientFunds" in out, out
        assert "close            -> NoHandlerError (retryable=False)" in out, out
        assert "audit (0.2s)     -> HandlerTimeoutError" in out, out
        assert "final balance    -> 70" in out, out


class TestMultiprocessCluster:
    """Nodes in separate processes serve their keys and all stop cleanly."""

    def test_requests_are_answered_by_several_processes(
        self, run_example: Callable[[str], Run]
    ) -> None:
        """Keyed requests are answered by more than one node, each in its own process."""
        out = run_example("multiprocess_cluster.py").stdout
        answers = set(re.findall(r"-> (node-\d) pid (\d+)", out))
        assert len({node for node, _ in answers}) > 1, out
        assert len({pid for _, pid in answers}) == len({node for node, _ in answers}), out

    def test_stopped_node_means_no_owner_at_once(self, run_example: Callable[[str], Run]) -> None:
        """After SIGTERM to one node its keys fail with NoShardOwnerError, not a timeout."""
        out = run_example("multiprocess_cluster.py").stdout
        assert "SIGTERM to node-3:" in out, out
        assert "node-3 stopped gracefully" in out, out
        assert re.search(r"\(owned by node-3\) -> NoShardOwnerError after [\d.]+ ms", out), out

    def test_no_process_is_left_behind(self, run_example: Callable[[str], Run]) -> None:
        """Every node process exits 0 after a graceful stop, and none is alive afterwards."""
        out = run_example("multiprocess_cluster.py").stdout
        exits = re.findall(r"(node-\d) \(pid (\d+)\) exited with code (-?\d+)", out)
        assert sorted(node for node, _, _ in exits) == ["node-1", "node-2", "node-3"], out
        assert {code for _, _, code in exits} == {"0"}, out
        assert out.count("stopped gracefully") == 3, out
        server_pid = re.search(r"nats-server nats://\S+ \(pid (\d+)\)", out)
        assert server_pid is not None, out
        for pid in [int(pid) for _, pid, _ in exits] + [int(server_pid.group(1))]:
            assert not _alive(pid), f"process {pid} outlived the example"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - a reused pid owned by someone else
        return True
    # A zombie still answers signal 0; it is gone once reaped.
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(") ")[-1].startswith("Z"))
