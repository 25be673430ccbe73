"""How results are shown: rows (medians of the runs), the text table, the
Markdown section, the plot, and the run's metadata.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import math
import os
import platform
import re
import statistics
import subprocess
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Final

from ._group import Collected
from ._protocol import JSON
from ._specs import BenchError, Sizes, Spec


@dataclass(slots=True)
class Row:
    """One measured row: medians of both sides and of the per-run ratios."""

    name: str
    what: str
    baseline_what: str
    unit: str
    clstr: float
    baseline: float
    ratio: float
    target: float | None
    target_text: str
    higher_is_better: bool
    passed: bool | None
    runs: list[JSON]
    extra: JSON


def build_rows(specs: Sequence[Spec], collected: Collected) -> list[Row]:
    """The rows of ``specs`` that ``collected`` has figures for, in order."""
    rows = []
    for spec in specs:
        pairs = collected.samples.get(spec.name)
        if not pairs:
            continue
        ratios = [c / b if b else math.inf for c, b in pairs]
        ratio = statistics.median(ratios)
        rows.append(
            Row(
                name=spec.name,
                what=spec.what,
                baseline_what=spec.baseline,
                unit=spec.unit,
                clstr=statistics.median(c for c, _ in pairs),
                baseline=statistics.median(b for _, b in pairs),
                ratio=ratio,
                target=spec.target,
                target_text=spec.target_text(),
                higher_is_better=spec.higher_is_better,
                passed=spec.passed(ratio),
                runs=[
                    {"clstr": c, "baseline": b, "ratio": r}
                    for (c, b), r in zip(pairs, ratios, strict=True)
                ],
                extra=collected.details(spec.name),
            )
        )
    return rows


def _fmt(value: float, unit: str) -> str:
    if value >= 1e6:
        return f"{value / 1e6:.2f}M {unit}"
    if value >= 1e4:
        return f"{value:,.0f} {unit}"
    if value >= 100:
        return f"{value:.0f} {unit}"
    return f"{value:.3g} {unit}"


def _ratio_text(ratio: float) -> str:
    """Two decimals, or three significant digits below 0.1 (the event bus's ingest
    ratio is 0.02x against a floor of 0.015x)."""
    return f"{ratio:.2f}x" if ratio >= 0.1 else f"{ratio:.3g}x"


def _verdict(passed: bool | None) -> str:
    return {True: "pass", False: "FAIL", None: "-"}[passed]


def format_table(rows: Sequence[Row]) -> str:
    """The results as a fixed-width text table."""
    header = ("measurement", "clstr", "baseline", "ratio", "CPU", "target", "")
    lines = [
        (
            r.name,
            _fmt(r.clstr, r.unit),
            _fmt(r.baseline, r.unit),
            _ratio_text(r.ratio),
            _cpu_text(r),
            r.target_text,
            _verdict(r.passed),
        )
        for r in rows
    ]
    widths = [max(len(str(x[i])) for x in [header, *lines]) for i in range(len(header))]
    out = []
    for cells in [header, *lines]:
        out.append(
            "  ".join(
                str(c).rjust(w) if 0 < i < 5 else str(c).ljust(w)
                for i, (c, w) in enumerate(zip(cells, widths, strict=True))
            ).rstrip()
        )
        if cells is header:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def _cpu_text(row: Row) -> str:
    cpu = row.extra.get("cpu_ratio")
    return f"{cpu:.2f}x" if isinstance(cpu, float) else "-"


def markdown_table(rows: Sequence[Row]) -> str:
    """The results as a Markdown table."""
    out = [
        "| measurement | compared with | clstr | baseline | ratio | CPU ratio | target | |",
        "|---|---|--:|--:|--:|--:|--:|---|",
    ]
    for r in rows:
        out.append(
            f"| {r.what} | {r.baseline_what} | {_fmt(r.clstr, r.unit)} | "
            f"{_fmt(r.baseline, r.unit)} | **{_ratio_text(r.ratio)}** | {_cpu_text(r)} | "
            f"{r.target_text} | {_verdict(r.passed)} |"
        )
    return "\n".join(out)


MARKDOWN_TEMPLATE: Final = """# Benchmarks

