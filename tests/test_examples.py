"""Every example in examples/ runs on its own, exits 0 and prints what it promises.

An example is a directory ``examples/<name>/`` with a ``main.py`` and a short
``README.md``; ``examples/README.md`` is the index. Each example runs once per
test session, as a subprocess with this interpreter
(``sys.executable examples/<name>/main.py``), and the tests read its output.
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
EXAMPLE_NAMES = sorted(p.parent.name for p in EXAMPLES.glob("*/main.py"))
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
        [sys.executable, str(EXAMPLES / name / "main.py")],
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
        """The four examples the README and examples/README.md describe are all there,
        and nothing but the index is left at the top of examples/."""
        assert set(EXAMPLE_NAMES) >= {
            "quickstart",
            "key_handler_sessions",
            "typed_calls",
            "multiprocess_cluster",
        }
        assert sorted(p.name for p in EXAMPLES.iterdir() if p.is_file()) == ["README.md"]

    @pytest.mark.parametrize("name", EXAMPLE_NAMES)
    def test_exits_zero(self, name: str, run_example: Callable[[str], Run]) -> None:
        """The example finishes on its own within the timeout with exit code 0."""
        run = run_example(name)
        assert run.returncode == 0, run.explain()

    @pytest.mark.parametrize("name", EXAMPLE_NAMES)
    def test_has_a_docstring_a_readme_and_an_index_entry(self, name: str) -> None:
        """main.py opens with a docstring; the example's README says what it is and how
        to run it; examples/README.md links to it."""
        module = ast.parse((EXAMPLES / name / "main.py").read_text(encoding="utf-8"))
        assert ast.get_docstring(module), f"{name}/main.py has no docstring header"
        readme = (EXAMPLES / name / "README.md").read_text(encoding="utf-8")
        assert readme.startswith("# "), f"{name}/README.md has no title"
        assert f"python examples/{name}/main.py" in readme
        for target in re.findall(r"\]\(([^)\s]+)\)", readme):
            assert (EXAMPLES / name / target).exists(), f"{name}/README.md links to {target}"
        assert f"]({name}/)" in (EXAMPLES / "README.md").read_text(encoding="utf-8")


class TestQuickstart:
    """The quickstart serves keyed requests on both transports."""

    def test_both_transports_answer_from_both_nodes(
        self, run_example: Callable[[str], Run]
    ) -> None:
        """In memory and over NATS, greetings come back, from node-a and from node-b."""
        out = run_example("quickstart").stdout
        memory, _, nats = out.partition("over NATS at nats://")
        for part in (memory, nats):
            answered = set(re.findall(r"-> (node-[ab]): hello \w+", part))
            assert answered == {"node-a", "node-b"}, out

    def test_counter_keeps_state_per_key(self, run_example: Callable[[str], Run]) -> None:
        """Three increments of 2 on one key count to 6, on each transport."""
        out = run_example("quickstart").stdout
        assert len(re.findall(r"page:home counted to 6 on node-[ab]", out)) == 2, out


class TestKeyHandlerSessions:
    """An idle session is evicted, saved, and reloaded with its state."""

    def test_idle_sessions_are_evicted_and_saved(self, run_example: Callable[[str], Run]) -> None:
        """Both idle sessions go through on_evict with their carts before alice returns."""
        out = run_example("key_handler_sessions").stdout
        before_return = out.partition("alice comes back:")[0]
        assert "[evict] alice: saved ['book', 'pen'] to the store" in before_return, out
        assert "[evict] bob: saved ['lamp'] to the store" in before_return, out
        assert "sessions in memory: 0; in the store: ['alice', 'bob']" in before_return, out

    def test_returning_user_gets_the_saved_state(self, run_example: Callable[[str], Run]) -> None:
        """The next message for alice reloads her cart from the store and extends it."""
        out = run_example("key_handler_sessions").stdout
        assert "[load]  alice: reloaded ['book', 'pen'] from the store" in out, out
        assert "alice's cart: ['book', 'pen'] (loaded from store: True)" in out, out
        assert "alice's cart: ['book', 'pen', 'ink']" in out, out

    def test_stopping_the_node_saves_live_sessions(self, run_example: Callable[[str], Run]) -> None:
        """The node's stop evicts alice's live session, so the store holds everything."""
        out = run_example("key_handler_sessions").stdout
        assert "store at exit: {'alice': ['book', 'pen', 'ink'], 'bob': ['lamp']}" in out, out


class TestTypedCalls:
    """Typed calls return dataclasses and each failure surfaces as its own exception."""

    def test_typed_replies(self, run_example: Callable[[str], Run]) -> None:
        """Replies decode into dataclasses, nested ones and the header-carried note included."""
        out = run_example("typed_calls").stdout
        assert "deposit 100      -> Balance(account='acct-42', balance=100)" in out, out
        assert "Entry(amount=100, note='salary'), Entry(amount=-30, note='withdrawal')" in out

    def test_each_error_has_its_class(self, run_example: Callable[[str], Run]) -> None:
        """validate(), a raising handler, an unknown type and a slow handler map to their errors."""
        out = run_example("typed_calls").stdout
        assert "deposit -5       -> PayloadError (nothing sent)" in out, out
        assert "RemoteHandlerError: remote_type=InsufficientFunds" in out, out
        assert "close            -> NoHandlerError (retryable=False)" in out, out
        assert "audit (0.2s)     -> HandlerTimeoutError" in out, out
        assert "final balance    -> 70" in out, out


class TestEntities:
    """Entities keep their state across a node's stop; the singleton moves."""

    def test_carts_come_back_with_their_items(self, run_example: Callable[[str], Run]) -> None:
        """After the singleton's node stops, every cart holds the items added before."""
        out = run_example("entities").stdout
        assert "ann holds ['tea', 'bread']" in out, out
        assert "bob holds ['jam']" in out, out
        assert "cy  holds ['milk']" in out, out

    def test_the_singleton_runs_once_and_moves(self, run_example: Callable[[str], Run]) -> None:
        """The singleton reports the totals, stops on the stopped node and starts on another."""
        out = run_example("entities").stdout
        stopping = re.search(r"stopping (node-\d), which runs the singleton", out)
        assert stopping is not None, out
        _before, _, after = out.partition(stopping.group(0))
        assert f"[totals] stopped on {stopping.group(1)}" in after, out
        moved = re.search(r"\[totals\] started on (node-\d)", after)
        assert moved is not None, out
        assert moved.group(1) != stopping.group(1), out
        assert "3 carts, 4 items" in after, out


