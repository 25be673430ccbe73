"""``clstr bench`` works: every measurement runs and reports a numeric ratio.

A benchmark is never a timed unit test: these tests run the suite once with
tiny counts (``--quick``) and check the shape of its output, never a figure.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from clstr import bench

# The workers are separate processes: bound the whole run, never wait forever.
_RUN_TIMEOUT = 120


def _run_bench(tmp_path: Path, *options: str) -> subprocess.CompletedProcess[str]:
    # From tmp_path, so that the working directory cannot shadow the package.
    return subprocess.run(
        [sys.executable, "-m", "clstr.bench", "--quick", "--no-progress", *options],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=_RUN_TIMEOUT,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
    )


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One quick run of every benchmark, with JSON and Markdown output."""
    tmp_path = tmp_path_factory.mktemp("bench")
    markdown = tmp_path / "benchmarks.md"
    markdown.write_text("# Benchmarks\n\nintro kept\n", encoding="utf-8")
    done = _run_bench(tmp_path, "--json", str(tmp_path / "out.json"), "--markdown", str(markdown))
    assert done.returncode == 0, done.stderr
    return {
        "stdout": done.stdout,
        "json": json.loads((tmp_path / "out.json").read_text(encoding="utf-8")),
        "markdown": markdown.read_text(encoding="utf-8"),
    }


class TestQuickRun:
    def test_every_measurement_has_a_numeric_ratio(self, quick_run: dict[str, Any]) -> None:
        """The JSON output holds every row of SPECS, each with finite figures and ratio."""
        results = {r["name"]: r for r in quick_run["json"]["results"]}
        assert set(results) == {spec.name for spec in bench.SPECS}
        for name, row in results.items():
            for field in ("clstr", "baseline", "ratio"):
                value = row[field]
                assert isinstance(value, int | float), (name, field)
                assert math.isfinite(value), (name, field, value)
                assert value > 0, (name, field, value)
            assert row["runs"], name

    def test_verdicts_follow_the_targets(self, quick_run: dict[str, Any]) -> None:
        """A row with a target has a pass/fail verdict; a report-only row has none."""
        for row in quick_run["json"]["results"]:
            if row["target"] is None:
                assert row["passed"] is None
            else:
                assert isinstance(row["passed"], bool)

    def test_table_and_metadata(self, quick_run: dict[str, Any]) -> None:
        """The run prints the table and records how it was measured."""
        assert "nats_rr_throughput" in quick_run["stdout"]
        meta = quick_run["json"]["meta"]
        assert meta["quick"] is True
        assert meta["loop"] == "asyncio"
        assert meta["runs"] == 1

    def test_markdown_section_is_written(self, quick_run: dict[str, Any]) -> None:
        """--markdown adds the table between its markers and keeps the rest of the file."""
        text = quick_run["markdown"]
        assert "intro kept" in text
        assert "<!-- clstr-bench:asyncio:start -->" in text
        assert "| request/reply throughput over NATS" in text
        assert "| typed entity call over NATS" in text


def test_uvloop_and_plot(tmp_path: Path) -> None:
    """--uvloop runs the workers on uvloop, and --plot writes a PNG (the dev extra
    brings uvloop and matplotlib)."""
    plot = tmp_path / "ratios.png"
    done = _run_bench(
        tmp_path,
        "--uvloop",
        "--only",
        "memory_rr,hrw_assign",
        "--plot",
        str(plot),
        "--json",
        str(tmp_path / "out.json"),
    )
    assert done.returncode == 0, done.stderr
    meta = json.loads((tmp_path / "out.json").read_text(encoding="utf-8"))["meta"]
    assert meta["loop"].startswith("uvloop")
    assert plot.read_bytes().startswith(b"\x89PNG")


#: The groups of the subsystems (counters, ledger and edge client, tracing): every
#: row of theirs has a floor, checked by --strict.
_SUBSYSTEM_GROUPS = ("counters", "ledger", "edge_client", "tracing")


def test_subsystem_rows_have_floors() -> None:
    """Every row of the subsystem groups has a floor (a rate ratio it must reach),
    so that --strict guards it."""
    rows = [spec for spec in bench.SPECS if spec.group in _SUBSYSTEM_GROUPS]
    assert {spec.group for spec in rows} == set(_SUBSYSTEM_GROUPS)
    for spec in rows:
        assert spec.higher_is_better, spec.name
        assert spec.target is not None, spec.name
        assert spec.target_text().startswith(">="), spec.name


