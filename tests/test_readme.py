"""The README stays true: its commands, its quickstart and every Python snippet run.

The demo's output excerpt (and the full output in docs/cli.md) is compared
with a real run of `clstr demo`. Python blocks in README.md are of three
kinds: the quickstart (identical to examples/quickstart/main.py and run as a
program), tour snippets marked
``<!-- readme-test: run -->`` (run with top-level ``await`` against a live
in-memory cluster, in the quickstart's namespace), and a pytest module marked
``<!-- readme-test: pytest -->`` (run by pytest in a subprocess).
"""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import signal
import subprocess
import sys
import tempfile
import types
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from clstr import Client, MemoryNetwork, MemoryTransport, Node

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
QUICKSTART = ROOT / "examples" / "quickstart" / "main.py"
# Below the per-test timeout of 60 s, so a hung run fails with its output.
RUN_TIMEOUT = 50.0

_FENCE = re.compile(r"^```(?P<lang>[\w-]*)\n(?P<body>.*?)^```\s*$", re.MULTILINE | re.DOTALL)
_MARKER = re.compile(r"<!-- readme-test: (?P<kind>[\w-]+) -->\s*$")


@dataclass(frozen=True)
class Block:
    """One fenced code block of the README."""

    lang: str
    body: str
    line: int
    marker: str | None
    section: str

    @property
    def label(self) -> str:
        return f"README.md:{self.line} ({self.section})"


def _blocks() -> list[Block]:
    text = README.read_text(encoding="utf-8")
    blocks = []
    for match in _FENCE.finditer(text):
        before = text[: match.start()]
        previous_line = before.rstrip("\n").rpartition("\n")[2]
        marker = _MARKER.search(previous_line)
        headings = re.findall(r"^#+ (.+)$", before, re.MULTILINE)
        blocks.append(
            Block(
                lang=match["lang"],
                body=match["body"],
                line=before.count("\n") + 1,
                marker=marker["kind"] if marker else None,
                section=headings[-1] if headings else "",
            )
        )
    return blocks


BLOCKS = _blocks()
PYTHON = [b for b in BLOCKS if b.lang == "python"]
RUN_SNIPPETS = [b for b in PYTHON if b.marker == "run"]
PYTEST_SNIPPETS = [b for b in PYTHON if b.marker == "pytest"]


def _quickstart_block() -> Block:
    blocks = [b for b in PYTHON if b.section == "Quickstart"]
    assert len(blocks) == 1, "the Quickstart section must hold exactly one python block"
    return blocks[0]


class TestCommands:
    """The README opens with the two commands that work on a fresh machine."""

    def test_first_block_is_demo_then_test(self) -> None:
        """The first code block holds exactly `./run.sh demo` then `./run.sh test`."""
        first = BLOCKS[0]
        commands = [line.strip() for line in first.body.splitlines() if line.strip()]
        assert commands == ["./run.sh demo", "./run.sh test"]

    def test_nothing_but_the_title_comes_before(self) -> None:
        """Only the title line precedes the commands block."""
        text = README.read_text(encoding="utf-8")
        head = text[: text.index("```")].strip()
        assert head.startswith("# ")
        assert "\n" not in head

    def test_commands_are_jobs_of_run_sh(self) -> None:
        """run.sh knows the demo and test jobs, and CI runs the README's test command."""
        script = (ROOT / "run.sh").read_text(encoding="utf-8")
        assert "  demo)" in script
        assert "  test)" in script
        assert "./run.sh test" in (ROOT / ".ci" / "run").read_text(encoding="utf-8")


def _normalize(line: str) -> str:
    """A line of demo output without what differs between runs: pids, ports, uptimes,
    the version, the alignment that follows from them."""
    line = re.sub(r"\bpid \d+", "pid N", line)
    line = re.sub(r"127\.0\.0\.1:\d+", "127.0.0.1:PORT", line)
    line = re.sub(r"(?<= )\d+(s|m\d\ds|h\d\dm|d\d\dh)(?= )", "UP", line)
    line = re.sub(r"\b\d+\.\d+\.\d+$", "VERSION", line)
    return " ".join(line.split())