class TestStreamsAndWorkflows:
    """A report streams row by row; a persisted job outlives its caller."""

    def test_the_report_streams_every_row_in_order(self, run_example: Callable[[str], Run]) -> None:
        """The streamed report prints its five rows in order, then the count."""
        out = run_example("streams_and_workflows").stdout
        rows = re.findall(r"row (\d): emea sales line \1", out)
        assert rows == ["0", "1", "2", "3", "4"], out
        assert "streamed 5 rows" in out, out

    def test_a_new_client_gets_the_reply_of_a_job_whose_caller_left(
        self, run_example: Callable[[str], Run]
    ) -> None:
        """The job is submitted and its caller exits before the job runs; a new client
        awaiting its request id gets the stored reply, and replies_for finds it."""
        out = run_example("streams_and_workflows").stdout
        submitted = re.search(r"submitted nightly-rollup as request (\d+); the caller exits", out)
        assert submitted is not None, out
        request_id = submitted.group(1)
        _, _, later = out.partition(submitted.group(0))
        assert f"a new client awaits request {request_id}" in later, out
        assert "nightly-rollup: step 3/3 done" in later, out
        assert "nightly-rollup finished 3 steps on node-1" in later, out
        assert f"replies_for({request_id}) -> 1 stored reply" in later, out


class TestCounters:
    """Strict counters see every order; lax counters count every view, across a stop."""

    def test_the_strict_counter_refuses_an_order_that_would_oversell(
        self, run_example: Callable[[str], Run]
    ) -> None:
        """The third order of 2 of 5 teas is refused and put back; the stock ends at 0."""
        out = run_example("counters").stdout
        assert "order 2 tea: refused (short)" in out, out
        assert out.count("stock: tea=0") == 2, out

    def test_every_view_is_counted_across_a_node_stop(
        self, run_example: Callable[[str], Run]
    ) -> None:
        """The lax counter's views are flushed in a few batches and all counted, before
        and after a node stops."""
        out = run_example("counters").stdout
        assert "views: /=1000 /docs=1000 /pricing=1000" in out, out
        assert "views: /=1010 /docs=1010 /pricing=1010" in out, out
        flushed = re.search(r"flushed in (\d+) batch messages", out)
        assert flushed is not None, out
        assert int(flushed.group(1)) <= 6, out


