"""The scale benchmark in CI size: nodes join, leave and die on a 3-server NATS
cluster (JetStream R3), and placement moves only what HRW says it must."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_changes_move_only_what_hrw_moves(tmp_path: Path) -> None:
    """6 nodes x 64 shards: every change converges, moves exactly the shards HRW
    moves, costs KV writes in proportion to them (not to the nodes), and a client
    with retries sees no error."""
    out = tmp_path / "scale.json"
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "scale.py"),
            *("--nodes", "6", "--shards", "64", "--per-process", "3", "--ttl", "2"),
            *("--timeout", "40", "--json", str(out)),
        ],
        capture_output=True,
        text=True,
        timeout=55,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(out.read_text())
    assert report["cold_start_seconds"] > 0
    assert 0 < report["heartbeat_writes_per_node_per_s"] < 5
    changes = {c["name"].split(" (")[0]: c for c in report["changes"]}
    assert set(changes) == {"join", "graceful leave", "SIGKILL"}
    for change in changes.values():
        assert change["moved"] == change["ideal"], change
        assert change["errors"] == 0, change
    # A graceful move is a delete and a create per shard; a crashed holder's
    # keys are each taken over by one update.
    assert changes["join"]["kv_ops"] == 2 * changes["join"]["moved"]
    assert changes["SIGKILL"]["kv_ops"] == changes["SIGKILL"]["moved"]
