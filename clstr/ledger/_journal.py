"""The ledger's durable side on JetStream: one journal (stream) per bucket, the
epochs of the nodes that append to them, and the index of open reservations.

The journal is the source of truth. Each account has one subject in its
bucket's journal, and every append to it is conditional on the last sequence
of that subject (``Nats-Expected-Last-Subject-Sequence``): an owner whose view
of the account is stale (another cluster's owner, or a node that lost the
account's shard without knowing it yet) cannot append; it reads what it missed
and decides again. Each append also carries a message id made of the account
and the nonce, so that JetStream drops a repeated publish within its duplicate
window.

nats-py is imported where used; the journal needs a NATS transport with
JetStream (the ledger's store).
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass
from typing import Any, Final

import msgpack
from blake3 import blake3

from ..errors import ClstrError
from ..transports.base import Transport
from ..transports.jetstream import bucket_name, is_cas_failure, open_bucket, settling
from ._settings import LedgerSettings

__all__ = [
    "DueHold",
    "Journal",
    "JournalConflict",
    "StoreUnavailableError",
    "account_token",
    "is_unavailable",
]

_TOKEN: Final = re.compile(r"[A-Za-z0-9_-]{1,200}")
# A reservation index key: its expiry (so the sweeper reads only the due ones) and a hash.
_HOLD_KEY: Final = re.compile(r"x(\d{13})\.([0-9a-f]{32})")


class JournalConflict(ClstrError):
    """Another writer appended to the account since the position this one knew."""


class StoreUnavailableError(ClstrError):
    """The store did not answer an append in time (or the connection to it is
    down): whether the event landed is unknown until the journal is read again."""


def is_unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` says the store could not be asked or did not answer (as
    opposed to answering no)."""
    import nats.errors
    import nats.js.errors

    return isinstance(
        exc,
        nats.errors.TimeoutError
        | nats.errors.NoRespondersError
        | nats.errors.ConnectionClosedError
        | nats.errors.ConnectionReconnectingError
        | nats.errors.StaleConnectionError
        | nats.js.errors.NoStreamResponseError,
    )


def account_token(account: str) -> str:
    """The subject token of ``account``: itself when it is plain
    (``A-Z a-z 0-9 _ -``), else ``=`` and its base64url (subject- and KV-safe)."""
    if _TOKEN.fullmatch(account):
        return account
    return "=" + base64.urlsafe_b64encode(account.encode()).decode().rstrip("=")


def _account_of_token(token: str) -> str:
    if not token.startswith("="):
        return token
    raw = token[1:]
    return base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)).decode()


@dataclass(frozen=True, slots=True)
class DueHold:
    """A reservation past its expiry, as the index knows it."""

    key: str
    bucket: str
    account: str
    reservation: str
    expires_at_ms: int


