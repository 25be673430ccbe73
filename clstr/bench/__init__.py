"""Benchmarks: clstr against raw nats-py and bare asyncio, in the same run (``clstr bench``)."""

from __future__ import annotations

from ._bench import (
    GROUPS,
    SPECS,
    add_arguments,
    best_time,
    main,
    measure_hrw,
    measure_shard_for_key,
    run,
    summarise_profile,
    update_markdown,
)

__all__ = [
    "add_arguments",
    "run",
    "main",
    "GROUPS",
    "SPECS",
    "best_time",
    "measure_shard_for_key",
    "measure_hrw",
    "summarise_profile",
    "update_markdown",
]
