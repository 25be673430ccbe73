"""The orchestrator: runs the selected groups, stage by stage, and collects
their figures. It runs no measured code itself.

The stages that need NATS run first, on one nats-server with JetStream
(started here unless given: a server given with ``--nats-url`` needs JetStream
for the groups that store in it) that is stopped before the others run; each
stage opens its shared workers once, then measures its groups run after run.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator, Sequence

from ._children import ChildOptions
from ._group import Collected, Context, Group, Progress, Stage
from ._specs import Sizes


def _stages(groups: Sequence[Group]) -> list[tuple[Stage, list[Group]]]:
    """The stages of ``groups`` with their members, in order, those that need NATS first."""
    members: dict[Stage, list[Group]] = {}
    for group in groups:
        members.setdefault(group.stage, []).append(group)
    stages = list(members.items())
    return [s for s in stages if s[0].needs_nats] + [s for s in stages if not s[0].needs_nats]


def steps(groups: Sequence[Group], runs: int) -> int:
    """How many progress steps measuring ``groups`` ``runs`` times takes."""
    per_run = sum(group.steps for group in groups)
    return runs * per_run + sum(stage.start_steps for stage, _ in _stages(groups))


@contextlib.asynccontextmanager
async def _nats_server(url: str | None) -> AsyncIterator[str]:
    if url is not None:
        yield url
        return
    from clstr.testing import NatsServer

    async with NatsServer(jetstream=True) as server:
        yield server.url


async def _run_stage(context: Context, stage: Stage, groups: Sequence[Group]) -> None:
    async with stage.open(context, groups) as workers:
        for run_index in range(context.runs):
            for group in groups:
                await group.measure(context, workers, run_index)


async def measure(
    groups: Sequence[Group],
    *,
    sizes: Sizes,
    runs: int,
    options: ChildOptions,
    nats_url: str | None,
    progress: bool,
) -> Collected:
    """Measure ``groups``, ``runs`` times each; return what they collected.

    ``nats_url`` names a nats-server to use instead of starting one; with
    ``progress``, a progress bar shows on stderr.
    """
    context = Context(
        sizes=sizes,
        runs=runs,
        options=options,
        progress=Progress(steps(groups, runs), enabled=progress),
        out=Collected(),
    )
    stages = _stages(groups)
    with_nats = [(stage, members) for stage, members in stages if stage.needs_nats]
    try:
        if with_nats:
            async with _nats_server(nats_url) as url:
                on_nats = dataclasses.replace(context, nats_url=url)
                for stage, members in with_nats:
                    await _run_stage(on_nats, stage, members)
        for stage, members in stages:
            if not stage.needs_nats:
                await _run_stage(context, stage, members)
    finally:
        context.progress.close()
    return context.out
