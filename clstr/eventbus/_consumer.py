"""Distributed consumption: clstr nodes share a bus's shards, one node per shard.

Placement is clstr's own: bus shard ``i`` of bus ``b`` belongs to the cluster
shard ``shard_for_key(f"{b}/{i}", num_shards, seed)`` (:func:`cluster_shard_of`),
and a :class:`BusConsumer` binds one shard-bound task per cluster shard
(:meth:`clstr.Node.bind`). The node runs it only while it serves that cluster
shard and is not fenced, and stops it before the shard moves, so each bus
shard is consumed by exactly one node at a time, under the node's ownership,
lease and fencing (KvMembership over NATS, or static shards on any transport).

The task consumes the bus shards mapped to its cluster shard (found in the
log, again every ``refresh_interval``, so that added shards are picked up):
per bus shard it reads from the checkpoint, hands batches to the handler in
order, and checkpoints every ``checkpoint_interval`` and when told to stop
(:mod:`clstr.eventbus._checkpoints`: compare-and-set, fenced by the ownership
token). Delivery is at least once: a node that dies without its final
checkpoint leaves the events handled since its last one to be handled again
by the next owner; their number is bounded by what a node handles in one
``checkpoint_interval`` (plus the batch in its handler). A graceful move
redelivers nothing. A handler that raises gets the same batch again after a
backoff (the position does not move past events that were not handled).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Final

import structlog

from .._tasks import cancel_and_wait
from ..errors import ConfigurationError
from ..hashing import shard_for_key
from ..node import Node, ShardContext
from ._checkpoints import CheckpointConflictError, CheckpointStore, KvCheckpoints
from ._config import check_bus_name
from ._errors import ConsumeError
from ._event import Position, StoredEvent
from ._jetstream import JetStreamLog
from ._log import EventLog, ShardStream
from ._query import START, EventFilter

__all__ = ["BusConsumer", "ConsumerSettings", "ConsumerStats", "EventHandler", "cluster_shard_of"]

_log = structlog.get_logger("clstr.eventbus.consumer")

#: What a consumer runs: a batch of one bus shard's events, in order.
EventHandler = Callable[[Sequence[StoredEvent]], Awaitable[None]]

_HANDLER_BACKOFF_MAX: Final = 5.0


def cluster_shard_of(bus: str, bus_shard: int, num_shards: int, seed: str = "") -> int:
    """The cluster shard whose owner consumes ``bus_shard`` of ``bus``."""
    return shard_for_key(f"{bus}/{bus_shard}", num_shards, seed)


@dataclass(frozen=True, slots=True, kw_only=True)
class ConsumerSettings:
    """How a :class:`BusConsumer` works (seconds; see the module docstring).

    ``batch``: events per handler call at most. ``idle_wait``: the first and
    the longest pause between reads of a shard that had nothing new.
    ``grace``: how long a stopping task may take to checkpoint before it is
    cancelled. ``filter``: events the handler is given (others are skipped).
    """

    checkpoint_interval: float = 1.0
    batch: int = 1024
    refresh_interval: float = 2.0
    idle_wait: tuple[float, float] = (0.01, 0.25)
    grace: float = 5.0
    filter: EventFilter | None = None

    def __post_init__(self) -> None:
        if not self.checkpoint_interval > 0 or not self.refresh_interval > 0:
            raise ConfigurationError("checkpoint_interval and refresh_interval must be > 0")
        if not 1 <= self.batch <= 65_536:
            raise ConfigurationError(f"batch must be in 1..65536, got {self.batch}")
        if not 0 < self.idle_wait[0] <= self.idle_wait[1]:
            raise ConfigurationError(
                f"idle_wait must be (first, longest) > 0, got {self.idle_wait}"
            )


@dataclass(slots=True)
class ConsumerStats:
    """What a consumer did on this node."""

    handled: int = 0
    batches: int = 0
    handler_failures: int = 0
    checkpoints: int = 0
    conflicts: int = 0
    stale: int = 0
    read_errors: int = 0
    positions: dict[int, Position] = field(default_factory=dict)


class BusConsumer:
    """Consumes bus ``bus`` on ``node`` (see the module docstring): :meth:`bind` before
    or after the node starts.

    ``log`` and ``checkpoints`` default to the bus's JetStream stream and the
    KV checkpoints under the node's prefix (the node must then use a
    :class:`~clstr.transports.nats.NatsTransport`); pass a
    :class:`~clstr.eventbus.MemoryLog` and
    :class:`~clstr.eventbus.MemoryCheckpoints` on the memory transport.
    """

    def __init__(
        self,
        node: Node,
        bus: str,
        handler: EventHandler,
        *,
        log: EventLog | None = None,
        checkpoints: CheckpointStore | None = None,
        settings: ConsumerSettings | None = None,
    ) -> None:
        self.node = node
        self.bus = check_bus_name(bus)
        self.handler = handler
        self.settings = settings or ConsumerSettings()
        self.stats = ConsumerStats()
        self._log = log
        self._checkpoints = checkpoints
        self._opening = asyncio.Lock()

    @property
    def binding(self) -> str:
        """The name of the node binding."""
        return f"eventbus:{self.bus}"

    def bind(self) -> None:
        """Run on ``node``: one shard-bound task per cluster shard it serves."""
        self.node.bind(self.binding, self._run, grace=self.settings.grace)

    async def unbind(self) -> None:
        """Stop consuming on this node (each shard checkpoints first)."""
        await self.node.unbind(self.binding)

    def owns(self, bus_shard: int, cluster_shard: int) -> bool:
        """Whether ``bus_shard`` is consumed by the owner of ``cluster_shard``."""
        node = self.node
        return cluster_shard_of(self.bus, bus_shard, node.num_shards, node.seed) == cluster_shard

    async def _stores(self) -> tuple[EventLog, CheckpointStore]:
        async with self._opening:
            if self._log is None or self._checkpoints is None:
                from ..transports.nats import NatsTransport

                transport = self.node.transport
                if not isinstance(transport, NatsTransport):
                    raise ConfigurationError(
                        "BusConsumer reads JetStream by default: give the node a NatsTransport, "
                        "or pass log= and checkpoints= (MemoryLog, MemoryCheckpoints)"
                    )
                if self._log is None:
                    self._log = JetStreamLog(transport, bus=self.bus, prefix=self.node.prefix)
                if self._checkpoints is None:
                    self._checkpoints = await KvCheckpoints.open(transport, prefix=self.node.prefix)
            return self._log, self._checkpoints

    # -- one cluster shard --------------------------------------------------------

    async def _run(self, ctx: ShardContext) -> None:
        log, store = await self._stores()
        stop = asyncio.Event()
        loops: dict[int, asyncio.Task[None]] = {}
        try:
            while not ctx.stopped:
                try:
                    shards = await log.shards()
                except ConsumeError as exc:
                    self.stats.read_errors += 1
                    _log.warning("cannot list bus shards", bus=self.bus, error=str(exc))
                    shards = []
                for shard, task in list(loops.items()):
                    if task.done():  # it gave up (a store error): start it again
                        del loops[shard]
                        if not task.cancelled() and task.exception() is not None:
                            _log.warning(
                                "consumer of a bus shard failed",
                                bus=self.bus,
                                shard=shard,
                                error=repr(task.exception()),
                            )
                for shard in shards:
                    if shard not in loops and self.owns(shard, ctx.shard):
                        loops[shard] = asyncio.get_running_loop().create_task(
                            self._consume(ctx, shard, log, store, stop),
                            name=f"clstr-consume-{self.bus}-{shard}",
                        )
                try:
                    async with asyncio.timeout(self.settings.refresh_interval):
                        await ctx.stopping.wait()
                except TimeoutError:
                    pass
        finally:
            stop.set()
            tasks = list(loops.values())
            try:
                if tasks:
                    await asyncio.wait(tasks)
            finally:
                await cancel_and_wait(tasks, insist=True)
            for shard, task in loops.items():
                if not task.cancelled() and task.exception() is not None:
                    _log.warning(
                        "consumer of a bus shard failed",
                        bus=self.bus,
                        shard=shard,
                        error=repr(task.exception()),
                    )

    async def _consume(
        self,
        ctx: ShardContext,
        shard: int,
        log: EventLog,
        store: CheckpointStore,
        stop: asyncio.Event,
    ) -> None:
        settings = self.settings
        try:
            checkpoint = await store.load(self.bus, shard)
        except ConsumeError as exc:
            _log.warning("cannot load a checkpoint", bus=self.bus, shard=shard, error=str(exc))
            return  # picked up again at the next refresh
        if checkpoint is not None and checkpoint.token > ctx.token:
            self.stats.stale += 1
            _log.warning(
                "a newer owner checkpointed this shard: not consuming",
                bus=self.bus,
                shard=shard,
                token=ctx.token,
                newer=checkpoint.token,
            )
            return
        revision = checkpoint.revision if checkpoint else 0
        position = saved = checkpoint.position if checkpoint else START
        stream = ShardStream(log, shard, position)
        keep = settings.filter
        last_save = time.monotonic()
        idle = settings.idle_wait[0]
        frames = 1
        try:
            while not stop.is_set():
                if not stream:
                    try:
                        await stream.fill(frames)
                        frames = min(frames * 2, 64)
                    except ConsumeError as exc:
                        self.stats.read_errors += 1
                        _log.warning("cannot read", bus=self.bus, shard=shard, error=str(exc))
                        stream = ShardStream(log, shard, position)
                events = stream.take(settings.batch)
                if events:
                    kept = events if keep is None else [e for e in events if keep.matches(e)]
                    if kept and not await self._handle(kept, stop):
                        break  # stopped before this batch was handled: not checkpointed
                    position = stream.position
                    self.stats.positions[shard] = position
                    idle = settings.idle_wait[0]
                else:
                    frames = 1
                    await _pause(stop, idle)
                    idle = min(idle * 2, settings.idle_wait[1])
                now = time.monotonic()
                if position != saved and now - last_save >= settings.checkpoint_interval:
                    last_save = now
                    try:
                        revision = await self._save(ctx, store, shard, position, revision)
                        saved = position
                    except _Stale:
                        return
                    except ConsumeError as exc:  # the store failed: try at the next interval
                        _log.warning("cannot checkpoint", bus=self.bus, shard=shard, error=str(exc))
            if position != saved:
                await self._save(ctx, store, shard, position, revision)
        except _Stale:
            return
        except ConsumeError as exc:
            # The next owner starts from the last checkpoint that was written.
            _log.warning(
                "cannot write the final checkpoint", bus=self.bus, shard=shard, error=str(exc)
            )

    async def _handle(self, events: list[StoredEvent], stop: asyncio.Event) -> bool:
        """Run the handler until it succeeds (True) or the consumer stops (False)."""
        pause = 0.05
        while True:
            try:
                await self.handler(events)
            except Exception:
                self.stats.handler_failures += 1
                _log.exception(
                    "event handler failed: retrying the batch",
                    bus=self.bus,
                    shard=events[0].shard,
                    first=events[0].position,
                )
                if await _pause(stop, pause):
                    return False
                pause = min(pause * 2, _HANDLER_BACKOFF_MAX)
                continue
            self.stats.handled += len(events)
            self.stats.batches += 1
            return True

    async def _save(
        self,
        ctx: ShardContext,
        store: CheckpointStore,
        shard: int,
        position: Position,
        revision: int,
    ) -> int:
        """Checkpoint ``position`` over ``revision``; on a conflict, re-read and retry
        unless a newer owner wrote it (then :class:`_Stale`)."""
        while True:
            try:
                revision = await store.save(
                    self.bus, shard, position, token=ctx.token, node=ctx.node_id, revision=revision
                )
                self.stats.checkpoints += 1
                return revision
            except CheckpointConflictError:
                self.stats.conflicts += 1
                current = await store.load(self.bus, shard)
                if current is not None and current.token > ctx.token:
                    self.stats.stale += 1
                    _log.warning(
                        "a newer owner checkpointed this shard: stopping",
                        bus=self.bus,
                        shard=shard,
                        token=ctx.token,
                    )
                    raise _Stale from None
                revision = current.revision if current else 0


class _Stale(Exception):
    """A newer owner took this bus shard over."""


async def _pause(stop: asyncio.Event, seconds: float) -> bool:
    """Sleep ``seconds`` unless ``stop`` is set first; return whether it was."""
    try:
        async with asyncio.timeout(seconds):
            await stop.wait()
    except TimeoutError:
        return False
    return True
