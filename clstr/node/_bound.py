"""Shard-bound tasks: work that runs on a node only while the node may serve a shard.

One mechanism for everything that must run on exactly one node at a time:
cluster singletons, the consumers of persisted messages (they move with their
shard), event-bus consumers. A binding names the shards it wants (or all); the
node runs one task per (binding, shard) while it serves the shard and is not
fenced, and stops it (a stop signal, then cancellation after a grace period)
before a shard is released, when the node is fenced (connection, heartbeat or
lease lost) and when it stops. A task that ends or fails while its shard is
still served is started again after a backoff.

Ordering is what makes the single-owner guarantee hold for these tasks as it
does for messages: a membership releases a shard's key only after
``Node.release`` returned, and ``release`` returns only after the shard's
tasks ended (or were cancelled past their grace); a fenced node stops its
tasks within its lease, before any other node may take its shards.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Final

import structlog

from .._tasks import cancel_and_wait
from ..errors import ConfigurationError
from ._state import NodeEvent, NodeEventKind

__all__ = ["BoundTasks", "ShardContext", "ShardTask"]

# After a task ended or failed while still wanted: first pause, and the cap.
_RESTART_FIRST: Final = 0.1
_RESTART_MAX: Final = 10.0


@dataclass(frozen=True, slots=True)
class ShardContext:
    """What a shard-bound task gets.

    ``stopping`` is set when the task must end (its shard moves, the node is
    fenced or stops); the task is cancelled ``grace`` seconds later if it has
    not returned by then. ``token`` is the fencing token of this ownership (the
    shard key's revision under :class:`~clstr.membership.KvMembership`, which
    grows with every new owner; 0 with static memberships): write it with any
    conditional write the task makes, and a stale owner's writes can be told
    apart from the current one's.
    """

    name: str
    shard: int
    node_id: str
    token: int
    stopping: asyncio.Event = field(compare=False)

    @property
    def stopped(self) -> bool:
        """Whether the task has been told to stop."""
        return self.stopping.is_set()


#: The shape of a shard-bound task.
ShardTask = Callable[[ShardContext], Awaitable[None]]


@dataclass(slots=True)
class _Binding:
    name: str
    shards: frozenset[int] | None  # None: every shard the node serves
    run: ShardTask
    grace: float

    def wants(self, shard: int) -> bool:
        return self.shards is None or shard in self.shards


@dataclass(slots=True)
class _Running:
    context: ShardContext
    task: asyncio.Task[None]
    grace: float


class BoundTasks:
    """The shard-bound tasks of one node (see the module docstring).

    The node tells it which shards may run (:meth:`shard_up`, :meth:`shard_down`,
    :meth:`pause` while fenced, :meth:`resume`); users add work with :meth:`bind`.
    """

    def __init__(self, node_id: str, emit: Callable[[NodeEvent], None]) -> None:
        self._node_id = node_id
        self._emit = emit
        self._log = structlog.get_logger("clstr.node").bind(node_id=node_id)
        self._bindings: dict[str, _Binding] = {}
        self._up: dict[int, int] = {}  # shards that may run tasks -> fencing token
        self._paused = False
        self._running: dict[tuple[str, int], _Running] = {}
        self._stops: set[asyncio.Task[None]] = set()  # stops scheduled from callbacks
        self._closed = False

    # -- what users bind --------------------------------------------------------

    def bind(
        self,
        name: str,
        run: ShardTask,
        *,
        shards: Iterable[int] | None = None,
        grace: float = 5.0,
    ) -> None:
        """Run ``run(ctx)`` for each of ``shards`` (``None``: every shard) while this
        node serves it. Raises :class:`ConfigurationError` for a name bound twice."""
        if name in self._bindings:
            raise ConfigurationError(f"a shard-bound task named {name!r} is already bound")
        if not grace >= 0:
            raise ConfigurationError(f"grace must be >= 0 seconds, got {grace!r}")
        binding = _Binding(name, None if shards is None else frozenset(shards), run, grace)
        self._bindings[name] = binding
        if not self._paused and not self._closed:
            for shard, token in self._up.items():
                if binding.wants(shard):
                    self._start(binding, shard, token)

    async def unbind(self, name: str) -> None:
        """Stop every task of binding ``name`` and forget it."""
        binding = self._bindings.pop(name, None)
        if binding is not None:
            await self._stop([key for key in self._running if key[0] == name])

    def running(self) -> list[ShardContext]:
        """The contexts of the tasks running now."""
        return [r.context for r in self._running.values()]

    # -- what the node tells ----------------------------------------------------

    def shard_up(self, shard: int, token: int) -> None:
        """The node serves ``shard`` now (under fencing ``token``)."""
        self._up[shard] = token
        if self._paused or self._closed:
            return
        for binding in self._bindings.values():
            if binding.wants(shard):
                self._start(binding, shard, token)

    async def shard_down(self, shard: int) -> None:
        """The node is about to give ``shard`` up: end its tasks first."""
        self._up.pop(shard, None)
        await self._stop([key for key in self._running if key[1] == shard])

    def pause(self) -> None:
        """The node may not act on its shards (fenced): stop every task now (from
        synchronous code; the stops run as tasks this object owns)."""
        if self._paused:
            return
        self._paused = True
        keys = list(self._running)
        for key in keys:
            self._running[key].context.stopping.set()
        if keys:
            stop = asyncio.get_running_loop().create_task(self._stop(keys))
            self._stops.add(stop)
            stop.add_done_callback(self._stops.discard)

    def resume(self) -> None:
        """The node may act again: start the tasks of the shards it serves."""
        if not self._paused:
            return
        self._paused = False
        if self._closed:
            return
        for shard, token in self._up.items():
            for binding in self._bindings.values():
                if binding.wants(shard) and (binding.name, shard) not in self._running:
                    self._start(binding, shard, token)

    async def close(self) -> None:
        """Stop every task (the node stops)."""
        self._closed = True
        self._up.clear()
        await self._stop(list(self._running))
        await cancel_and_wait(list(self._stops), insist=True)

    # -- internals --------------------------------------------------------------

    def _start(self, binding: _Binding, shard: int, token: int) -> None:
        key = (binding.name, shard)
        if key in self._running:
            return
        context = ShardContext(binding.name, shard, self._node_id, token, asyncio.Event())
        task = asyncio.get_running_loop().create_task(
            self._supervise(binding, context), name=f"clstr-bound-{binding.name}-{shard}"
        )
        self._running[key] = _Running(context, task, binding.grace)
        self._emit(NodeEvent(NodeEventKind.TASK_STARTED, shard, binding.name))

    async def _supervise(self, binding: _Binding, context: ShardContext) -> None:
        """Run the task; start it again (after a growing pause) when it ends or fails
        while still wanted; return once it is told to stop."""
        pause = _RESTART_FIRST
        while not context.stopping.is_set():
            try:
                await binding.run(context)
            except Exception:
                self._log.exception(
                    "shard-bound task failed", task=binding.name, shard=context.shard
                )
            if context.stopping.is_set():
                return
            self._log.info(
                "shard-bound task ended; starting it again",
                task=binding.name,
                shard=context.shard,
                after=pause,
            )
            try:
                async with asyncio.timeout(pause):
                    await context.stopping.wait()
            except TimeoutError:
                pause = min(pause * 2, _RESTART_MAX)

    async def _stop(self, keys: list[tuple[str, int]]) -> None:
        """Signal the tasks of ``keys``, wait their grace, cancel what is left."""
        running = [(key, self._running[key]) for key in keys if key in self._running]
        for _, run in running:
            run.context.stopping.set()
        if not running:
            return
        grace = max(r.grace for _, r in running)
        tasks = [r.task for _, r in running]
        _, pending = await asyncio.wait(tasks, timeout=grace) if grace > 0 else (set(), set(tasks))
        if pending:
            self._log.warning(
                "shard-bound tasks past their grace: cancelling",
                tasks=sorted(t.get_name() for t in pending),
            )
            stuck = await cancel_and_wait(pending, 1.0)
            if stuck:
                self._log.error(
                    "shard-bound tasks ignore cancellation; left running",
                    tasks=sorted(t.get_name() for t in stuck),
                )
        for key, run in running:
            if self._running.get(key) is run:
                del self._running[key]
                self._emit(NodeEvent(NodeEventKind.TASK_STOPPED, key[1], key[0]))
                # Resumed while it was stopping: it is wanted again.
                binding, token = self._bindings.get(key[0]), self._up.get(key[1])
                idle = self._paused or self._closed
                if binding is not None and token is not None and not idle:
                    self._start(binding, key[1], token)