def test_strict_fails_when_a_floor_is_missed(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """--strict exits 1 when a row misses its floor and 0 when it meets it; without
    --strict a missed floor is reported, not an error. (The measurement is replaced
    by given figures: what is tested is the verdict, not the workers.)"""
    from clstr.bench import _command
    from clstr.bench._group import Collected

    spec = next(s for s in bench.SPECS if s.name == "tracing_rr")
    assert spec.target is not None

    def figures(ratio: float) -> Any:
        async def measure(*_args: object, **_kwargs: object) -> Collected:
            collected = Collected()
            collected.add(spec.name, ratio * 1000.0, 1000.0)
            return collected

        return measure

    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    only = ["--quick", "--no-progress", "--only", spec.group]
    monkeypatch.setattr(_command, "measure", figures(spec.target * 0.5))
    assert bench.run(parser.parse_args([*only, "--strict"])) == 1
    assert "FAIL" in capsys.readouterr().out
    assert bench.run(parser.parse_args(only)) == 0
    monkeypatch.setattr(_command, "measure", figures(spec.target * 2))
    assert bench.run(parser.parse_args([*only, "--strict"])) == 0


def test_unknown_measurement_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    """--only with an unknown name fails at once, naming the valid ones."""
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    assert bench.run(parser.parse_args(["--quick", "--only", "nope"])) == 1
    assert "nats_rr" in capsys.readouterr().err


def test_update_markdown_replaces_only_its_section() -> None:
    """A second update replaces the section's body and leaves other sections alone."""
    text = bench.update_markdown("# B\n", "asyncio", "first")
    text = bench.update_markdown(text, "uvloop", "other")
    text = bench.update_markdown(text, "asyncio", "second")
    assert "second" in text
    assert "first" not in text
    assert "other" in text
    assert text.count("clstr-bench:asyncio:start") == 1


def test_small_ratios_keep_three_significant_digits() -> None:
    """A ratio below 0.1 (the event bus's ingest against deque.append) is shown with
    three significant digits in the table and the Markdown, so that it can be read
    against a floor such as 0.015x; larger ratios keep two decimals."""
    from clstr.bench._group import Collected
    from clstr.bench._report import build_rows, format_table, markdown_table
    from clstr.bench._specs import Spec

    specs = [
        Spec("small", "g", "small row", "base", "events/s", True, 0.015),
        Spec("large", "g", "large row", "base", "events/s", True, 0.7),
    ]
    collected = Collected()
    collected.add("small", 1.0, 39.4)
    collected.add("large", 1.0, 1.25)
    rows = build_rows(specs, collected)
    assert "0.0254x" in format_table(rows)
    assert "**0.0254x**" in markdown_table(rows)
    assert "**0.80x**" in markdown_table(rows)


def test_summarise_profile_leaves_out_idle_and_imports() -> None:
    """Profile summaries count busy time only: I/O waits and imports are left out."""
    collapsed = "\n".join(
        [
            "main (x.py);work (clstr/node.py) 30",
            "main (x.py);EpollSelector.select (selectors.py);epoll.poll (<built-in>) 500",
            "main (x.py);_find_and_load (<frozen importlib._bootstrap>) 70",
            "main (x.py);send (nats/aio/client.py) 10",
        ]
    )
    summary = bench.summarise_profile(collapsed)
    assert "busy: 40" in summary
    assert "75.0%  work (clstr/node.py)" in summary


def test_worker_modules_import_neither_clstr_nor_nats(tmp_path: Path) -> None:
    """The worker script loads every module of clstr/bench without importing clstr or
    nats-py, so that a raw nats-py worker measures nats-py alone."""
    package = Path(bench.__file__).parent
    modules = sorted(
        p.stem for p in package.glob("_*.py") if p.stem not in ("__init__", "__main__")
    )
    code = (
        "import importlib.util, sys\n"
        "spec = importlib.util.spec_from_file_location('worker', sys.argv[1])\n"
        "worker = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(worker)\n"
        f"for name in {modules!r}:\n"
        "    worker.load(name)\n"
        "print(sorted(m for m in sys.modules if m.partition('.')[0] in ('clstr', 'nats')))\n"
    )
    done = subprocess.run(
        [sys.executable, "-P", "-c", code, str(package / "_worker.py")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=_RUN_TIMEOUT,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
    assert "_registry" in modules
