"""Getting counter messages to their owners in batches: one message per owner.

A :class:`Courier` groups messages for many keys by the node that serves each
key's shard and sends each group as one batch (:func:`~clstr.client.send_batch`).
It learns who serves what from the answers themselves: every batch reply
names its node and the shards it serves. A shard nobody is known to serve
yet is probed on its own subject (NATS delivers to whoever serves it); items
refused ``not_owner`` (their shard moved) are sent again where they belong
now; those whose batch had no answer (the node died, the deadline passed)
keep their number, so that sending them again can never count them twice.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Final

from .._clock import monotonic
from ..client import BatchItem, Client, send_batch
from ..errors import (
    BadRequestError,
    ClstrError,
    NoShardOwnerError,
    RequestError,
    TransportClosedError,
)

__all__ = ["Courier", "Delivery"]

# Items per batch message at most (a node queues up to max_pending, 10,000 by
# default).
_MAX_ITEMS: Final = 4096


class Delivery:
    """One message on its way: its batch item, its shard, and what came of it:
    ``result`` (the reply's payload) once answered, else the last ``error``."""

    __slots__ = ("done", "error", "item", "result", "shard")

    def __init__(self, item: BatchItem, shard: int) -> None:
        self.item = item
        self.shard = shard
        self.result: bytes | None = None
        self.error: ClstrError | None = None
        self.done = False  # answered, or refused in a way another try cannot change


class Courier:
    """Sends :class:`Delivery` items in batches, one per owner (module docstring)."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.owners: dict[int, str] = {}  # shard -> node id, as last heard
        #: Batches sent and items in them, since this courier was made.
        self.messages = 0
        self.items = 0
        self._max_bytes = max(client.transport.max_payload // 2, 4096)

    async def deliver(
        self, deliveries: Iterable[Delivery], *, timeout: float, patient: bool = True
    ) -> None:
        """Send ``deliveries`` until each is done (answered, or refused for good)
        or ``timeout`` seconds have passed; what is not done then has its last
        error (retryable ones: the caller sends them again later).

        A shard nobody serves is tried again after a pause while time is left
        when ``patient`` (an operation waiting for its answer), and left for
        the next call otherwise (a flush: the next one comes soon, and this
        one's answered items should not wait for it).
        """
        deadline = monotonic() + timeout
        todo = [d for d in deliveries if not d.done]
        # Shards nobody served when last tried: not tried again before then.
        ownerless: dict[int, float] = {}
        pause = 0.01
        while todo:
            left = deadline - monotonic()
            if left <= 0.001:
                return
            plan = self._plan(todo, ownerless)
            if plan:
                sends = (self._send(s, group, left, ownerless, pause) for s, group in plan)
                await asyncio.gather(*sends)
            before = len(todo)
            todo = [d for d in todo if not d.done and (patient or d.shard not in ownerless)]
            if todo and (not plan or len(todo) == before):
                # Nothing moved (no owner, overloaded, a shard between owners): a pause.
                await asyncio.sleep(min(pause, max(deadline - monotonic(), 0)))
                pause = min(pause * 2, 0.2)

    def _plan(
        self, todo: list[Delivery], ownerless: dict[int, float]
    ) -> list[tuple[int, list[Delivery]]]:
        """Batches to send now: one per known owner (split when too large), and a
        probe of a shard whose owner is unknown."""
        by_owner: dict[str, list[Delivery]] = {}
        unknown: dict[int, list[Delivery]] = {}
        for d in todo:
            owner = self.owners.get(d.shard)
            if owner is None:
                unknown.setdefault(d.shard, []).append(d)
            else:
                by_owner.setdefault(owner, []).append(d)
        groups = list(by_owner.values())
        # One shard of unknown owner at a time: its answer names every shard of
        # its node, and the next round sends that node's items in one batch.
        now = monotonic()
        groups += [g for s, g in unknown.items() if ownerless.get(s, 0.0) <= now][:1]
        plan: list[tuple[int, list[Delivery]]] = []
        for group in groups:
            for part in self._split(group):
                plan.append((part[0].shard, part))
        return plan

    def _split(self, group: list[Delivery]) -> Iterable[list[Delivery]]:
        part: list[Delivery] = []
        size = 0
        for d in group:
            cost = len(d.item.key) + len(d.item.data) + len(d.item.type) + 16
            if part and (size + cost > self._max_bytes or len(part) >= _MAX_ITEMS):
                yield part
                part, size = [], 0
            part.append(d)
            size += cost
        if part:
            yield part

    async def _send(
        self,
        shard: int,
        group: list[Delivery],
        left: float,
        ownerless: dict[int, float],
        pause: float,
    ) -> None:
        self.messages += 1
        self.items += len(group)
        try:
            reply = await send_batch(self.client, shard, [d.item for d in group], timeout=left)
        except NoShardOwnerError as exc:
            # Nobody serves `shard` (NATS said so at once): nothing ran.
            ownerless[shard] = monotonic() + pause
            self._forget(d.shard for d in group)
            for d in group:
                d.error = exc
            return
        except (BadRequestError, TransportClosedError) as exc:
            for d in group:  # refused as a whole, or closed: another try cannot help
                d.error, d.done = exc, True
            return
        except RequestError as exc:
            # No answer (the node may have died with the batch): each item may or
            # may not have run. Ask anew who serves these shards.
            self._forget(d.shard for d in group)
            for d in group:
                d.error = exc
            return
        self._learn(reply.node_id, reply.shards)
        for d, result in zip(group, reply.results, strict=True):
            if isinstance(result, RequestError):
                d.error = result
                if isinstance(result, NoShardOwnerError):  # not_owner: it moved
                    if self.owners.get(d.shard) == reply.node_id:
                        del self.owners[d.shard]
                elif not result.retryable and result.code not in ("expired", "timeout"):
                    d.done = True
            else:
                d.result, d.error, d.done = result, None, True

    def _learn(self, node_id: str, shards: list[int]) -> None:
        owners = self.owners
        for shard in [s for s, n in owners.items() if n == node_id]:
            del owners[shard]
        for shard in shards:
            owners[shard] = node_id

    def _forget(self, shards: Iterable[int]) -> None:
        for shard in shards:
            self.owners.pop(shard, None)
