"""KeyHandler memory (group ``keyhandler_memory``): the bytes a live key costs
in a :class:`~clstr.KeyHandler` against a plain dict of the same per-key
handlers, traced with tracemalloc.
"""

from __future__ import annotations

import gc
import tracemalloc
from collections.abc import Awaitable, Callable
from typing import Any, Final

from ._group import Context, Workers, side_order
from ._local import InProcessGroup
from ._protocol import JSON
from ._specs import Spec

_SPECS: Final = (
    Spec(
        "keyhandler_bytes_per_key",
        "keyhandler_memory",
        "KeyHandler memory per live key (100k keys, tracemalloc)",
        "a plain dict of the same per-key handlers",
        "B/key",
        False,
    ),
)


def _per_key_factory() -> Callable[[str], Callable[[Any], Awaitable[bytes | None]]]:
    """A factory of small stateful per-key handlers (a closure over a counter)."""

    def factory(key: str) -> Callable[[Any], Awaitable[bytes | None]]:
        state = [0]

        async def handle(env: Any) -> bytes | None:
            state[0] += 1
            return None

        return handle

    return factory


async def _keyhandler_bytes(n: int, side: str) -> float:
    """Traced bytes per live key: a KeyHandler with ``n`` keys, or a dict of the
    same handlers. Key strings are made before measuring (they are the caller's)."""
    from clstr import Envelope, KeyHandler

    keys = [f"key-{i:07d}" for i in range(n)]
    factory = _per_key_factory()
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        if side == "clstr":
            handler = KeyHandler(factory, max_keys=n, idle_timeout=None)
            for key in keys:
                await handler(Envelope(type="touch", key=key))
            assert len(handler) == n
            kept: object = handler
        else:
            plain = {}
            for key in keys:
                plain[key] = factory(key)
            kept = plain
        gc.collect()
        after = tracemalloc.get_traced_memory()[0]
        del kept
    finally:
        tracemalloc.stop()
    return (after - before) / n


async def op(cmd: JSON) -> JSON:
    """One side's bytes per live key (``side``: clstr or raw) with ``n`` keys."""
    return {"bytes_per_key": await _keyhandler_bytes(cmd["n"], cmd["side"])}


async def _measure(context: Context, workers: Workers, run_index: int) -> None:
    live_keys = context.sizes.live_keys
    per_key: dict[str, float] = {}
    for side in side_order(run_index):
        context.progress.begin(f"keyhandler_memory: {side} {context.run_text(run_index)}")
        command = {"op": "keyhandler_memory", "side": side, "n": live_keys}
        per_key[side] = (await workers["local"].call(command))["bytes_per_key"]
        context.progress.advance()
    context.out.add("keyhandler_bytes_per_key", per_key["clstr"], per_key["raw"])
    context.out.note("keyhandler_bytes_per_key", live_keys=live_keys)


GROUP: Final = InProcessGroup(
    name="keyhandler_memory",
    specs=_SPECS,
    steps=2,
    measure=_measure,
    op=op,
)
