"""The in-process stages: groups measured inside one worker process, with no
network (the memory transport, hashing, KeyHandler memory, ...: ``IN_PROCESS``)
or with the nats-server as the only other party (persisted messages, the event
bus into JetStream, interrupts: ``NEAR_NATS``).

An :class:`InProcessGroup` names an ``op``, a coroutine at the top of its
module that the worker runs on the group's commands, and a ``measure`` that
sends those commands for one run and records the answers. The groups of a
stage share one worker (``local``, ``local-nats``); a group with
``own_processes`` gets a worker per side as well (``<own_processes>-clstr``,
``-raw``), so that the two sides' profiles stay apart.
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


def _stage(*, needs_nats: bool, label: str) -> Stage:
    """An in-process stage whose shared worker is ``workers["local"]``, labelled ``label``."""

    @contextlib.asynccontextmanager
    async def open_stage(context: Context, groups: Sequence[Group]) -> AsyncIterator[Workers]:
        members = [group for group in groups if isinstance(group, InProcessGroup)]
        if len(members) != len(groups):
            raise TypeError("only an InProcessGroup can run in an in-process stage")
        cfg = {"ops": {group.name: ref(group.op) for group in members}}
        options = context.options
        workers = {"local": Child(worker, cfg, options, label=label)}
        for group in members:
            if group.own_processes:
                for side in ("clstr", "raw"):
                    own = f"{group.own_processes}-{side}"
                    workers[own] = Child(worker, cfg, options, label=own)
        async with contextlib.AsyncExitStack() as stack:
            for child in workers.values():
                stack.push_async_callback(child.close)
            context.progress.begin(f"starting the in-process workers ({label})")
            await asyncio.gather(*(child.start() for child in workers.values()))
            context.progress.advance()
            yield workers

    return Stage(needs_nats=needs_nats, start_steps=1, open=open_stage)


#: The stage every :class:`InProcessGroup` runs in unless it names another.
IN_PROCESS: Final = _stage(needs_nats=False, label="local")
#: The in-process stage of groups that talk to the nats-server (JetStream on):
#: their ``measure`` puts ``context.url`` in the commands it sends.
NEAR_NATS: Final = _stage(needs_nats=True, label="local-nats")


@dataclass(frozen=True, slots=True, kw_only=True)
class InProcessGroup(Group):
    """A group measured in the in-process worker: ``op`` runs there.

    ``measure`` sends ``{"op": name, ...}`` commands to ``workers["local"]``
    (or, with ``own_processes``, to ``workers[f"{own_processes}-{side}"]``).
    """

    stage: Stage = IN_PROCESS
    op: Op
    own_processes: str | None = None
