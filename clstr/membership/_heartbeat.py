"""A node's heartbeat: its record in the members bucket, kept alive with a per-key TTL."""

from __future__ import annotations

import asyncio
import json
from dataclasses import asdict, replace
from typing import Any

from ..errors import ConfigurationError
from ..node import MemberInfo
from ..transports.jetstream import is_cas_failure, put_with_ttl
from ._settings import KvSettings

__all__ = ["Heartbeat"]


class Heartbeat:
    """``<members bucket>/<node id>``: written with a TTL, renewed by compare-and-set.

    Each write returns the loop time it was sent at: the lease it buys runs
    from then (:meth:`lease_from`), never from when the server answered.
    """

    def __init__(
        self, kv: Any, js: Any, bucket: str, member: MemberInfo, settings: KvSettings
    ) -> None:
        self.kv = kv
        self._js = js
        self._bucket = bucket
        self.member = member
        self.settings = settings
        #: The revision of our key as last written (0: not written yet).
        self.revision = 0

    @property
    def node_id(self) -> str:
        return self.member.node_id

    def lease_from(self, sent: float) -> float:
        """Until when (loop time) a heartbeat sent at ``sent`` lets the node handle."""
        return sent + self.settings.lease

    def _value(self, cordoned: bool) -> bytes:
        self.member = replace(self.member, cordoned=cordoned)
        return json.dumps(asdict(self.member)).encode()

    async def announce(self, cordoned: bool) -> float:
        """Create our key (or take it back from our own dead incarnation); return
        when it was sent. Raises :class:`ConfigurationError` when a live node
        renews a key of the same id."""
        sent = asyncio.get_running_loop().time()
        try:
            self.revision = await self.kv.create(
                self.node_id, self._value(cordoned), msg_ttl=self.settings.heartbeat_ttl
            )
        except Exception as exc:
            if not is_cas_failure(exc):
                raise
            entry = await self.kv.get(self.node_id)
            self.revision = await self._unclaimed(entry)
            sent = asyncio.get_running_loop().time()
            await self._renew(cordoned)
        return sent

    async def renew(self, cordoned: bool) -> float:
        """Rewrite our key with a fresh TTL if nobody else wrote it since; return
        when it was sent. Raises JetStream's error (see
        :func:`~clstr.transports.jetstream.is_cas_failure`) when it expired."""
        sent = asyncio.get_running_loop().time()
        await self._renew(cordoned)
        return sent

    async def _renew(self, cordoned: bool) -> None:
        self.revision = await put_with_ttl(
            self._js,
            self._bucket,
            self.node_id,
            self._value(cordoned),
            revision=self.revision,
            ttl=self.settings.heartbeat_ttl,
        )

    async def delete(self) -> None:
        """Remove our key (a graceful leave): the others see us gone at once."""
        await self.kv.delete(self.node_id)

    async def _unclaimed(self, entry: Any) -> int:
        """The revision of a key in our name that nobody renews any more (a
        previous run of this node that died less than a TTL ago); raise
        :class:`ConfigurationError` when a live node renews it: two nodes with
        one id would serve the same shards."""
        try:
            theirs = json.loads(entry.value).get("incarnation") if entry.value else None
        except ValueError:
            theirs = None
        if theirs in (None, self.member.incarnation):
            return int(entry.revision)
        # Another process: wait past its renewal interval and see if it renews.
        await asyncio.sleep(2 * self.settings.heartbeat_interval)
        try:
            later = await self.kv.get(self.node_id)
        except Exception:
            return int(entry.revision)  # gone (expired): our create-or-update decides
        if later.revision != entry.revision and later.value:
            info = json.loads(later.value)
            raise ConfigurationError(
                f"node id {self.node_id!r} is in use by a live node "
                f"(host {info.get('host')!r}, pid {info.get('pid')}); give each node a unique id"
            )
        return int(later.revision)