def _shown_lines(block: str) -> list[str]:
    """The output lines a docs block shows, without elisions, the command and ^C."""
    skipped = {"...", "…", "^C"}
    return [
        _normalize(line)
        for line in block.splitlines()
        if line.strip() and line.strip() not in skipped and not line.startswith("$ ")
    ]


def _missing_in_order(shown: list[str], actual: list[str]) -> list[str]:
    """The shown lines that do not appear in ``actual`` in the same order."""
    remaining = iter(actual)
    return [line for line in shown if not any(line == seen for seen in remaining)]


def _run_demo_until_ready() -> str:
    """Run `clstr demo` (on a free port), wait for its ready line, Ctrl-C it; its stdout."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLSTR_")}
    env["PYTHONUNBUFFERED"] = "1"
    with tempfile.TemporaryFile() as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "clstr", "demo", "--port", "0"],
            stdout=subprocess.PIPE,
            stderr=err,
            env=env,
            start_new_session=True,
        )
        lines: list[str] = []
        try:
            assert process.stdout is not None
            for raw in process.stdout:
                lines.append(raw.decode().rstrip("\n"))
                if lines[-1] == "cluster ready; press Ctrl-C to stop":
                    process.send_signal(signal.SIGINT)
            assert process.wait(RUN_TIMEOUT) == 0, "\n".join(lines)
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            if process.stdout is not None:
                process.stdout.close()
    return "\n".join(lines)


@pytest.fixture(scope="module")
def demo_output() -> str:
    """What `clstr demo` prints from start to Ctrl-C (one run for the module)."""
    return _run_demo_until_ready()


class TestDemoOutput:
    """The demo output shown in the README and in docs/cli.md is what the demo prints."""

    def test_readme_excerpt(self, demo_output: str) -> None:
        """Every line of the README's excerpt appears, in order, in a real run's output."""
        text = README.read_text(encoding="utf-8")
        start = text.index("What `./run.sh demo` prints")
        block = re.search(r"^```text\n(.*?)^```", text[start:], re.M | re.S)
        assert block is not None
        shown = _shown_lines(block[1])
        assert len(shown) > 20
        missing = _missing_in_order(shown, [_normalize(line) for line in demo_output.splitlines()])
        assert not missing, f"not printed (in this order): {missing}\n--- printed:\n{demo_output}"

    def test_cli_doc_output(self, demo_output: str) -> None:
        """docs/cli.md's `$ clstr demo` block shows a real run's lines, in order."""
        text = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
        block = re.search(r"^```console\n(\$ clstr demo\n.*?)^```", text, re.M | re.S)
        assert block is not None
        shown = _shown_lines(block[1])
        assert len(shown) > 40
        missing = _missing_in_order(shown, [_normalize(line) for line in demo_output.splitlines()])
        assert not missing, f"not printed (in this order): {missing}\n--- printed:\n{demo_output}"


class TestQuickstart:
    """The README quickstart and examples/quickstart/main.py are one program, and it runs."""

    def test_block_equals_example_file(self) -> None:
        """The quickstart block is byte for byte examples/quickstart/main.py."""
        assert _quickstart_block().body == QUICKSTART.read_text(encoding="utf-8")

    def test_block_runs_as_written(self, tmp_path: Path) -> None:
        """The block, saved as a file and run with this interpreter, exits 0 serving both nodes."""
        program = tmp_path / "readme_quickstart.py"
        program.write_text(_quickstart_block().body, encoding="utf-8")
        done = subprocess.run(
            [sys.executable, str(program)],
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT,
            cwd=tmp_path,
            check=False,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert "in memory:" in done.stdout
        assert "over NATS at nats://" in done.stdout
        assert {"node-a", "node-b"} <= set(re.findall(r"-> (node-[ab]):", done.stdout))


class TestEveryPythonBlockIsChecked:
    """No Python block in the README escapes these tests."""

    def test_each_block_is_quickstart_or_marked(self) -> None:
        """Every python block is the quickstart or carries a readme-test marker."""
        quickstart = _quickstart_block()
        unmarked = [b.label for b in PYTHON if b is not quickstart and b.marker is None]
        assert not unmarked, f"python blocks with no <!-- readme-test: ... --> marker: {unmarked}"
        assert {b.marker for b in PYTHON} <= {None, "run", "pytest"}

    def test_there_are_snippets(self) -> None:
        """The tour has runnable snippets and a pytest example (the parsing found them)."""
        assert len(RUN_SNIPPETS) >= 5
        assert len(PYTEST_SNIPPETS) == 1


def _load_quickstart() -> types.ModuleType:
    spec = importlib.util.spec_from_file_location("readme_quickstart", QUICKSTART)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def quickstart() -> Iterator[types.ModuleType]:
    """examples/quickstart/main.py imported as a module (its main() is not run)."""
    module = _load_quickstart()
    yield module
    sys.modules.pop(module.__name__, None)


@pytest_asyncio.fixture
async def snippet_namespace(quickstart: types.ModuleType) -> AsyncIterator[dict[str, Any]]:
    """The quickstart's names, plus `client` and `transport` of a running 2-node cluster."""
    network = MemoryNetwork()
    ids: list[str] = quickstart.NODE_IDS
    nodes = [
        Node(
            MemoryTransport(network, name=node_id),
            quickstart.make_handler(node_id),
            node_id=node_id,
            nodes=ids,
            num_shards=quickstart.NUM_SHARDS,
        )
        for node_id in ids
    ]
    transport = MemoryTransport(network, name="snippet")
    try:
        for node in nodes:
            await node.start()
        client = Client(MemoryTransport(network, name="client"), num_shards=quickstart.NUM_SHARDS)
        yield {**vars(quickstart), "client": client, "transport": transport}
    finally:
        for node in nodes:
            await node.stop()
        await transport.close()