Measured with `clstr bench`; see the sections below.
"""


def update_markdown(text: str, section: str, body: str) -> str:
    """Replace the text between the ``clstr-bench:<section>`` markers of ``text``.

    Markers that are missing are appended at the end, with ``body`` between them.
    """
    start = f"<!-- clstr-bench:{section}:start -->"
    end = f"<!-- clstr-bench:{section}:end -->"
    block = f"{start}\n{body.strip()}\n{end}"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.DOTALL)
    if pattern.search(text):
        return pattern.sub(lambda _m: block, text, count=1)
    return text.rstrip("\n") + "\n\n" + block + "\n"


def markdown_section(rows: Sequence[Row], meta: JSON) -> str:
    """The body of a ``--markdown`` section: how it was measured, then the table."""
    failing = [r.name for r in rows if r.passed is False]
    summary = "every target met" if not failing else f"targets missed: {', '.join(failing)}"
    return (
        f"Measured {meta['date']} on {meta['machine']['cpu']} "
        f"({meta['machine']['cpus']} CPUs), Python {meta['python']}, "
        f"event loop **{meta['loop']}**, nats-py {meta['nats_py']}, "
        f"nats-server {meta['nats_server']}; median of {meta['runs']} runs; {summary}.\n\n"
        f"```\n{meta['command']}\n```\n\n" + markdown_table(rows)
    )


def write_plot(rows: Sequence[Row], path: Path, title: str) -> None:
    """A PNG bar chart of the ratios, with each row's target marked (matplotlib, Agg).

    Raises :class:`BenchError` when matplotlib is not installed.
    """
    try:
        matplotlib = importlib.import_module("matplotlib")
    except ImportError as exc:
        raise BenchError("--plot needs matplotlib: pip install 'clstr[bench]'") from exc
    matplotlib.use("Agg")
    plt = importlib.import_module("matplotlib.pyplot")
    shown = list(reversed(rows))
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(shown) + 1.6))
    colours = {True: "#2e8b57", False: "#c0392b", None: "#8c8c8c"}
    ys = range(len(shown))
    ax.barh(ys, [r.ratio for r in shown], color=[colours[r.passed] for r in shown], height=0.6)
    for y, r in zip(ys, shown, strict=True):
        if r.target is not None:
            ax.plot([r.target, r.target], [y - 0.4, y + 0.4], color="black", linewidth=2)
        sign = ">=" if r.higher_is_better else "<="
        goal = f"  (target {sign} {r.target:g})" if r.target is not None else "  (report)"
        # Right of the bar and of its target tick, so that neither hides the text.
        ax.text(
            max(r.ratio, r.target or 0.0) + 0.02,
            y,
            f"{r.ratio:.2f}x{goal}",
            va="center",
            fontsize=8,
        )
    ax.axvline(1.0, color="#555555", linestyle="--", linewidth=0.8)
    ax.set_yticks(list(ys), [r.name for r in shown], fontsize=8)
    ax.set_xlabel("clstr / baseline (rates: higher is better; times, memory: lower is better)")
    ax.set_xlim(0, max(2.0, max(r.ratio for r in shown) * 1.35))
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _nats_server_version() -> str:
    try:
        from clstr.testing import find_nats_server

        out = subprocess.run(
            [find_nats_server(), "--version"], capture_output=True, text=True, timeout=10
        )
        return out.stdout.strip().split()[-1]
    except Exception:
        return "unknown"


def run_meta(args: argparse.Namespace, sizes: Sizes, runs: int) -> JSON:
    """How this run measured: when, on what, with which versions, sizes and options."""
    from importlib.metadata import PackageNotFoundError, version

    def pkg(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    loop = f"uvloop {pkg('uvloop')}" if args.uvloop else "asyncio"
    return {
        "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": {"cpu": _cpu_model(), "cpus": os.cpu_count(), "platform": platform.platform()},
        "python": platform.python_version(),
        "loop": loop,
        "nats_py": pkg("nats-py"),
        "nats_server": _nats_server_version(),
        "clstr": pkg("clstr"),
        "runs": runs,
        "quick": args.quick,
        "sizes": asdict(sizes),
        "command": "clstr bench " + " ".join(args.argv_echo),
    }