class TestLedger:
    """The ledger over two regions: the closer one first, one event per nonce, and
    balances that are the sum of the events."""

    def test_the_closer_region_serves_and_refusals_are_typed(
        self, run_example: Callable[[str], Run]
    ) -> None:
        """East (no proxy) is active; the reservation settles once; the overdraft and
        the second settle are refused with their own errors."""
        out = run_example("ledger").stdout
        assert "active edge: east" in out, out
        assert re.search(r"#3 entry -25 -> balance 75, .*credits:east-1:", out), out
        assert "second settle refused: ReservationClosedError" in out, out
        assert "overdraft refused: InsufficientFundsError" in out, out

    def test_a_killed_region_moves_the_client_and_the_nonce_lands_once(
        self, run_example: Callable[[str], Run]
    ) -> None:
        """After east's server is killed the charge goes through west, its repeat is the
        same event, and the four events add up to the balance."""
        out = run_example("ledger").stdout
        after = out.partition("killing east's nats-server")[2]
        assert re.search(r"charge order-7 via west: #4 entry -10 -> balance 65, .*west-1", after)
        assert "charge order-7 again: same event: True" in after, out
        assert "events of credits/ann: 4" in after, out
        assert "ann: balance 65 = sum of her events 65" in after, out
        assert "balances: [('ann', 65)], partial False" in after, out


class TestMultiprocessCluster:
    """Node processes started with the testing kit serve their keys and all stop cleanly."""

    def test_nodes_are_started_with_the_testing_kit(self) -> None:
        """The example starts its node processes with clstr.testing.NodeProcess, as
        `clstr node` processes of its service module, not by hand."""
        source = (EXAMPLES / "multiprocess_cluster" / "main.py").read_text(encoding="utf-8")
        assert "from clstr.testing import NatsServer, NodeProcess" in source
        assert 'app="service:app"' in source
        assert "create_subprocess_exec" not in source
        assert "subprocess" not in source

    def test_requests_are_answered_by_several_processes(
        self, run_example: Callable[[str], Run]
    ) -> None:
        """Keyed requests are answered by more than one node, each in its own process."""
        out = run_example("multiprocess_cluster").stdout
        answers = set(re.findall(r"-> (node-\d) pid (\d+)", out))
        assert len({node for node, _ in answers}) > 1, out
        assert len({pid for _, pid in answers}) == len({node for node, _ in answers}), out
        started = dict(re.findall(r"started (node-\d) pid=(\d+)", out))
        assert dict(answers) == {n: started[n] for n, _ in answers}, out

    def test_stopped_node_means_no_owner_at_once(self, run_example: Callable[[str], Run]) -> None:
        """After SIGTERM to one node its keys fail with NoShardOwnerError, not a timeout."""
        out = run_example("multiprocess_cluster").stdout
        assert "SIGTERM to node-3:" in out, out
        assert "node-3 stopped gracefully" in out, out
        assert re.search(r"\(owned by node-3\) -> NoShardOwnerError after [\d.]+ ms", out), out

    def test_no_process_is_left_behind(self, run_example: Callable[[str], Run]) -> None:
        """Every node process exits 0 after a graceful stop, and none is alive afterwards."""
        out = run_example("multiprocess_cluster").stdout
        exits = re.findall(r"(node-\d) \(pid (\d+)\) exited with code (-?\d+)", out)
        assert sorted(node for node, _, _ in exits) == ["node-1", "node-2", "node-3"], out
        assert {code for _, _, code in exits} == {"0"}, out
        assert out.count("stopped gracefully") == 3, out
        server_pid = re.search(r"nats-server nats://\S+ \(pid (\d+)\)", out)
        assert server_pid is not None, out
        for pid in [int(pid) for _, pid, _ in exits] + [int(server_pid.group(1))]:
            assert not _alive(pid), f"process {pid} outlived the example"


class TestEventbus:
    """The event bus example ingests, polls, consumes on two nodes and rescales."""

    def test_every_event_is_consumed_once_and_the_invariant_holds(
        self, run_example: Callable[[str], Run]
    ) -> None:
        """All 8000 events are consumed, none twice, across a rescale and a node stop,
        and dispatched + dropped == ingested after shutdown, without loss."""
        out = run_example("eventbus").stdout
        assert "consumed 8000 events" in out, out
        assert ", 0 twice" in out, out
        assert "invariant: dispatched + dropped == ingested: 8000 + 0 == 8000" in out, out
        assert "shutdown_was_lossy=False" in out, out

    def test_both_nodes_own_bus_shards_and_polls_page(
        self, run_example: Callable[[str], Run]
    ) -> None:
        """Each consumer node owns some bus shards, the cursor-paged poll finds the paid
        third of the first 5000 orders, and the two added shards get new ids."""
        out = run_example("eventbus").stdout
        owned = re.findall(r"(node-[ab]) owns bus shards \[([\d, ]*)\]", out)
        assert len(owned) == 2, out
        assert all(shards for _, shards in owned), out
        assert re.search(r"polled 1667 paid orders in \d+ pages", out), out
        assert "added shards [4, 5]; now [0, 1, 2, 3, 4, 5]" in out, out


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
