"""Machine ids leased per live node through JetStream KV (see docs/ids.md).

The bucket ``<prefix>_machines`` has one key per machine id used, ``"0"``
to ``"1023"``. A node takes the lowest free one by creating its key with a
per-key TTL, keeps it by rewriting it with a fresh TTL by compare-and-set
(the heartbeat's way), and when it closes rewrites it as released, with the
last millisecond it used (the next holder starts after it). A node that
stops renewing (crashed, cut off) loses the key when its TTL runs out; it
stops issuing ids earlier than that, when its own lease (``lease_fraction *
ttl`` after the last renewal was sent) runs out.
"""

from __future__ import annotations

import asyncio
import enum
import json
import os
import secrets
import socket
import time
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

import structlog

from .._tasks import cancel_and_wait
from ..errors import ConfigurationError, LifecycleError, MachineIdUnavailableError
from ..protocol import DEFAULT_PREFIX
from ..transports.jetstream import (
    bucket_name,
    create_with_ttl,
    is_cas_failure,
    open_bucket,
    put_with_ttl,
    settling,
    stop_watcher,
)
from ._layout import MAX_MACHINE_ID

if TYPE_CHECKING:
    from ..transports.nats import NatsTransport

__all__ = ["LeaseSettings", "MachineIdLease"]

_log = structlog.get_logger("clstr.ids")


@dataclass(frozen=True, slots=True, kw_only=True)
class LeaseSettings:
    """Timing of a :class:`MachineIdLease` (seconds).

    A crashed node's machine id is free again ``ttl`` after its last renewal;
    a node issues ids only until ``lease_fraction * ttl`` after it sent its
    last successful renewal, so that the remaining ``(1 - lease_fraction) *
    ttl`` (3 s by default) separates its last id from a successor's first,
    whatever the network delays. Raises :class:`~clstr.ConfigurationError`
    for timings that cannot work.
    """

    ttl: float = 10.0
    renew_interval: float = 2.0
    lease_fraction: float = 0.7
    replicas: int = 1

    def __post_init__(self) -> None:
        if self.ttl < 1:
            raise ConfigurationError("ttl must be >= 1 s (JetStream's TTL resolution)")
        if not 0 < self.lease_fraction < 1:
            raise ConfigurationError(f"lease_fraction must be in (0, 1), got {self.lease_fraction}")
        if not 0 < self.renew_interval < self.lease:
            raise ConfigurationError(
                f"renew_interval ({self.renew_interval} s) must be > 0 and shorter than the "
                f"lease (lease_fraction * ttl = {self.lease:.3g} s), or the id lapses "
                "between renewals"
            )
        if self.replicas < 1:
            raise ConfigurationError(f"replicas must be >= 1, got {self.replicas}")

    @property
    def lease(self) -> float:
        """Seconds ids may be issued after a renewal was sent."""
        return self.ttl * self.lease_fraction


class _State(enum.Enum):
    UNOPENED = "unopened"
    OPEN = "open"
    CLOSED = "closed"


