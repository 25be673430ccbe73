"""What a benchmark group is, and what the orchestrator gives it to measure with.

A :class:`Group` is the unit ``--only`` names: the rows it reports (its
:class:`Spec` s) and how it measures them, one run at a time. It runs in a
:class:`Stage`: worker processes that the groups of the stage share, started
once per benchmark (the NATS workers, the in-process worker), or none at all
(:func:`own_processes`: the group starts its own, as node start-up does).
The orchestrator opens each stage once, then for every run calls ``measure``
of each of the stage's groups in turn, so that machine drift spreads over
all of them.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

from ._children import Child, ChildOptions
from ._protocol import JSON
from ._specs import BenchError, Sizes, Spec

#: A stage's shared worker processes, by label.
Workers = Mapping[str, Child]


# eq=False: a stage is one object, its groups run together (the runner keys by it).
@dataclass(frozen=True, slots=True, eq=False)
class Stage:
    """Worker processes shared by the groups measured in it.

    ``open(context, groups)`` starts them for the selected ``groups`` (and
    counts ``start_steps`` progress steps doing it) and stops them on exit.
    With ``needs_nats`` the stage runs while the nats-server is up
    (``Context.url``).
    """

    needs_nats: bool
    start_steps: int
    open: Callable[[Context, Sequence[Group]], contextlib.AbstractAsyncContextManager[Workers]]


@dataclass(frozen=True, slots=True, kw_only=True)
class Group:
    """A benchmark group: its rows, and how one run of it is measured.

    ``measure(context, workers, run_index)`` measures every row once (both
    sides) and adds the figures to ``context.out``, counting ``steps``
    progress steps. Raises :class:`ValueError` if a spec belongs to
    another group.
    """

    name: str
    specs: tuple[Spec, ...]
    steps: int
    stage: Stage
    measure: Callable[[Context, Workers, int], Awaitable[None]]

    def __post_init__(self) -> None:
        strays = [spec.name for spec in self.specs if spec.group != self.name]
        if strays:
            raise ValueError(f"group {self.name} holds specs of other groups: {strays}")


@contextlib.asynccontextmanager
async def _no_workers(_context: Context, _groups: Sequence[Group]) -> AsyncIterator[Workers]:
    yield {}


def own_processes(*, needs_nats: bool) -> Stage:
    """A stage that shares no process: its group starts and stops its own workers."""
    return Stage(needs_nats=needs_nats, start_steps=0, open=_no_workers)


class Progress:
    """A one-line progress bar on stderr (plain lines when stderr is not a terminal)."""

    def __init__(self, total: int, *, enabled: bool, stream: IO[str] | None = None) -> None:
        self.total = max(total, 1)
        self.done = 0
        self._stream = stream if stream is not None else sys.stderr
        self._enabled = enabled
        self._tty = self._stream.isatty()
        self._started = time.perf_counter()

    def begin(self, label: str) -> None:
        """Show what runs now."""
        if not self._enabled:
            return
        elapsed = time.perf_counter() - self._started
        if self._tty:
            width = 28
            filled = width * self.done // self.total
            bar = "#" * filled + "-" * (width - filled)
            line = f"\r[{bar}] {self.done:>3}/{self.total} {elapsed:5.0f}s  {label}"
            self._stream.write(line[:120].ljust(120))
        else:
            self._stream.write(f"[{self.done:>3}/{self.total}] {elapsed:5.1f}s {label}\n")
        self._stream.flush()

    def advance(self) -> None:
        """Count one step as done."""
        self.done += 1

    def close(self) -> None:
        """End the bar's line."""
        if self._enabled and self._tty:
            self._stream.write("\r" + " " * 120 + "\r")
            self._stream.flush()


@dataclass(slots=True)
class Collected:
    """What the runs measured, per row: (clstr, baseline) figures and details."""

    samples: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    extra: dict[str, JSON] = field(default_factory=dict)
    # Per row, per detail: its value in each run (reported as the median).
    run_extra: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    # Per row, per process: the per-run CPU microseconds per message of each side.
    cpu_samples: dict[str, dict[str, list[tuple[float, float]]]] = field(default_factory=dict)

    def add(self, name: str, clstr: float, baseline: float) -> None:
        """One run's figures of row ``name``."""
        self.samples.setdefault(name, []).append((clstr, baseline))

    def note(self, name: str, **details: Any) -> None:
        """Details of row ``name``, reported as given (a later note replaces one)."""
        self.extra.setdefault(name, {}).update(details)

    def note_run(self, name: str, **details: float) -> None:
        """One run's figures of details of row ``name``, reported as their medians."""
        per_detail = self.run_extra.setdefault(name, {})
        for key, value in details.items():
            per_detail.setdefault(key, []).append(value)

    def cpu(self, name: str, process: str, clstr: float, baseline: float) -> None:
        """One run's CPU microseconds per message of ``process`` on both sides."""
        self.cpu_samples.setdefault(name, {}).setdefault(process, []).append((clstr, baseline))

    def details(self, name: str) -> JSON:
        """Every detail of row ``name``: notes, medians of per-run notes, CPU notes."""
        medians = {
            key: float(statistics.median(values))
            for key, values in self.run_extra.get(name, {}).items()
        }
        return {**self.extra.get(name, {}), **medians, **self._cpu_notes(name)}

    def _cpu_notes(self, name: str) -> JSON:
        """Median CPU µs per message by process and side, and the CPU-cost ratio.

        ``cpu_ratio`` is the baseline's total CPU per message over clstr's: a
        throughput-like ratio (higher is better) that machine load moves little.
        """
        per_process = self.cpu_samples.get(name)
        if not per_process:
            return {}
        notes: JSON = {}
        totals = [0.0, 0.0]
        for process, pairs in per_process.items():
            for i, side in enumerate(("clstr", "baseline")):
                value = float(statistics.median(p[i] for p in pairs))
                notes[f"{side}_{process}_cpu_us"] = value
                totals[i] += value
        notes["cpu_ratio"] = totals[1] / totals[0] if totals[0] else math.inf
        return notes


@dataclass(frozen=True, slots=True)
class Context:
    """What a stage and its groups measure with, and where the figures go."""

    sizes: Sizes
    runs: int
    options: ChildOptions
    progress: Progress
    out: Collected
    #: The nats-server, for a stage that needs one.
    nats_url: str | None = None

    @property
    def url(self) -> str:
        """The nats-server's URL; :class:`BenchError` for a stage that did not ask for one."""
        if self.nats_url is None:
            raise BenchError("this stage has no nats-server: give it needs_nats=True")
        return self.nats_url

    def run_text(self, run_index: int) -> str:
        """``(run 2/3)``, for progress labels."""
        return f"(run {run_index + 1}/{self.runs})"


def side_order(run_index: int) -> tuple[str, str]:
    """Alternate which side goes first, so that neither always runs on a warmer machine."""
    return ("clstr", "raw") if run_index % 2 == 0 else ("raw", "clstr")
