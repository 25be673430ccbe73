"""`clstr conformance` against a real `clstr node` process serving the conformance app:
every case passes and the command exits 0; a failed case exits 1; the testing kit
loads only when the command runs."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from clstr.cli import main
from clstr.testing import NatsServer
from clstr.testing._processes import NodeProcess

NUM_SHARDS = 8
SUMMARY = re.compile(r"^(\d+) cases: (\d+) passed, (\d+) failed, (\d+) skipped$", re.M)


@pytest_asyncio.fixture
async def conformance_node(clstr_nats_server: NatsServer) -> AsyncIterator[str]:
    """A `clstr node --app clstr.testing.conformance:app` process serving every shard
    under a prefix of its own; yields the prefix."""
    prefix = f"conf{uuid.uuid4().hex[:8]}"
    process = NodeProcess(
        "conf-1",
        clstr_nats_server.url,
        num_shards=NUM_SHARDS,
        prefix=prefix,
        static_nodes=["conf-1"],
        app="clstr.testing.conformance:app",
    )
    async with process:
        yield prefix


async def conformance(
    capsys: pytest.CaptureFixture[str], url: str, prefix: str, shards: int
) -> tuple[int, str]:
    """Run `clstr conformance` in-process (in a thread: it runs its own event loop)."""
    capsys.readouterr()
    argv = ["--nats-url", url, "--prefix", prefix, "--shards", str(shards), "conformance"]
    code = await asyncio.to_thread(main, [*argv, "--timeout", "5"])
    return code, capsys.readouterr().out


class TestConformanceCommand:
    async def test_a_clstr_node_of_the_conformance_app_passes_every_case(
        self,
        conformance_node: str,
        clstr_nats_server: NatsServer,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        """Against a `clstr node` serving the conformance app, every case of the table
        passes (none skipped) and the command exits 0."""
        code, out = await conformance(capsys, clstr_nats_server.url, conformance_node, NUM_SHARDS)
        assert code == 0, out
        summary = SUMMARY.search(out)
        assert summary is not None, out
        total, passed, failed, skipped = map(int, summary.groups())
        assert (passed, failed, skipped) == (total, 0, 0), out
        assert total >= 25
        rows = out.splitlines()[1 : total + 1]
        assert out.splitlines()[0].split() == ["CASE", "SECTION", "RESULT", "DETAIL"]
        assert all(re.search(r"  pass$", row) for row in rows), out
        assert any("a key sent to another shard" in row for row in rows)

    async def test_a_failing_case_exits_1_and_says_why(
        self,
        conformance_node: str,
        clstr_nats_server: NatsServer,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        """With more shards than the node serves, the cases sent to shards nobody
        serves fail with their reason in the table, and the command exits 1."""
        code, out = await conformance(
            capsys, clstr_nats_server.url, conformance_node, NUM_SHARDS * 2
        )
        assert code == 1, out
        failed = [row for row in out.splitlines() if "  fail  " in row]
        assert any(
            row.startswith("node info answers on every shard")
            and "no node serves the shard (no responders)" in row
            for row in failed
        ), out
        summary = SUMMARY.search(out)
        assert summary is not None, out
        assert int(summary.group(3)) == len(failed), out


def test_the_testing_kit_loads_only_when_the_command_runs() -> None:
    """Building the parser and parsing `clstr conformance` imports neither the testing
    kit nor nats-py (nor the dashboard): every other command starts without them."""
    probe = (
        "import sys; from clstr.cli import build_parser; "
        "build_parser().parse_args(['conformance']); "
        "build_parser().parse_args(['dashboard']); "
        "print(sorted(m for m in ('clstr.testing', 'clstr.observe', 'nats') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"
