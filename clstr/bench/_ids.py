"""Snowflake ids (group ``snowflake``): ``Snowflake.next_id()`` ids per second
against ``uuid.uuid4()`` (what people reach for instead: 16 random bytes from
the OS, not ordered) and against ``time.time_ns()`` (the floor: every id reads
the wall clock once).

Measured in the in-process worker: the rows are interleaved round after
round and the best round of each kept, so that the ratios compare them under
the same machine load (the loop's own cost is in every row).
``benchmarks/bench_ids.py`` prints the same figures, with the cost of
``parse_snowflake``.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Final

from ._group import Context, Workers
from ._local import InProcessGroup
from ._protocol import JSON
from ._specs import Spec

_WHAT: Final = "Snowflake.next_id() rate (StaticMachineId, one process)"
_SPECS: Final = (
    Spec(
        "snowflake_vs_uuid4",
        "snowflake",
        _WHAT,
        "uuid.uuid4() rate",
        "ids/s",
        True,
        3.0,
    ),
    Spec(
        "snowflake_vs_time_ns",
        "snowflake",
        _WHAT,
        "time.time_ns() rate (the one clock read each id needs)",
        "ids/s",
        True,
    ),
)


def _per_call(fn: Callable[[], object], n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n


def measure_ids(n: int, rounds: int) -> dict[str, float]:
    """Seconds per call of ``next_id``, ``uuid4``, ``time_ns`` and ``parse_snowflake``
    over ``n`` calls, best of ``rounds`` interleaved rounds; and ``lead``, the
    seconds of borrowed milliseconds the generator ended with (more than 4096
    ids in a millisecond)."""
    from clstr.ids import Snowflake, StaticMachineId, parse_snowflake

    snowflake = Snowflake(StaticMachineId(1))
    some_id = snowflake.next_id()
    rows: dict[str, Callable[[], object]] = {
        "next_id": snowflake.next_id,
        "uuid4": uuid.uuid4,
        "time_ns": time.time_ns,
        "parse_snowflake": lambda: parse_snowflake(some_id),
    }
    best = dict.fromkeys(rows, float("inf"))
    for _ in range(rounds):
        for name, fn in rows.items():
            best[name] = min(best[name], _per_call(fn, n))
    return {**best, "lead": snowflake.lead()}


async def op(cmd: JSON) -> JSON:
    """:func:`measure_ids` in the worker."""
    return measure_ids(cmd["n"], cmd["repeat"])


async def _measure(context: Context, workers: Workers, run_index: int) -> None:
    sizes = context.sizes
    context.progress.begin(f"snowflake {context.run_text(run_index)}")
    t = await workers["local"].call(
        {"op": "snowflake", "n": sizes.id_calls, "repeat": sizes.id_repeat}
    )
    context.progress.advance()
    out = context.out
    out.add("snowflake_vs_uuid4", 1 / t["next_id"], 1 / t["uuid4"])
    out.add("snowflake_vs_time_ns", 1 / t["next_id"], 1 / t["time_ns"])
    out.note_run("snowflake_vs_uuid4", parse_snowflake_per_s=1 / t["parse_snowflake"])


GROUP: Final = InProcessGroup(name="snowflake", specs=_SPECS, steps=1, measure=_measure, op=op)
