"""The dashboard's live picture of a cluster, from what clstr already publishes.

Two sources, both read-only:

* NATS service discovery: every ``poll_interval`` a ``$SRV.STATS.<name>``
  request gathers each node's shards, counters and time-in-node histogram
  (:class:`~clstr.observe.ServiceDiscovery`). Rates and recent percentiles are
  differences between polls (:mod:`._tracks`).
* The membership buckets of :class:`~clstr.membership.KvMembership`
  (``<prefix>_members``, ``<prefix>_shards``), watched when they exist: who is
  a member (and how it left: a delete is a graceful leave, the server's
  expiry marker a node that died), who holds each shard's key, and so, by
  HRW over the live uncordoned members, where each shard should be. A shard
  whose holder is not that node, or that has no holder, is moving.

Without the buckets (a static member list, as ``clstr dev up`` runs) the map
is what the nodes announce. The watch never creates a bucket and never
writes. One task runs it all (:meth:`ClusterWatch.start`, :meth:`stop`);
the watchers are its children.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import fields
from typing import Any

import nats.errors
import structlog

from .._tasks import cancel_and_wait
from ..errors import ClstrError, ConfigurationError
from ..node import MemberInfo
from ..transports.jetstream import bucket_names, stop_watcher
from ..transports.nats import NatsTransport
from ._discovery import discover
from ._settings import DashboardSettings
from ._snapshot import Picture, build_snapshot
from ._tracks import stats_data

__all__ = ["ClusterWatch", "DashboardSettings"]

_log = structlog.get_logger("clstr.dashboard")
_MEMBER_FIELDS = frozenset(f.name for f in fields(MemberInfo))


class ClusterWatch:
    """Keeps :attr:`snapshot` (a JSON-ready dict) up to date; see the module docstring.

    ``connect`` opens the NATS connection (retried every ``retry_interval``
    while it fails; the snapshot says why). ``num_shards`` ``None`` takes the
    count the nodes announce. ``seed`` must be the nodes' for the desired
    placement (and so "moving") to be right.
    """

    def __init__(
        self,
        connect: Callable[[], Awaitable[NatsTransport]],
        *,
        nats_url: str,
        prefix: str = "clstr",
        num_shards: int | None = None,
        seed: str = "",
        service_name: str = "clstr",
        settings: DashboardSettings | None = None,
    ) -> None:
        self._connect = connect
        self.settings = settings or DashboardSettings()
        self.picture = Picture(
            nats_url=nats_url,
            prefix=prefix,
            num_shards=num_shards,
            seed=seed,
            service_name=service_name,
            settings=self.settings,
            events=deque(maxlen=self.settings.max_events),
            series=deque(maxlen=self.settings.history),
        )
        #: The latest picture as JSON-ready data, and its number (grows by one each time).
        self.snapshot: dict[str, Any] = build_snapshot(self.picture, 0.0, time.time())
        self.version = 0
        self._transport: NatsTransport | None = None
        self._task: asyncio.Task[None] | None = None
        self._kv_tasks: list[asyncio.Task[None]] = []
        self._watchers: list[Any] = []
        self._kv_next_try = 0.0
        self._kv_changed = asyncio.Event()
        self._waiters: list[asyncio.Future[None]] = []
        self._stopped = False

    # -- lifecycle ------------------------------------------------------------

    async def start(self) -> None:
        """Start watching (in the background); the first snapshot says "connecting"."""
        if self._task is not None:
            raise ConfigurationError("the cluster watch is already started")
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name="clstr-dashboard-watch"
        )

    async def stop(self) -> None:
        """Stop every task and watcher and close the connection (idempotent).
        Whoever waits in :meth:`changed` is woken up."""
        self._stopped = True
        self._wake()
        if self._task is not None:
            await cancel_and_wait([self._task], insist=True)
        await self._reset_kv()
        if self._transport is not None:
            transport, self._transport = self._transport, None
            with contextlib.suppress(Exception):
                await transport.close()

    @property
    def stopped(self) -> bool:
        """Whether :meth:`stop` was called."""
        return self._stopped

    async def changed(self, version: int) -> int:
        """Wait until a snapshot newer than ``version`` is there, or the watch
        stops; return the current version."""
        while self.version <= version and not self._stopped:
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            await waiter
        return self.version

    # -- the loop -------------------------------------------------------------

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        picture = self.picture
        while True:
            if self._transport is None and not await self._open():
                self._publish()
                await asyncio.sleep(self.settings.retry_interval)
                continue
            assert self._transport is not None
            started = loop.time()
            if self._transport.nc.is_closed:
                await self._lost("the NATS connection closed")
                continue
            if not self._transport.nc.is_connected:
                picture.reachable = "reconnecting"
            else:
                if picture.reachable == "reconnecting":
                    picture.event("info", "NATS connection restored")
                picture.reachable = "connected"
                if any(t.done() for t in self._kv_tasks):
                    await self._reset_kv()  # a watch ended: look for the buckets again
                if not self._kv_tasks and started >= self._kv_next_try:
                    await self._open_kv()
                await self._poll()
            self._publish(tick=True)
            await self._between_polls(started + self.settings.poll_interval)

    async def _between_polls(self, until: float) -> None:
        """Wait for the next poll; show KV changes meanwhile, a burst as one update."""
        loop = asyncio.get_running_loop()
        while (left := until - loop.time()) > 0:
            try:
                async with asyncio.timeout(left):
                    await self._kv_changed.wait()
            except TimeoutError:
                return
            self._kv_changed.clear()
            # A node's death moves many keys within milliseconds: one update for all.
            await asyncio.sleep(min(0.05, max(0.0, until - loop.time())))
            self._publish()

    async def _open(self) -> bool:
        picture = self.picture
        try:
            self._transport = await self._connect()
        except (ClstrError, OSError, nats.errors.Error) as exc:
            picture.reachable = "unreachable"
            picture.problem = str(exc) or type(exc).__name__
            return False
        picture.reachable = "connected"
        picture.problem = None
        picture.event("info", f"connected to NATS at {picture.nats_url}")
        return True

    async def _lost(self, why: str) -> None:
        self.picture.event("error", why)
        self.picture.reachable = "unreachable"
        self.picture.problem = why
        await self._reset_kv()
        transport, self._transport = self._transport, None
        if transport is not None:
            with contextlib.suppress(Exception):
                await transport.close()

    async def _poll(self) -> None:
        assert self._transport is not None
        picture = self.picture
        settings = self.settings
        try:
            replies = await discover(
                self._transport,
                "STATS",
                picture.service_name,
                timeout=settings.discovery_timeout,
                quiet=min(0.15, settings.discovery_timeout / 2),
            )
        except (nats.errors.Error, ClstrError) as exc:
            _log.debug("discovery failed", error=repr(exc))
            return
        now = asyncio.get_running_loop().time()
        keep = max(settings.rate_window, settings.latency_window) + settings.poll_interval
        picture.other_prefixes = set()
        picture.announced_counts = set()
        for reply in replies:
            meta = reply.get("metadata") if isinstance(reply.get("metadata"), dict) else {}
            assert isinstance(meta, dict)
            data = stats_data(reply)
            prefix = data.get("prefix") or meta.get("clstr.prefix") or picture.prefix
            if prefix != picture.prefix:
                picture.other_prefixes.add(str(prefix))
                continue
            node_id = str(data.get("node_id") or meta.get("clstr.node_id") or reply.get("id"))
            count = data.get("num_shards") or meta.get("clstr.num_shards")
            if isinstance(count, int | str):
                with contextlib.suppress(ValueError):
                    picture.announced_counts.add(int(count))
            track = picture.track(node_id, now)
            if node_id not in picture.answering:
                version = reply.get("version") or "?"
                picture.event("answer", f"{node_id} answers discovery (version {version})")
            track.observe(reply, now, keep)
        picture.polled(now)

    # -- the membership buckets -------------------------------------------------

    async def _open_kv(self) -> None:
        """Watch the members and shards buckets if the cluster has them."""
        assert self._transport is not None
        loop = asyncio.get_running_loop()
        self._kv_next_try = loop.time() + 5.0
        js = self._transport.nc.jetstream(timeout=2.0)
        members_name, shards_name, _ = bucket_names(self.picture.prefix)
        try:
            members = await js.key_value(members_name)
            shards = await js.key_value(shards_name)
        except (nats.errors.Error, TimeoutError) as exc:
            # No bucket (a static cluster), or no JetStream: discovery alone.
            _log.debug("no membership buckets", error=repr(exc))
            return
        self.picture.kv_ready = {"members": False, "shards": False}
        self._kv_tasks = [
            loop.create_task(self._watch(members, "members"), name="clstr-dashboard-members"),
            loop.create_task(self._watch(shards, "shards"), name="clstr-dashboard-shards"),
        ]

    async def _watch(self, kv: Any, which: str) -> None:
        picture = self.picture
        try:
            watcher = await kv.watchall()
            self._watchers.append(watcher)
            async for entry in watcher:
                if entry is None:
                    picture.kv_ready[which] = True
                else:
                    live = picture.kv_ready.get(which, False)
                    if which == "members":
                        self._on_member(entry, live)
                    else:
                        picture.on_shard_key(entry.key, _value(entry))
                    picture.kv_changed_at = asyncio.get_running_loop().time()
                self._kv_changed.set()
        except Exception as exc:  # the map falls back to discovery; the loop retries
            _log.warning("membership watch ended; retrying", bucket=which, error=repr(exc))
            picture.kv_ready = {}
            self._kv_next_try = 0.0

    def _on_member(self, entry: Any, live: bool) -> None:
        value = _value(entry)
        if value is None:
            self.picture.member_gone(entry.key, graceful=entry.operation == "DEL", live=live)
            return
        try:
            raw = json.loads(value)
            info = MemberInfo(**{k: v for k, v in raw.items() if k in _MEMBER_FIELDS})
        except (ValueError, TypeError, AttributeError):
            _log.debug("ignoring a malformed member entry", key=entry.key)
            return
        self.picture.member_seen(info, live=live)

    async def _reset_kv(self) -> None:
        await cancel_and_wait(self._kv_tasks, insist=True)
        self._kv_tasks = []
        await self._close_kv()

    async def _close_kv(self) -> None:
        while self._watchers:
            await stop_watcher(self._watchers.pop())
        # A new watch replays the buckets; what they held meanwhile may be gone.
        self.picture.kv_ready = {}
        self.picture.members.clear()
        self.picture.holders.clear()

    # -- publishing -------------------------------------------------------------

    def _publish(self, *, tick: bool = False) -> None:
        now = asyncio.get_running_loop().time()
        if tick:
            self.picture.sample_series(now)
        self.snapshot = build_snapshot(self.picture, now, time.time())
        self.version += 1
        self._wake()

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)


def _value(entry: Any) -> bytes | None:
    """An entry's value, or ``None`` for a delete, a purge or an expiry marker."""
    if entry.operation in ("DEL", "PURGE") or not entry.value:
        return None
    return bytes(entry.value)
