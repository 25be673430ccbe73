"""Snowflake ids per second, against ``uuid.uuid4()`` and ``time.time_ns()`` in one run.

``time.time_ns()`` is the floor: every ``next_id()`` reads the wall clock once.
``uuid.uuid4()`` is what people reach for instead (16 random bytes from the
OS, not ordered). Rounds are interleaved and the best of each is kept, so the
ratios compare the three under the same machine load. Also: the cost of
``parse_snowflake``. Run from anywhere: ``python benchmarks/bench_ids.py``
(``--ids N --rounds R`` to change the sizes). The measurement is ``clstr
bench``'s group ``snowflake`` (``clstr/bench/_ids.py``), run here in this
process.
"""

from __future__ import annotations

import argparse

from clstr.bench._ids import measure_ids

_LABELS = {
    "next_id": "Snowflake.next_id()",
    "uuid4": "uuid.uuid4()",
    "time_ns": "time.time_ns()",
    "parse_snowflake": "parse_snowflake(id)",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ids", type=int, default=1_000_000, help="calls per round")
    parser.add_argument("--rounds", type=int, default=7, help="rounds (best kept)")
    args = parser.parse_args()

    best = measure_ids(args.ids, args.rounds)
    ours = best["next_id"]
    print(f"{args.ids:,} calls per round, best of {args.rounds} rounds (interleaved)")
    for name, label in _LABELS.items():
        seconds = best[name]
        print(
            f"{label:22s} {seconds * 1e9:6.0f} ns  {1 / seconds / 1e6:6.2f} M/s  "
            f"time per call vs next_id: {seconds / ours:5.2f}x"
        )
    # Borrowed milliseconds: more than 4096 ids in a millisecond (0 when the
    # loop is slower than 4.1 M ids/s).
    print(f"lead after the run: {best['lead'] * 1000:.0f} ms")


if __name__ == "__main__":
    main()
