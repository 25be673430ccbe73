"""The in-process stage: groups measured inside one worker process, with no
network (the memory transport, hashing, KeyHandler memory, ...).

An :class:`InProcessGroup` names an ``op``, a coroutine at the top of its
module that the worker runs on the group's commands, and a ``measure`` that
sends those commands for one run and records the answers. The groups share
one worker (``local``); a group with ``own_processes`` gets a worker per
side as well (``<own_processes>-clstr``, ``-raw``), so that the two sides'
profiles stay apart.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Final

from ._children import Child
from ._group import Context, Group, Stage, Workers
from ._protocol import JSON, Op, quiet_logs, ref, resolve, serve


async def worker(cfg: JSON) -> None:
    """The in-process worker: runs the ops that ``cfg["ops"]`` names, by group."""
    quiet_logs()
    await serve({name: resolve(reference) for name, reference in cfg["ops"].items()})


@contextlib.asynccontextmanager
async def _open(context: Context, groups: Sequence[Group]) -> AsyncIterator[Workers]:
    members = [group for group in groups if isinstance(group, InProcessGroup)]
    if len(members) != len(groups):
        raise TypeError("only an InProcessGroup can run in the in-process stage")
    cfg = {"ops": {group.name: ref(group.op) for group in members}}
    options = context.options
    workers = {"local": Child(worker, cfg, options, label="local")}
    for group in members:
        if group.own_processes:
            for side in ("clstr", "raw"):
                label = f"{group.own_processes}-{side}"
                workers[label] = Child(worker, cfg, options, label=label)
    async with contextlib.AsyncExitStack() as stack:
        for child in workers.values():
            stack.push_async_callback(child.close)
        context.progress.begin("starting the in-process workers")
        await asyncio.gather(*(child.start() for child in workers.values()))
        context.progress.advance()
        yield workers


#: The stage every :class:`InProcessGroup` runs in.
IN_PROCESS: Final = Stage(needs_nats=False, start_steps=1, open=_open)


@dataclass(frozen=True, slots=True, kw_only=True)
class InProcessGroup(Group):
    """A group measured in the in-process worker: ``op`` runs there.

    ``measure`` sends ``{"op": name, ...}`` commands to ``workers["local"]``
    (or, with ``own_processes``, to ``workers[f"{own_processes}-{side}"]``).
    """

    stage: Stage = IN_PROCESS
    op: Op
    own_processes: str | None = None
