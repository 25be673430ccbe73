"""Dynamic membership on NATS JetStream KV (see docs/membership.md).

Heartbeats with a TTL in a members bucket, shard ownership as compare-and-set
keys in a shards bucket, handoff that drains before it releases, and a lease
that fences a node that lost its connection or its heartbeat.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import asdict, dataclass, replace
from typing import Any, Final, TypeVar

import structlog

from .._tasks import cancel_and_wait
from ..errors import ConfigurationError, LifecycleError, TransportError
from ..hashing import assign_shards
from ..node import (
    ClusterState,
    MemberInfo,
    Membership,
    MembershipEventKind,
    ShardHost,
)
from ..transports.base import ConnectionEvent, Subscription

__all__ = ["KvMembership", "KvSettings", "control_subject"]

_log = structlog.get_logger("clstr.membership")


# -- dynamic membership on JetStream KV --------------------------------------

# JetStream's "wrong last sequence" error codes: a compare-and-set lost.
_CAS_CODES: Final = (10071, 10164)


def _is_cas_failure(exc: BaseException) -> bool:
    import nats.js.errors

    if isinstance(exc, nats.js.errors.KeyWrongLastSequenceError):
        return True
    return isinstance(exc, nats.js.errors.APIError) and exc.err_code in _CAS_CODES


def control_subject(prefix: str, node_id: str) -> str:
    """The subject on which a node with dynamic membership takes operations
    (cordon, uncordon, drain) as JSON ``{"op": "drain"}``; it replies with
    ``{"ok": true, ...}`` once done."""
    return f"{prefix}.control.{node_id}"


def _bucket_names(prefix: str) -> tuple[str, str, str]:
    """The members, shards and handoff buckets of the cluster under ``prefix``."""
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in prefix)
    return f"{safe}_members", f"{safe}_shards", f"{safe}_handoff"


@dataclass(slots=True)
class _Holder:
    node_id: str
    revision: int


@dataclass(frozen=True, slots=True, kw_only=True)
class KvSettings:
    """Timing of :class:`KvMembership` (seconds).

    A crashed node's shards move after ``heartbeat_ttl`` plus the time the
    server takes to place the expiry marker; a node whose heartbeat has not
    been renewed for ``lease_fraction * heartbeat_ttl`` stops handling
    (fences itself) so that it can never overlap with the next owner.
    """

    heartbeat_interval: float = 1.0
    heartbeat_ttl: float = 3.0
    lease_fraction: float = 0.8
    handoff_timeout: float = 5.0
    reconcile_interval: float = 1.0
    replicas: int = 1


class KvMembership(Membership):
    """Dynamic membership on NATS JetStream KV (no home-made consensus).

    * Members: each node keeps ``<prefix>_members/<node_id>`` alive with a
      per-key TTL, renewed every ``heartbeat_interval``; expiry shows up as a
      purge marker in every watcher (the bucket has ``limit_marker_ttl``).
    * Placement: HRW over the live, uncordoned members (weights honoured).
    * Ownership: ``<prefix>_shards/<shard>`` holds the owner, taken by
      compare-and-set on its revision. An owner that should lose a shard stops
      taking its messages, drains the in-flight ones (bounded by
      ``handoff_timeout``), then deletes the key (CAS again); the new owner
      takes it only once it is deleted or its holder's heartbeat is gone.
    * Fencing: the node may handle messages only while its lease (last
      successful heartbeat + ``lease_fraction * heartbeat_ttl``) runs; on a
      lost connection it stops at once, and after reconnecting it re-checks
      its heartbeat and every shard key before it handles again.

    Needs a :class:`~clstr.transports.nats.NatsTransport` (JetStream on).
    """

    def __init__(
        self,
        *,
        weight: float = 1.0,
        settings: KvSettings | None = None,
    ) -> None:
        super().__init__()
        if not weight > 0:
            raise ConfigurationError(f"weight must be > 0, got {weight!r}")
        self.settings = s = settings or KvSettings()
        if not 0 < s.heartbeat_interval < s.heartbeat_ttl:
            raise ConfigurationError(
                "heartbeat_interval must be > 0 and shorter than heartbeat_ttl "
                f"(got {s.heartbeat_interval} and {s.heartbeat_ttl})"
            )
        if s.heartbeat_ttl < 1:
            raise ConfigurationError("heartbeat_ttl must be >= 1 s (JetStream's TTL resolution)")
        if not 0 < s.lease_fraction < 1:
            raise ConfigurationError(f"lease_fraction must be in (0, 1), got {s.lease_fraction}")
        if s.heartbeat_interval >= s.lease_fraction * s.heartbeat_ttl:
            raise ConfigurationError(
                f"heartbeat_interval ({s.heartbeat_interval} s) must be shorter than the lease "
                f"(lease_fraction * heartbeat_ttl = {s.lease_fraction * s.heartbeat_ttl:.3g} s), "
                "or the node fences itself between heartbeats"
            )
        self.weight = weight
        self._node: ShardHost | None = None
        self._members: dict[str, MemberInfo] = {}
        self._holders: dict[int, _Holder] = {}
        self._held: dict[int, int] = {}  # shard -> revision of our key
        self._releasing: set[int] = set()
        self._cordoned = False
        self._leaving = False
        self._me: MemberInfo | None = None
        self._my_revision = 0
        self._dirty = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._watchers: list[Any] = []
        self._members_kv: Any = None
        self._shards_kv: Any = None
        self._handoff_kv: Any = None
        self._connected = True
        self._revalidate = False
        self._lease_until: float | None = None
        self._members_ready = asyncio.Event()
        self._change_waiters: list[asyncio.Future[None]] = []
        self._control: Subscription | None = None
        self._heartbeat_lock = asyncio.Lock()
        self._lost = False  # heartbeat expired; rejoining
        self._shards_ready = asyncio.Event()

    # -- public API -----------------------------------------------------------

    @property
    def held(self) -> list[int]:
        """The shards whose ownership key this node holds."""
        return sorted(self._held)

    def cluster_state(self) -> ClusterState:
        node = self._require_node()
        owners = {s: h.node_id for s, h in self._holders.items()}
        return ClusterState(dict(self._members), owners, self._desired(), node.num_shards)

    async def cordon(self, cordoned: bool = True) -> None:
        """Mark this node as leaving (or not): no shards are placed on it any more,
        and it hands back those it holds."""
        self._cordoned = cordoned
        await self._heartbeat()
        self._dirty.set()

    async def drain(self, timeout: float | None = None) -> None:
        """Cordon this node and wait until every shard it held is held by another node.

        Raises ``TimeoutError`` after ``timeout`` seconds (e.g. when no other
        node is there to take the shards).
        """
        moving = set(self._held)
        await self.cordon()
        me = self._require_node().node_id

        def moved() -> bool:
            return not self._held and all(
                (h := self._holders.get(s)) is not None and h.node_id != me for s in moving
            )

        async with asyncio.timeout(timeout):
            while not moved():
                self._dirty.set()
                await self._changed()

    async def wait_balanced(self, timeout: float | None = None) -> ClusterState:
        """Wait until, as far as this node sees, every shard is held by its desired owner."""
        async with asyncio.timeout(timeout):
            while True:
                state = self.cluster_state()
                if state.balanced:
                    return state
                await self._changed()

    # -- lifecycle ------------------------------------------------------------

    async def join(self, node: ShardHost) -> None:
        from ..transports.nats import NatsTransport

        if not isinstance(node.transport, NatsTransport):
            raise ConfigurationError(
                "KvMembership needs a NatsTransport with JetStream; "
                "use StaticMembership on other transports"
            )
        self._node = node
        nc = node.transport.nc
        js = nc.jetstream()
        members_bucket, shards_bucket, handoff_bucket = _bucket_names(node.prefix)
        self._members_kv = await _settling(
            lambda: self._bucket(js, members_bucket, marker_ttl=True)
        )
        self._shards_kv = await _settling(lambda: self._bucket(js, shards_bucket, marker_ttl=False))
        try:
            # Replies travel with a moving shard; entries live as long as a
            # node keeps replies.
            self._handoff_kv = await _settling(
                lambda: self._bucket(
                    js, handoff_bucket, marker_ttl=False, max_age=node.reply_cache_ttl
                )
            )
        except Exception as exc:
            _log.warning(
                "no handoff bucket: retries across a shard move may run twice",
                bucket=handoff_bucket,
                error=repr(exc),
            )
        self._me = MemberInfo(
            node.node_id,
            weight=self.weight,
            started_at=time.time(),
            host=socket.gethostname(),
            pid=os.getpid(),
            incarnation=os.urandom(6).hex(),
        )
        await _settling(self._announce)
        node.transport.add_listener(self._on_connection)
        try:
            self._control = await node.transport.subscribe(
                control_subject(node.prefix, node.node_id), self._on_control
            )
        except TransportError as exc:
            # Permissions may forbid it; the node works, only remote drain does not.
            _log.warning("no control subject: remote cordon/drain disabled", error=str(exc))
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._watch_members(), name=f"clstr-members-{node.node_id}"),
            loop.create_task(self._watch_shards(), name=f"clstr-shards-{node.node_id}"),
            loop.create_task(self._heartbeat_loop(), name=f"clstr-heartbeat-{node.node_id}"),
        ]
        await self._members_ready.wait()
        await self._shards_ready.wait()
        # One pass now, so that start() returns with the free shards served.
        await self._reconcile()
        self._tasks.append(
            loop.create_task(self._reconcile_loop(), name=f"clstr-reconcile-{node.node_id}")
        )
        self._dirty.set()

    async def leave(self) -> None:
        node = self._node
        if node is None or self._leaving:
            return
        self._leaving = True
        try:
            await self._stop_loop("reconcile")
            # Announce that we are leaving (cordoned) but stay a live member:
            # the others then wait for us to release each key instead of
            # taking it while we still drain it. The heartbeat goes last.
            self._cordoned = True
            await self._heartbeat()
            await asyncio.gather(*(self._release(s) for s in list(self._held)))
            # No renewal may follow the delete (it would fail, or worse).
            await self._stop_loop("heartbeat")
            try:
                await self._members_kv.delete(node.node_id)
            except Exception as exc:
                _log.warning("cannot delete heartbeat", node_id=node.node_id, error=repr(exc))
        finally:
            await self._close()
        self._emit(MembershipEventKind.NODE_LEFT, node.node_id)

    async def close(self) -> None:
        if self._node is not None:
            await self._close()

    async def _close(self) -> None:
        """Stop every task and watcher (also when leave was cut short). What
        is not stopped yet stays listed, so a second call (after this one was
        itself cancelled) finishes the job."""
        node = self._require_node()
        node.transport.remove_listener(self._on_connection)
        node.set_lease(None)
        await cancel_and_wait(list(self._tasks), insist=True)
        self._tasks = [t for t in self._tasks if not t.done()]
        if self._control is not None:
            control, self._control = self._control, None
            await control.unsubscribe()
        while self._watchers:
            await _stop_watcher(self._watchers[0])
            self._watchers.pop(0)

    async def _stop_loop(self, kind: str) -> None:
        named = [t for t in self._tasks if t.get_name().startswith(f"clstr-{kind}")]
        await cancel_and_wait(named, insist=True)

    # -- internals ------------------------------------------------------------

    def _require_node(self) -> ShardHost:
        if self._node is None:
            raise LifecycleError("membership has not joined a node yet")
        return self._node

    async def _bucket(
        self, js: Any, name: str, *, marker_ttl: bool, max_age: float | None = None
    ) -> Any:
        import nats.js.errors

        try:
            return await js.key_value(name)
        except nats.js.errors.BucketNotFoundError:
            pass
        kwargs: dict[str, Any] = {"bucket": name, "history": 1, "replicas": self.settings.replicas}
        if marker_ttl:
            kwargs["limit_marker_ttl"] = self.settings.heartbeat_ttl
        if max_age is not None:
            kwargs["ttl"] = max_age
        try:
            return await js.create_key_value(**kwargs)
        except nats.js.errors.BadRequestError:
            # Created by another node at the same moment.
            return await js.key_value(name)

    def _member_value(self) -> bytes:
        assert self._me is not None
        self._me = replace(self._me, cordoned=self._cordoned)
        return json.dumps(asdict(self._me)).encode()

    async def _announce(self) -> None:
        """Create our heartbeat key (or take it back from our own dead incarnation)."""
        node = self._require_node()
        ttl = self.settings.heartbeat_ttl
        sent = asyncio.get_running_loop().time()
        try:
            self._my_revision = await self._members_kv.create(
                node.node_id, self._member_value(), msg_ttl=ttl
            )
        except Exception as exc:
            if not _is_cas_failure(exc):
                raise
            entry = await self._members_kv.get(node.node_id)
            revision = await self._unclaimed(entry)
            sent = asyncio.get_running_loop().time()
            self._my_revision = await self._renew(revision)
        self._renewed(sent)

    async def _unclaimed(self, entry: Any) -> int:
        """The revision of a heartbeat key in our name that nobody renews any more
        (a previous run of this node that died less than a TTL ago); raise
        :class:`ConfigurationError` when a live node renews it: two nodes with
        one id would serve the same shards."""
        node = self._require_node()
        try:
            theirs = json.loads(entry.value).get("incarnation") if entry.value else None
        except ValueError:
            theirs = None
        assert self._me is not None
        if theirs in (None, self._me.incarnation):
            return int(entry.revision)
        # Another process: wait past its renewal interval and see if it renews.
        await asyncio.sleep(2 * self.settings.heartbeat_interval)
        try:
            later = await self._members_kv.get(node.node_id)
        except Exception:
            return int(entry.revision)  # gone (expired): our create-or-update decides
        if later.revision != entry.revision and later.value:
            info = json.loads(later.value)
            raise ConfigurationError(
                f"node id {node.node_id!r} is in use by a live node "
                f"(host {info.get('host')!r}, pid {info.get('pid')}); give each node a unique id"
            )
        return int(later.revision)

    def _renewed(self, sent: float) -> None:
        node = self._require_node()
        self._lease_until = sent + self.settings.heartbeat_ttl * self.settings.lease_fraction
        if self._connected and not self._revalidate:
            node.set_lease(self._lease_until)

    async def _heartbeat(self) -> None:
        # One renewal at a time: two at once (the loop and a cordon) would race
        # on the revision, and the loser would take its own key for lost.
        async with self._heartbeat_lock:
            await self._heartbeat_once()

    async def _heartbeat_once(self) -> None:
        node = self._require_node()
        if not self._connected:
            return
        if self._lost:
            await self._rejoin()
            return
        sent = asyncio.get_running_loop().time()
        try:
            self._my_revision = await self._renew(self._my_revision)
        except Exception as exc:
            if _is_cas_failure(exc) and not self._leaving:
                # Our key expired (we were cut off or too slow): everything we
                # held may be someone else's now. Fence, drop it all, rejoin.
                _log.warning("heartbeat lost; rejoining", node_id=node.node_id)
                await self._rejoin()
            else:
                _log.warning(
                    "heartbeat failed",
                    node_id=node.node_id,
                    error=repr(exc),
                    detail=getattr(exc, "description", None),
                )
            return
        self._renewed(sent)

    async def _renew(self, last: int) -> int:
        """Rewrite our heartbeat with a fresh TTL, if its revision is still ``last``.

        nats-py's ``KeyValue.update`` takes no per-message TTL, so this
        publishes to the bucket's subject with the same expected-revision
        header ``update`` uses.
        """
        node = self._require_node()
        js = node.transport.nc.jetstream()  # type: ignore[attr-defined]
        members_bucket, _, _ = _bucket_names(node.prefix)
        ack = await js.publish(
            f"$KV.{members_bucket}.{node.node_id}",
            self._member_value(),
            headers={"Nats-Expected-Last-Subject-Sequence": str(last)},
            msg_ttl=self.settings.heartbeat_ttl,
        )
        return int(ack.seq)

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.heartbeat_interval)
            try:
                await self._heartbeat()
            except Exception as exc:
                # Never let the heartbeat die: the next tick tries again (a
                # failed rejoin included: the node stays fenced until then).
                _log.warning("heartbeat round failed", error=repr(exc))

    async def _rejoin(self) -> None:
        """Our heartbeat expired: drop every shard and join again (called under the
        heartbeat lock). Until it succeeds the node stays fenced."""
        node = self._require_node()
        self._lost = True
        node.set_lease(None)
        node.fence("heartbeat lost")
        await self._drop_all()
        await self._announce()
        self._lost = False
        node.unfence()
        self._dirty.set()

    async def _drop_all(self) -> None:
        """Stop serving every shard we hold, without touching the keys (they may
        be someone else's by now; reconcile cleans up those still ours)."""
        node = self._require_node()
        for shard in list(self._held):
            await node.release(shard, timeout=0)
            self._held.pop(shard, None)

    def _on_control(self, data: bytes, reply: str | None) -> None:
        """Operations from outside (``clstr cordon/uncordon/drain``): JSON ``{"op": ...}``."""
        node = self._require_node()
        try:
            op = json.loads(data)["op"]
            if op not in ("cordon", "uncordon", "drain"):
                raise ValueError(f"unknown op {op!r}")
        except (ValueError, KeyError, TypeError) as exc:
            self._answer(reply, {"ok": False, "error": f"bad control message: {exc}"})
            return

        async def run() -> None:
            if op == "drain":
                await self.drain()
            else:
                await self.cordon(op == "cordon")
            self._answer(reply, {"ok": True, "node_id": node.node_id, "op": op})

        task = asyncio.get_running_loop().create_task(run(), name=f"clstr-control-{op}")
        task.add_done_callback(self._tasks_done)
        self._tasks.append(task)

    def _answer(self, reply: str | None, body: dict[str, Any]) -> None:
        if reply is None:
            return
        node = self._require_node()
        task = asyncio.get_running_loop().create_task(
            node.transport.publish(reply, json.dumps(body).encode())
        )
        task.add_done_callback(self._tasks_done)
        self._tasks.append(task)

    def _on_connection(self, event: Any) -> None:
        node = self._require_node()
        if event is ConnectionEvent.DISCONNECTED:
            self._connected = False
            node.fence("NATS connection lost")
        elif event is ConnectionEvent.RECONNECTED:
            self._connected = True
            self._revalidate = True
            task = asyncio.get_running_loop().create_task(self._after_reconnect())
            task.add_done_callback(self._tasks_done)
            self._tasks.append(task)

    def _tasks_done(self, task: asyncio.Task[None]) -> None:
        if task in self._tasks:
            self._tasks.remove(task)
        if not task.cancelled() and task.exception() is not None:
            _log.error("membership task failed", error=repr(task.exception()))

    async def _after_reconnect(self) -> None:
        """Re-check our heartbeat and every shard key before handling again.

        Under the heartbeat lock, so that no renewal moves our revision while
        it is compared, and one re-check at a time.
        """
        node = self._require_node()
        async with self._heartbeat_lock:
            if not self._connected:
                return  # dropped again: the next reconnect re-checks
            try:
                try:
                    entry = await self._members_kv.get(node.node_id)
                    mine = entry.revision == self._my_revision
                except Exception:
                    mine = False
                if not mine:
                    await self._rejoin()
                    return
                for shard, revision in list(self._held.items()):
                    try:
                        current = await self._shards_kv.get(str(shard))
                        still = current.revision == revision
                    except Exception:
                        still = False
                    if not still:
                        await node.release(shard, timeout=0)
                        self._held.pop(shard, None)
                await self._heartbeat_once()
            finally:
                if self._connected:
                    self._revalidate = False
                    if self._lease_until is not None and not self._lost:
                        node.set_lease(self._lease_until)
                        node.unfence()
                self._dirty.set()

    async def _watch_members(self) -> None:
        watcher = await self._members_kv.watchall()
        self._watchers.append(watcher)
        async for entry in watcher:
            if entry is None:
                self._members_ready.set()
                continue
            node_id = entry.key
            if entry.operation in ("DEL", "PURGE"):
                if self._members.pop(node_id, None) is not None:
                    self._emit(MembershipEventKind.NODE_LEFT, node_id)
            else:
                try:
                    info = MemberInfo(**json.loads(entry.value))
                except Exception:
                    _log.warning("ignoring malformed member entry", key=node_id)
                    continue
                if node_id not in self._members:
                    self._emit(MembershipEventKind.NODE_JOINED, node_id)
                self._members[node_id] = info
            self._changed_now()

    async def _watch_shards(self) -> None:
        watcher = await self._shards_kv.watchall()
        self._watchers.append(watcher)
        async for entry in watcher:
            if entry is None:
                self._shards_ready.set()
                continue
            try:
                shard = int(entry.key)
            except ValueError:
                continue
            previous = self._holders.get(shard)
            if entry.operation in ("DEL", "PURGE"):
                self._holders.pop(shard, None)
                if previous is not None:
                    self._emit(MembershipEventKind.SHARD_RELEASED, previous.node_id, shard)
            else:
                owner = entry.value.decode(errors="replace")
                self._holders[shard] = _Holder(owner, entry.revision)
                mine = self._held.get(shard)
                if mine is not None and entry.revision != mine and owner != self._node_id():
                    # Taken from us (we were believed dead): stop serving it at once.
                    _log.warning("shard taken over by another node", shard=shard, by=owner)
                    self._held.pop(shard, None)
                    self._spawn(self._require_node().release(shard, timeout=0))
                if previous is None or previous.node_id != owner:
                    if previous is not None:
                        self._emit(MembershipEventKind.SHARD_RELEASED, previous.node_id, shard)
                    self._emit(MembershipEventKind.SHARD_ACQUIRED, owner, shard)
            self._changed_now()

    def _node_id(self) -> str:
        return self._require_node().node_id

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run ``coro`` as a membership task (cancelled by leave)."""
        task = asyncio.get_running_loop().create_task(coro)
        task.add_done_callback(self._tasks_done)
        self._tasks.append(task)

    def _changed_now(self) -> None:
        self._dirty.set()
        waiters, self._change_waiters = self._change_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def _changed(self) -> None:
        """Wait for the next change seen by a watcher."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._change_waiters.append(waiter)
        await waiter

    def _desired(self) -> dict[int, str]:
        node = self._require_node()
        live = {
            n: m
            for n, m in self._members.items()
            if not m.cordoned and not (n == node.node_id and (self._cordoned or self._leaving))
        }
        if not live:
            return {}
        weights = {n: m.weight for n, m in live.items()}
        return assign_shards(list(live), node.num_shards, node.seed, weights=weights)

    async def _reconcile_loop(self) -> None:
        while True:
            try:
                async with asyncio.timeout(self.settings.reconcile_interval):
                    await self._dirty.wait()
            except TimeoutError:
                pass
            self._dirty.clear()
            try:
                await self._reconcile()
            except Exception as exc:
                _log.warning("reconcile failed", error=repr(exc))
                self._dirty.set()

    async def _reconcile(self) -> None:
        node = self._require_node()
        if self._leaving or not self._connected or self._revalidate:
            return
        if node.node_id not in self._members and not self._cordoned:
            return  # our own heartbeat is not visible yet
        desired = self._desired()
        me = node.node_id
        losing = [s for s in self._held if desired.get(s) != me and s not in self._releasing]
        gaining = []
        for shard, owner in desired.items():
            if owner != me or shard in self._held:
                continue
            holder = self._holders.get(shard)
            if holder is None or holder.node_id not in self._members or holder.node_id == me:
                gaining.append((shard, holder))
        # Keys still in our name that we do not serve (left by a rejoin) and
        # that belong elsewhere now: give them back, or nobody may take them.
        stale = [
            (s, h)
            for s, h in self._holders.items()
            if h.node_id == me and s not in self._held and desired.get(s) != me
        ]
        await asyncio.gather(
            *(self._release(s) for s in losing),
            *(self._acquire(s, h) for s, h in gaining),
            *(self._delete_key(s, h.revision) for s, h in stale),
        )

    async def _holder_gone(self, holder: _Holder) -> bool:
        """Whether ``holder``'s heartbeat is really gone. The members watch and the
        shards watch are separate streams: a newcomer's shard key can arrive
        before its heartbeat does, so absence from our view is checked once more
        against the bucket before a key is taken from its holder."""
        import nats.js.errors

        try:
            entry = await self._members_kv.get(holder.node_id)
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
            return True
        # An expired heartbeat leaves the server's marker (no KV-Operation
        # header, no value) until the marker itself expires.
        return not entry.value or entry.operation in ("DEL", "PURGE")

    async def _delete_key(self, shard: int, revision: int) -> None:
        try:
            await self._shards_kv.delete(str(shard), last=revision)
        except Exception as exc:
            _log.debug("stale shard key not deleted", shard=shard, error=repr(exc))

    async def _acquire(self, shard: int, holder: _Holder | None) -> None:
        node = self._require_node()
        key = str(shard)
        value = node.node_id.encode()
        try:
            if holder is None:
                revision = await self._shards_kv.create(key, value)
            elif holder.node_id != node.node_id and not await self._holder_gone(holder):
                return  # alive after all: it will release the key itself
            else:
                revision = await self._shards_kv.update(key, value, last=holder.revision)
        except Exception as exc:
            _log.debug("shard taken by another node first", shard=shard, error=repr(exc))
            self._dirty.set()
            return
        self._held[shard] = revision
        try:
            await self._take_handoff(shard)
            await node.acquire(shard)
        except BaseException:
            # Not served: give the key back rather than hold it unserved.
            self._held.pop(shard, None)
            await self._delete_key(shard, revision)
            raise

    async def _give_handoff(self, shard: int) -> None:
        """Leave ``shard``'s recent replies for its next owner (before the key goes)."""
        state = self._require_node().handoff_state(shard)
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
            taken = self._require_node().restore_handoff(shard, entry.value)
            _log.debug("replies handed over", shard=shard, replies=taken)

    async def _release(self, shard: int) -> None:
        node = self._require_node()
        revision = self._held.get(shard)
        if revision is None:
            return
        self._releasing.add(shard)
        try:
            await node.release(shard, timeout=self.settings.handoff_timeout)
            await self._give_handoff(shard)
            try:
                await self._shards_kv.delete(str(shard), last=revision)
            except Exception as exc:
                _log.warning("cannot release shard key", shard=shard, error=repr(exc))
            self._held.pop(shard, None)
        finally:
            self._releasing.discard(shard)


T = TypeVar("T")


async def _settling(op: Callable[[], Awaitable[T]], within: float = 10.0) -> T:
    """Run ``op``, retrying while JetStream settles (a fresh replicated stream
    may have no leader yet and answer "no responders" for a moment)."""
    import nats.errors
    import nats.js.errors

    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    pause = 0.05
    while True:
        try:
            return await op()
        except (
            nats.errors.NoRespondersError,
            nats.errors.TimeoutError,
            nats.js.errors.NoStreamResponseError,
        ):
            if loop.time() + pause >= deadline:
                raise
            await asyncio.sleep(pause)
            pause = min(pause * 2, 1.0)


async def _stop_watcher(watcher: Any) -> None:
    """Stop a KV watcher, also when its connection is already closed.

    nats-py cancels the ordered consumer's heartbeat and flow-control tasks
    only when unsubscribing succeeds; on a closed connection it raises first
    and the tasks live on, so they are cancelled here.
    """
    try:
        await watcher.stop()
    except Exception as exc:
        _log.debug("watcher stop failed", error=repr(exc))
    push = getattr(watcher, "_sub", None)  # the JetStream push subscription
    jsi = getattr(getattr(push, "_sub", None), "_jsi", None)  # on its core subscription
    leftovers = [
        task
        for task in (getattr(jsi, "_hbtask", None), getattr(jsi, "_fctask", None))
        if isinstance(task, asyncio.Task)
    ]
    await cancel_and_wait(leftovers, insist=True)