class Journal:
    """The JetStream side of the ledger (see the module docstring)."""

    def __init__(self, transport: Transport, settings: LedgerSettings) -> None:
        nc = getattr(transport, "nc", None)
        if nc is None:
            raise ClstrError(
                "the ledger keeps its journal in JetStream: give it a NatsTransport "
                "connected to a server with JetStream"
            )
        self._js = nc.jetstream(timeout=settings.store_timeout)
        self.settings = settings
        self._prefix = settings.store_prefix
        self._streams: set[str] = set()
        self._buckets: dict[str, Any] = {}

    # -- names --------------------------------------------------------------------------

    def stream(self, bucket: str) -> str:
        """The journal (stream) name of ``bucket``."""
        return bucket_name(self._prefix, f"ledger_{bucket}")

    def subject(self, bucket: str, account: str) -> str:
        """The subject of ``account``'s events in ``bucket``'s journal."""
        return f"{self._prefix}.ledger.{bucket}.{account_token(account)}"

    def msg_id(self, bucket: str, account: str, nonce: str) -> str:
        """The JetStream message id of the event of ``nonce`` on an account."""
        return blake3(f"{bucket}\0{account}\0{nonce}".encode()).hexdigest()[:32]

    # -- the journal ----------------------------------------------------------------------

    async def _ensure(self, bucket: str) -> str:
        """The journal of ``bucket``, created when missing."""
        name = self.stream(bucket)
        if name in self._streams:
            return name
        import nats.js.errors

        settings = self.settings
        config = {
            "name": name,
            "subjects": [f"{self._prefix}.ledger.{bucket}.*"],
            "num_replicas": settings.replicas,
            "duplicate_window": settings.duplicate_window,
            "allow_direct": True,
            # Events are immutable: nobody deletes or purges them.
            "deny_delete": True,
            "deny_purge": True,
        }
        try:
            await settling(lambda: self._js.add_stream(**config))
        except nats.js.errors.BadRequestError:
            await self._js.stream_info(name)  # created by another node meanwhile
        self._streams.add(name)
        return name

    async def _exists(self, bucket: str) -> str | None:
        """The journal of ``bucket`` when it exists (reads never create one)."""
        name = self.stream(bucket)
        if name in self._streams:
            return name
        import nats.js.errors

        try:
            await self._js.stream_info(name)
        except nats.js.errors.NotFoundError:
            return None
        self._streams.add(name)
        return name

    async def append(
        self, bucket: str, account: str, body: bytes, *, expected: int, msg_id: str
    ) -> tuple[int, bool]:
        """Append ``body`` to the account's subject if its last event is still at
        position ``expected`` (0: none yet). Returns the position and whether
        JetStream took it for a duplicate of ``msg_id`` (the position is then the
        original's). Raises :class:`JournalConflict` when another writer was first."""
        stream = await self._ensure(bucket)
        try:
            ack = await self._js.publish(
                self.subject(bucket, account),
                body,
                stream=stream,
                headers={
                    "Nats-Msg-Id": msg_id,
                    "Nats-Expected-Last-Subject-Sequence": str(expected),
                },
            )
        except Exception as exc:
            if is_cas_failure(exc):
                raise JournalConflict(
                    f"{bucket}/{account} has events past position {expected}"
                ) from exc
            if is_unavailable(exc):
                raise StoreUnavailableError(
                    f"the ledger's store did not take the event of {bucket}/{account} "
                    f"({type(exc).__name__})"
                ) from exc
            raise
        return int(ack.seq), bool(ack.duplicate)

    async def next_after(
        self, bucket: str, account: str, position: int
    ) -> tuple[int, bytes] | None:
        """The account's first event after ``position`` (its position and body), or
        ``None`` when there is none."""
        import nats.js.errors

        stream = await self._exists(bucket)
        if stream is None:
            return None
        try:
            msg = await self._js.get_msg(
                stream,
                seq=position + 1,
                subject=self.subject(bucket, account),
                next=True,
                direct=True,
            )
        except nats.js.errors.NotFoundError:
            return None
        return int(msg.seq), bytes(msg.data or b"")

    async def read(self, bucket: str, position: int) -> tuple[str, bytes] | None:
        """The account and body of the event at ``position`` of ``bucket``'s journal."""
        import nats.js.errors

        stream = await self._exists(bucket)
        if stream is None:
            return None
        try:
            msg = await self._js.get_msg(stream, seq=position, direct=True)
        except nats.js.errors.NotFoundError:
            return None
        return _account_of_token(str(msg.subject).rsplit(".", 1)[-1]), bytes(msg.data or b"")

    async def last(self, bucket: str, account: str) -> tuple[int, bytes] | None:
        """The account's last event (position and body), or ``None``."""
        import nats.js.errors

        stream = await self._exists(bucket)
        if stream is None:
            return None
        try:
            msg = await self._js.get_last_msg(stream, self.subject(bucket, account), direct=True)
        except nats.js.errors.NotFoundError:
            return None
        return int(msg.seq), bytes(msg.data or b"")

    async def accounts(self, bucket: str) -> list[str]:
        """Every account with at least one event in ``bucket``."""
        stream = await self._exists(bucket)
        if stream is None:
            return []
        info = await self._js.stream_info(
            stream, subjects_filter=f"{self._prefix}.ledger.{bucket}.*"
        )
        subjects = info.state.subjects or {}
        return [_account_of_token(subject.rsplit(".", 1)[-1]) for subject in subjects]

    # -- node epochs ----------------------------------------------------------------------

    async def next_epoch(self, node_id: str) -> int:
        """Take the next epoch of ``node_id`` (1 on its first start): with its own
        sequence, it makes the ids of the events this run appends unique."""
        import nats.js.errors

        kv = await self._bucket("ledger_epochs")
        key = account_token(node_id)  # KV keys take its characters too
        while True:
            try:
                entry = await kv.get(key)
            except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
                entry = None
            epoch = 1 if entry is None or not entry.value else int(entry.value) + 1
            try:
                if entry is None:
                    await kv.create(key, str(epoch).encode())
                else:
                    await kv.update(key, str(epoch).encode(), last=entry.revision)
            except Exception as exc:
                if is_cas_failure(exc):
                    continue  # another run of the same node id took one: take the next
                raise
            return epoch

    # -- open reservations ------------------------------------------------------------------

    @staticmethod
    def hold_key(bucket: str, account: str, reservation: str, expires_at_ms: int) -> str:
        digest = blake3(f"{bucket}\0{account}\0{reservation}".encode()).hexdigest()[:32]
        return f"x{expires_at_ms:013d}.{digest}"

    async def index_hold(
        self, bucket: str, account: str, reservation: str, expires_at_ms: int
    ) -> None:
        """Remember an open reservation for the expiry sweeper (before its hold is
        appended: the index holds every open reservation, and maybe closed ones)."""
        kv = await self._bucket("ledger_holds")
        value = msgpack.packb([bucket, account, reservation, expires_at_ms], use_bin_type=True)
        await kv.put(self.hold_key(bucket, account, reservation, expires_at_ms), value)

    async def unindex_hold(
        self, bucket: str, account: str, reservation: str, expires_at_ms: int
    ) -> None:
        """Forget a reservation that is closed."""
        kv = await self._bucket("ledger_holds")
        await kv.purge(self.hold_key(bucket, account, reservation, expires_at_ms))

    async def due_holds(self, now_ms: int, *, limit: int = 1000) -> list[DueHold]:
        """Indexed reservations whose expiry is past, oldest first (at most ``limit``)."""
        import nats.js.errors

        kv = await self._bucket("ledger_holds")
        try:
            keys = await kv.keys()
        except nats.js.errors.NoKeysError:
            return []
        due = sorted(
            (int(m.group(1)), key)
            for key in keys
            if (m := _HOLD_KEY.fullmatch(key)) is not None and int(m.group(1)) <= now_ms
        )
        found = []
        for _, key in due[:limit]:
            try:
                entry = await kv.get(key)
            except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
                continue
            if not entry.value:
                continue
            bucket, account, reservation, expires = msgpack.unpackb(entry.value, raw=False)
            found.append(DueHold(key, bucket, account, reservation, int(expires)))
        return found

    async def forget_hold_key(self, key: str) -> None:
        """Drop an index entry by its key (the sweeper, for a closed reservation)."""
        kv = await self._bucket("ledger_holds")
        await kv.purge(key)

    async def _bucket(self, what: str) -> Any:
        bucket = self._buckets.get(what)
        if bucket is None:
            name = bucket_name(self._prefix, what)
            bucket = await settling(
                lambda: open_bucket(self._js, name, replicas=self.settings.replicas)
            )
            self._buckets[what] = bucket
        return bucket