class MachineIdLease:
    """A machine id leased from ``<prefix>_machines``, renewed in the background:
    a :class:`~clstr.ids.MachineIdSource` for one :class:`~clstr.ids.Snowflake`.

    Use it as an async context manager (or :meth:`start` / :meth:`close`).
    Starting takes the lowest free id; it raises
    :class:`~clstr.errors.MachineIdUnavailableError` when all 1024 are leased.
    If a renewal finds the key lost (it expired while the node was cut off,
    and maybe another node took it), the lease takes a new id by itself; in
    between, and whenever the lease has run out, :meth:`machine_id` raises.
    Closing marks the key released: the id is free for another node at once,
    whose ids start after the last millisecond this one used.

    Needs a :class:`~clstr.transports.nats.NatsTransport` (JetStream on, a
    nats-server >= 2.11 for per-key TTLs). ``owner`` (a node id, say) is
    written into the key for people looking at the bucket.
    """

    def __init__(
        self,
        transport: NatsTransport,
        *,
        prefix: str = DEFAULT_PREFIX,
        owner: str = "",
        settings: LeaseSettings | None = None,
    ) -> None:
        self.settings = settings or LeaseSettings()
        self.bucket = bucket_name(prefix, "machines")
        self._transport = transport
        # The token tells our writes from any other lease's, this process's included.
        self._about = {
            "owner": owner,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "token": secrets.token_hex(8),
        }
        self._value = json.dumps(self._about).encode()
        self._state = _State.UNOPENED
        self._js: Any = None
        self._kv: Any = None
        self._held: int | None = None
        self._revision = 0
        self._valid_until = 0.0  # time.monotonic()
        #: The last ms the held id's previous holder used, and the last we used.
        self._floor_ms = -1
        self._last_ms = -1
        self._task: asyncio.Task[None] | None = None
        self._lapse: asyncio.TimerHandle | None = None
        self._changed = asyncio.Event()

    # -- the MachineIdSource side --------------------------------------------

    def machine_id(self, ms: int) -> int:
        """The id held now, to use in millisecond ``ms``; raises
        :class:`~clstr.errors.MachineIdUnavailableError` while none is (not
        started, lost, lapsed or closed) or while ``ms`` is not past the last
        millisecond the id's previous holder used."""
        held = self._held
        if held is None:
            raise MachineIdUnavailableError(self._why_none())
        if time.monotonic() >= self._valid_until:
            raise MachineIdUnavailableError(
                f"the lease on machine id {held} in {self.bucket} ran out (not renewed for "
                f"{self.settings.lease:.3g} s: is NATS reachable?); ids resume once it is renewed"
            )
        if ms <= self._floor_ms:
            raise MachineIdUnavailableError(
                f"machine id {held} was used until ms {self._floor_ms} by its previous holder "
                f"and this clock reads ms {ms}: it is {self._floor_ms - ms + 1} ms behind that "
                "node's; retry then (and check the hosts' clock sync)"
            )
        if ms > self._last_ms:
            self._last_ms = ms
        return held

    def _why_none(self) -> str:
        if self._state is _State.UNOPENED:
            return "the machine id lease is not started; use 'async with MachineIdLease(...)'"
        if self._state is _State.CLOSED:
            return "the machine id lease is closed; its id was released"
        return (
            f"the machine id lease in {self.bucket} was lost (it expired while this node "
            "was cut off); a new id is being taken, retry in a moment"
        )

    # -- state ---------------------------------------------------------------

    @property
    def held(self) -> int | None:
        """The machine id held and not run out, or ``None``."""
        if self._held is None or time.monotonic() >= self._valid_until:
            return None
        return self._held

    async def wait_held(self) -> int:
        """Wait until a machine id is held (after a loss: a new one); return it."""
        while (held := self.held) is None:
            if self._state is _State.CLOSED:
                raise LifecycleError("the machine id lease is closed")
            await self._changed.wait()
        return held

    async def wait_lapsed(self) -> None:
        """Wait until no machine id is held (the lease ran out or was lost)."""
        while self.held is not None:
            await self._changed.wait()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    # -- lifecycle -------------------------------------------------------------

    async def start(self) -> None:
        """Open the bucket, take the lowest free id and start renewing it."""
        if self._state is not _State.UNOPENED:
            raise LifecycleError(f"the machine id lease is {self._state.value}; make a new one")
        self._js = self._transport.nc.jetstream()
        self._kv = await settling(
            lambda: open_bucket(
                self._js,
                self.bucket,
                replicas=self.settings.replicas,
                marker_ttl=self.settings.ttl,
            )
        )
        try:
            await settling(self._take)
        except BaseException:
            # Cut short (a key we created stays until its TTL runs out).
            self._held = None
            if self._lapse is not None:
                self._lapse.cancel()
            raise
        self._state = _State.OPEN
        self._task = asyncio.create_task(self._renew_loop(), name="clstr-machine-id-renew")

    async def close(self) -> None:
        """Stop renewing and mark the key released (if still ours): the id is free
        at once."""
        if self._state is _State.CLOSED:
            return
        self._state = _State.CLOSED
        if self._task is not None:
            await cancel_and_wait([self._task], insist=True)
        held, self._held = self._held, None
        self._valid_until = 0.0
        if self._lapse is not None:
            self._lapse.cancel()
        self._notify()
        if held is not None:
            # The key stays, marked released with the last ms we used (no TTL):
            # the next holder's ids start after it, whatever its clock says.
            released = {**self._about, "released": True, "last_ms": self._last_ms}
            try:
                # Conditional: a key that expired and was taken by another
                # node since is theirs, and stays. Bounded: cut off from NATS,
                # the key expires by itself.
                async with asyncio.timeout(max(self.settings.renew_interval, 1.0)):
                    await self._kv.update(
                        str(held), json.dumps(released).encode(), last=self._revision
                    )
            except Exception as exc:
                _log.info("machine id not released", machine_id=held, error=repr(exc))

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- taking and renewing ---------------------------------------------------

    async def _take(self) -> None:
        """Take the lowest id whose key is free: never written, expired, or
        released (then our ids start after its holder's last ms). One key at a
        time, so that two nodes starting at once race on the same key and
        compare-and-set settles it."""
        keys = await self._keys()
        for candidate in range(MAX_MACHINE_ID + 1):
            key = str(candidate)
            floor = -1
            sent = time.monotonic()
            try:
                if key not in keys:
                    revision = await create_with_ttl(
                        self._js, self._kv, self.bucket, key, self._value, self.settings.ttl
                    )
                else:
                    released = _released(keys[key].value)
                    if released is None:
                        continue  # a live lease
                    floor = released
                    revision = await put_with_ttl(
                        self._js,
                        self.bucket,
                        key,
                        self._value,
                        revision=int(keys[key].revision),
                        ttl=self.settings.ttl,
                    )
            except Exception as exc:
                if is_cas_failure(exc):
                    continue  # taken since we listed the keys
                raise
            self._held, self._revision = candidate, revision
            self._floor_ms = self._last_ms = floor
            self._renewed(sent)
            _log.debug("machine id taken", machine_id=candidate, bucket=self.bucket)
            await self._clock_past(floor)
            return
        raise MachineIdUnavailableError(
            f"all {MAX_MACHINE_ID + 1} machine ids in {self.bucket} are leased by live nodes; "
            "stop a node (or wait a TTL for crashed ones to expire), or use another prefix"
        )

    async def _clock_past(self, floor: int) -> None:
        """Wait until the wall clock is past ``floor`` (the previous holder's last
        ms: usually behind us, or a few ms ahead by clock skew). A clock more
        than a TTL behind is not waited for: :meth:`machine_id` says so."""
        gap = floor - time.time_ns() // 1_000_000
        if 0 <= gap <= self.settings.ttl * 1000:
            await asyncio.sleep((gap + 1) / 1000)

    async def _keys(self) -> dict[str, Any]:
        """The bucket's keys that hold a value (a live or a released lease)."""
        watcher = await self._kv.watchall(ignore_deletes=True)
        try:
            entries: dict[str, Any] = {}
            async for entry in watcher:
                if entry is None:
                    break
                entries[entry.key] = entry
            return entries
        finally:
            await stop_watcher(watcher)

    async def _renew(self) -> None:
        held = self._held
        assert held is not None
        sent = time.monotonic()
        for attempt in range(2):
            try:
                self._revision = await put_with_ttl(
                    self._js,
                    self.bucket,
                    str(held),
                    self._value,
                    revision=self._revision,
                    ttl=self.settings.ttl,
                    timeout=self.settings.renew_interval,
                )
            except Exception as exc:
                if not is_cas_failure(exc):
                    raise
            else:
                self._renewed(sent)
                return
            # A renewal we gave up on may have landed after all (nats-py sends
            # what it buffered while disconnected): the key is then still ours,
            # at a revision we never heard of.
            revision = await self._our_revision(held) if attempt == 0 else None
            if revision is None:
                break
            self._revision = revision
        # Expired while we could not renew, and maybe taken since: it may be
        # another node's now. Stop issuing with it, take another.
        _log.warning("machine id lost; taking a new one", machine_id=held, bucket=self.bucket)
        self._held = None
        self._notify()
        await self._take()

    async def _our_revision(self, machine_id: int) -> int | None:
        """The revision of ``machine_id``'s key if it still holds our value (each
        lease writes a token of its own), else ``None``."""
        try:
            entry = await self._kv.get(str(machine_id))
        except Exception as exc:
            _log.debug("machine id key unreadable", machine_id=machine_id, error=repr(exc))
            return None
        return int(entry.revision) if entry.value == self._value else None

    def _renewed(self, sent: float) -> None:
        self._valid_until = sent + self.settings.lease
        if self._lapse is not None:
            self._lapse.cancel()
        loop = asyncio.get_running_loop()
        self._lapse = loop.call_later(self._valid_until - time.monotonic(), self._lapsed)
        self._notify()

    def _lapsed(self) -> None:
        remaining = self._valid_until - time.monotonic()
        if remaining > 0:  # the loop's timer may fire a hair early
            self._lapse = asyncio.get_running_loop().call_later(remaining, self._lapsed)
            return
        self._lapse = None
        _log.warning("machine id lease ran out", machine_id=self._held, bucket=self.bucket)
        self._notify()

    async def _renew_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.renew_interval)
            try:
                if self._held is None:
                    await self._take()
                else:
                    await self._renew()
            except Exception as exc:
                # Never let renewal die: the next tick tries again (the id
                # lapses by itself meanwhile, and the generator stops).
                _log.warning("machine id renewal failed", bucket=self.bucket, error=repr(exc))


def _released(value: bytes | None) -> int | None:
    """The last ms of a released lease's value, or ``None`` for a live lease
    (or anything that is not one of our values: it is left alone)."""
    try:
        about = json.loads(value or b"")
    except ValueError:
        return None
    if isinstance(about, dict) and about.get("released") is True:
        last_ms = about.get("last_ms")
        return last_ms if isinstance(last_ms, int) else -1
    return None
