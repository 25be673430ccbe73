"""Compare clstr package trees with ``clstr bench``: did a patch help?

Each tree is a directory holding a ``clstr`` package (for example a copy of
the repository's ``clstr/`` with a patch applied). The script runs
``python -m clstr.bench`` against each tree in turn (``PYTHONPATH=TREE``,
from a neutral working directory), alternating trees round after round so
that machine noise hits both alike, and prints each tree's median ratio per
measurement::

    cp -r clstr /tmp/patched/ && (cd /tmp/patched && patch -p1 < fix.diff)
    python benchmarks/compare.py --tree base=. --tree fix=/tmp/patched \\
        --rounds 3 -- --only nats_rr,memory_rr

Arguments after ``--`` go to ``clstr bench`` (``--runs 1`` by default). With
``--metric cpu`` it compares the CPU-cost ratios (baseline CPU per message
over clstr's), which other processes loading the machine move much less.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def run_tree(tree: Path, bench_args: list[str], workdir: Path, metric: str) -> dict[str, float]:
    out = workdir / "result.json"
    env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONDONTWRITEBYTECODE": "1"}
    command = [sys.executable, "-m", "clstr.bench", "--no-progress", "--json", str(out)]
    subprocess.run(
        [*command, *bench_args], cwd=workdir, env=env, check=True, stdout=subprocess.DEVNULL
    )
    results = json.loads(out.read_text(encoding="utf-8"))["results"]
    if metric == "cpu":
        return {r["name"]: r["extra"]["cpu_ratio"] for r in results if "cpu_ratio" in r["extra"]}
    return {row["name"]: row["ratio"] for row in results}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", action="append", required=True, metavar="NAME=DIR")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--metric",
        choices=("ratio", "cpu"),
        default="ratio",
        help="ratio: the table's ratios; cpu: the CPU-cost ratios (steadier on a loaded host)",
    )
    parser.add_argument("bench_args", nargs="*", help="options for clstr bench (after --)")
    args = parser.parse_args()
    trees = {}
    for spec in args.tree:
        name, _, path = spec.partition("=")
        tree = Path(path).resolve()
        if not (tree / "clstr" / "__init__.py").is_file():
            parser.error(f"{tree} holds no clstr package")
        trees[name] = tree
    bench_args = args.bench_args or []
    if "--runs" not in bench_args:
        bench_args += ["--runs", "1"]
    ratios: dict[str, dict[str, list[float]]] = {name: {} for name in trees}
    with tempfile.TemporaryDirectory() as scratch:
        for round_index in range(args.rounds):
            order = list(trees) if round_index % 2 == 0 else list(reversed(trees))
            for name in order:
                print(f"round {round_index + 1}/{args.rounds}: {name}", file=sys.stderr)
                for row, ratio in run_tree(
                    trees[name], bench_args, Path(scratch), args.metric
                ).items():
                    ratios[name].setdefault(row, []).append(ratio)
    rows = sorted({row for per_tree in ratios.values() for row in per_tree})
    names = list(trees)
    print(f"{'measurement':28s}" + "".join(f"{n:>14s}" for n in names))
    for row in rows:
        cells = [
            statistics.median(ratios[n][row]) if row in ratios[n] else float("nan") for n in names
        ]
        print(f"{row:28s}" + "".join(f"{c:13.2f}x" for c in cells))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
