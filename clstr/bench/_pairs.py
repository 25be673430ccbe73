"""Stages of a node process and a client process per side, over NATS.

A comparison over the network is fair only with the same process layout on
both sides: *1 client process + 1 node process* each (``_nats``,
``_entity_call``, ``_streams``). :func:`pair_stage` starts one worker per
role for a stage; :func:`both_sides` has each side's client run one command,
alternating which side goes first, and adds its node's CPU time per message.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any

from ._children import Child
from ._group import Context, Group, Stage, Workers, side_order
from ._protocol import JSON, Role

#: The two sides' worker prefixes when they are clstr and raw nats-py.
CLSTR_AND_RAW: Mapping[str, str] = {"clstr": "clstr", "raw": "raw"}


def pair_stage(roles: Mapping[str, Role], config: Callable[[Context], JSON], *, what: str) -> Stage:
    """A stage that needs NATS and starts one worker per ``roles`` entry (label ->
    role), each with ``config(context)``; ``what`` names them in the progress line.
    Labels are ``<side prefix>-node`` and ``<side prefix>-client`` for :func:`both_sides`.
    """

    @contextlib.asynccontextmanager
    async def open_stage(context: Context, _groups: Sequence[Group]) -> AsyncIterator[Workers]:
        cfg = config(context)
        workers = {
            label: Child(role, cfg, context.options, label=label) for label, role in roles.items()
        }
        async with contextlib.AsyncExitStack() as stack:
            for child in workers.values():
                stack.push_async_callback(child.close)
            context.progress.begin(f"starting {what}")
            await asyncio.gather(*(child.start() for child in workers.values()))
            context.progress.advance()
            yield workers

    return Stage(needs_nats=True, start_steps=1, open=open_stage)


async def both_sides(
    context: Context,
    workers: Workers,
    run_index: int,
    op: str,
    command: JSON,
    prefixes: Mapping[str, str] = CLSTR_AND_RAW,
) -> dict[str, JSON]:
    """Each side's client answer to ``command`` (``{"op": op, **command}``), keyed
    ``clstr`` and ``raw``, with its node's CPU µs per handled message added as
    ``node_cpu_us``. ``prefixes`` maps the two sides to their workers' labels.

    The node's figure counts ``command["n"]`` plus ``command["warmup"]``
    messages (its CPU covers the warm-up too), unless the client's answer says
    how many it handled (``handled``).
    """
    answers: dict[str, JSON] = {}
    for side in side_order(run_index):
        prefix = prefixes[side]
        context.progress.begin(f"{op}: {prefix} {context.run_text(run_index)}")
        node, client = workers[f"{prefix}-node"], workers[f"{prefix}-client"]
        before = (await node.call({"op": "cpu"}))["cpu"]
        answer = await client.call({"op": op, **command})
        node_cpu = (await node.call({"op": "cpu"}))["cpu"] - before
        handled = answer.get("handled", command["n"] + command.get("warmup", 0))
        answer["node_cpu_us"] = node_cpu / handled * 1e6
        answers[side] = answer
        context.progress.advance()
    return answers


def add_throughput(context: Context, row: str, answers: Mapping[str, JSON]) -> None:
    """Row ``row``'s rates from :func:`both_sides`, and both processes' CPU per message."""
    clstr, raw = answers["clstr"], answers["raw"]
    context.out.add(row, clstr["rate"], raw["rate"])
    context.out.cpu(row, "client", clstr["cpu_us"], raw["cpu_us"])
    context.out.cpu(row, "node", clstr["node_cpu_us"], raw["node_cpu_us"])


async def drop_streams(nc: Any, prefix: str) -> None:
    """Delete the JetStream streams and KV buckets named ``<prefix>_...`` (what a
    worker made under its run's own prefix), so that a server given with
    ``--nats-url`` keeps nothing of the run. Best effort: a failure is ignored."""
    js = nc.jetstream()
    # Cleanup after the figures are in: it never fails a run.
    with contextlib.suppress(Exception):
        names = [info.config.name for info in await js.streams_info()]
        for name in names:
            if name.startswith((f"{prefix}_", f"KV_{prefix}_")):
                await js.delete_stream(name)