class TestTourSnippets:
    """Every tour snippet runs against a live cluster, so the APIs it shows exist."""

    @pytest.mark.parametrize("block", RUN_SNIPPETS, ids=lambda b: f"line{b.line}")
    async def test_snippet_runs(self, block: Block, snippet_namespace: dict[str, Any]) -> None:
        """The snippet runs to the end with top-level await, its asserts holding."""
        code = compile(block.body, block.label, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
        result = eval(code, snippet_namespace)  # our own README, by design
        if result is not None:
            await result

    @pytest.mark.parametrize("block", PYTEST_SNIPPETS, ids=lambda b: f"line{b.line}")
    def test_pytest_example_passes(self, block: Block, tmp_path: Path) -> None:
        """The testing-kit example passes under pytest with the installed clstr plugin."""
        test_file = tmp_path / "test_readme_example.py"
        test_file.write_text(block.body, encoding="utf-8")
        done = subprocess.run(
            [
                *(sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"),
                # As strict as our own suite: any warning fails the example.
                *("-W", "error", "-o", "asyncio_default_fixture_loop_scope=function"),
                str(test_file),
            ],
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT,
            cwd=tmp_path,
            check=False,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert re.search(r"\b3 passed\b", done.stdout), done.stdout


class TestLinks:
    """Relative links in the README point at files that exist."""

    def test_relative_links_resolve(self) -> None:
        """Every relative markdown link names an existing file or directory."""
        text = README.read_text(encoding="utf-8")
        targets = {
            target.partition("#")[0]
            for target in re.findall(r"\]\(([^)\s]+)\)", text)
            if "://" not in target and not target.startswith("#")
        }
        missing = sorted(t for t in targets if not (ROOT / t).exists())
        assert not missing, f"README links to missing files: {missing}"

    def test_anchors_name_headings(self) -> None:
        """Every link with a #fragment names a heading of the file it points at."""
        text = README.read_text(encoding="utf-8")
        broken = []
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            path, _, fragment = target.partition("#")
            if "://" in target or not fragment:
                continue
            file = ROOT / path if path else README
            if file.is_file() and fragment not in _anchors(file):
                broken.append(target)
        assert not broken, f"README links to missing headings: {broken}"


def _anchors(file: Path) -> set[str]:
    """GitHub's anchors for the headings of a markdown file (code blocks skipped)."""
    text = re.sub(r"^```.*?^```", "", file.read_text(encoding="utf-8"), flags=re.S | re.M)
    headings = re.findall(r"^#+ (.+)$", text, re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}
