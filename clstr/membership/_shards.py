"""The shards bucket: who holds each shard's key, and taking and giving keys back.

``<prefix>_shards/<shard>`` holds its owner's node id. A key is taken by
compare-and-set on its revision (create when absent, update when its holder's
heartbeat is gone) and given back by a conditional delete, after the node has
drained the shard and left its recent replies in the handoff bucket for the
next owner, who loads them before serving.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import structlog

from ..node import MemberInfo, MembershipEventKind, ShardHost

__all__ = ["Holder", "ShardKeys", "ShardEvent"]

_log = structlog.get_logger("clstr.membership")

#: A change of hands seen in the bucket: (what, node id, shard).
ShardEvent = tuple[MembershipEventKind, str, int]


@dataclass(slots=True)
class Holder:
    """Who holds a shard's key, and at which revision."""

    node_id: str
    revision: int


class ShardKeys:
    """This node's view of the shards bucket, and the keys it holds in it."""

    def __init__(self, node: ShardHost, kv: Any, handoff_kv: Any | None) -> None:
        self._node = node
        self.kv = kv
        self._handoff_kv = handoff_kv
        #: Every shard's holder as last seen in the bucket.
        self.holders: dict[int, Holder] = {}
        #: The keys this node holds: shard -> revision of our write.
        self.held: dict[int, int] = {}
        # Shards whose key the bucket shows in our name (held or left by a rejoin).
        self._in_our_name: set[int] = set()
        self._releasing: set[int] = set()

    # -- the bucket as seen by its watcher ---------------------------------------

    def seen(self, entry: Any) -> tuple[list[ShardEvent], int | None]:
        """Apply one watcher entry; return the hand changes it shows, and a shard
        that another node took from us (we were believed dead) or ``None``: the
        caller must stop serving that one at once."""
        try:
            shard = int(entry.key)
        except ValueError:
            return [], None
        previous = self.holders.get(shard)
        events: list[ShardEvent] = []
        if entry.operation in ("DEL", "PURGE"):
            self.holders.pop(shard, None)
            self._in_our_name.discard(shard)
            if previous is not None:
                events.append((MembershipEventKind.SHARD_RELEASED, previous.node_id, shard))
            return events, None
        owner = entry.value.decode(errors="replace")
        self.holders[shard] = Holder(owner, entry.revision)
        if owner == self._node.node_id:
            self._in_our_name.add(shard)
        else:
            self._in_our_name.discard(shard)
        taken = None
        mine = self.held.get(shard)
        if mine is not None and entry.revision != mine and owner != self._node.node_id:
            _log.warning("shard taken over by another node", shard=shard, by=owner)
            self.held.pop(shard, None)
            taken = shard
        if previous is None or previous.node_id != owner:
            if previous is not None:
                events.append((MembershipEventKind.SHARD_RELEASED, previous.node_id, shard))
            events.append((MembershipEventKind.SHARD_ACQUIRED, owner, shard))
        return events, taken

    def plan(
        self, mine: Collection[int], members: Mapping[str, MemberInfo]
    ) -> tuple[list[int], list[tuple[int, Holder | None]], list[tuple[int, Holder]]]:
        """What to change so that this node holds exactly ``mine`` (the shards HRW
        places on it): the shards to give back, the shards to take (with their
        current holder, if any, which must be gone), and the stale keys in our
        name to delete (left by a rejoin, placed elsewhere now). Costs in
        proportion to this node's shards, not to all of them: every node of a
        large cluster runs it on every change."""
        me = self._node.node_id
        held, holders = self.held, self.holders
        losing = [s for s in held if s not in mine and s not in self._releasing]
        gaining: list[tuple[int, Holder | None]] = []
        for shard in mine:
            if shard in held:
                continue
            holder = holders.get(shard)
            if holder is None or holder.node_id not in members or holder.node_id == me:
                gaining.append((shard, holder))
        stale = [(s, holders[s]) for s in self._in_our_name if s not in held and s not in mine]
        return losing, gaining, stale

    # -- taking and giving back ----------------------------------------------------

    async def acquire(
        self, shard: int, holder: Holder | None, holder_gone: Callable[[Holder], Awaitable[bool]]
    ) -> bool:
        """Take ``shard``'s key (from ``holder`` only if ``holder_gone`` says its
        heartbeat is gone), load its handed-over replies, serve it. Return
        ``False`` when another node got the key first (look again later)."""
        node = self._node
        key = str(shard)
        value = node.node_id.encode()
        try:
            if holder is None:
                revision = await self.kv.create(key, value)
            elif holder.node_id != node.node_id and not await holder_gone(holder):
                return True  # alive after all: it will release the key itself
            else:
                revision = await self.kv.update(key, value, last=holder.revision)
        except Exception as exc:
            _log.debug("shard taken by another node first", shard=shard, error=repr(exc))
            return False
        self.held[shard] = revision
        try:
            await self._take_handoff(shard)
            await node.acquire(shard, token=revision)
        except BaseException:
            # Not served: give the key back rather than hold it unserved.
            self.held.pop(shard, None)
            await self.delete_key(shard, revision)
            raise
        return True

    async def release(self, shard: int, timeout: float) -> None:
        """Drain ``shard`` (for up to ``timeout``), leave its replies for the next
        owner, then give its key back."""
        revision = self.held.get(shard)
        if revision is None:
            return
        self._releasing.add(shard)
        try:
            await self._node.release(shard, timeout=timeout)
            await self._give_handoff(shard)
            try:
                await self.kv.delete(str(shard), last=revision)
            except Exception as exc:
                _log.warning("cannot release shard key", shard=shard, error=repr(exc))
            self.held.pop(shard, None)
        finally:
            self._releasing.discard(shard)

    async def delete_key(self, shard: int, revision: int) -> None:
        """Delete ``shard``'s key if it is still at ``revision`` (best effort)."""
        try:
            await self.kv.delete(str(shard), last=revision)
        except Exception as exc:
            _log.debug("stale shard key not deleted", shard=shard, error=repr(exc))

    async def drop_all(self) -> None:
        """Stop serving every shard we hold, without touching the keys (they may
        be someone else's by now; reconcile cleans up those still ours)."""
        for shard in list(self.held):
            await self._node.release(shard, timeout=0)
            self.held.pop(shard, None)

    async def drop_lost(self) -> None:
        """Stop serving the shards whose key is no longer at our revision (checked
        against the bucket itself, after a reconnect)."""
        for shard, revision in list(self.held.items()):
            try:
                current = await self.kv.get(str(shard))
                still = current.revision == revision
            except Exception:
                still = False
            if not still:
                await self._node.release(shard, timeout=0)
                self.held.pop(shard, None)

    def moved_away(self, shards: set[int]) -> bool:
        """Whether we hold no key and every one of ``shards`` is held by another node."""
        me = self._node.node_id
        return not self.held and all(
            (h := self.holders.get(s)) is not None and h.node_id != me for s in shards
        )

    def owners(self) -> Iterator[tuple[int, str]]:
        """(shard, holder's node id) for every held key in the bucket."""
        return ((s, h.node_id) for s, h in self.holders.items())

    # -- replies travel with their shard --------------------------------------------

    async def _give_handoff(self, shard: int) -> None:
        """Leave ``shard``'s recent replies for its next owner (before the key goes)."""
        state = self._node.handoff_state(shard)
        if state is None or self._handoff_kv is None:
            return
        try:
            await self._handoff_kv.put(str(shard), state)
        except Exception as exc:
            _log.warning("cannot hand over replies", shard=shard, error=repr(exc))

    async def _take_handoff(self, shard: int) -> None:
        """Load what the previous owner of ``shard`` left (before serving it)."""
        import nats.js.errors

        if self._handoff_kv is None:
            return
        try:
            entry = await self._handoff_kv.get(str(shard))
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
            return
        except Exception as exc:
            _log.warning("cannot read handed-over replies", shard=shard, error=repr(exc))
            return
        if entry.value:
            taken = self._node.restore_handoff(shard, entry.value)
            _log.debug("replies handed over", shard=shard, replies=taken)
