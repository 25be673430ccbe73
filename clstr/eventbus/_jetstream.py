"""The JetStream adapter and the log it keeps.

One stream per bus, ``<prefix>_bus_<bus>`` (:func:`~clstr.transports.jetstream.bucket_name`),
with one subject per bus shard, ``<prefix>.bus.<bus>.<shard>``, direct get
allowed (polls read with batched direct gets, no consumer state on the
server). Each frame is published with ``Nats-Msg-Id`` set to its message id
(``<producer>.<epoch>.<shard>.<first>``), so a batch retried after a lost ack
is stored once: JetStream drops the copy within the stream's duplicate
window and acknowledges it as a duplicate (counted in
:attr:`JetStreamAdapter.duplicates`).

Frames are published with ``js.publish`` (one request per frame, the frames of
a batch concurrently), not ``publish_async``: nats-py 2.16's async-publish
reply handler raises a JetStream error from inside its callback instead of
failing the future, so the future would hang until a timeout and a
permanent error would look transient.

Needs nats-server 2.11 or later (batched direct get).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Final

import structlog

from ..protocol import DEFAULT_PREFIX
from ..transports.jetstream import bucket_name, settling
from ._adapter import Adapter, bus_subject
from ._errors import (
    AdapterBackpressureError,
    AdapterConnectionError,
    AdapterError,
    AdapterSerializationError,
    ConsumerAdapterError,
    FatalAdapterError,
    TransientAdapterError,
)
from ._event import Record, encode_frames
from ._log import DEFAULT_READ_BYTES, EventLog, FrameBatch, StoredFrame

if TYPE_CHECKING:
    from ..transports.nats import NatsTransport

__all__ = ["JetStreamAdapter", "JetStreamLog", "stream_name"]

_log = structlog.get_logger("clstr.eventbus")

# Room left in a message for the frame's header block (Nats-Msg-Id).
_HEADROOM: Final = 1024
# JetStream's error codes that mean "the stream is full": retry later.
_FULL_CODES: Final = frozenset({10077, 10047, 10027})
_TOO_LARGE_CODES: Final = frozenset({10054})


def stream_name(prefix: str, bus: str) -> str:
    """The JetStream stream of ``bus`` under ``prefix``."""
    return bucket_name(prefix, f"bus_{bus}")


class JetStreamAdapter(Adapter):
    """Stores each batch in the bus's JetStream stream (see the module docstring).

    ``max_age`` (seconds) and ``max_bytes`` bound what the stream keeps (oldest
    frames go first); ``duplicate_window`` is how long message ids are
    remembered for dedupe (it must cover a batch's retries); ``ack_timeout``
    bounds the wait for one frame's acknowledgement (then the batch is retried).
    """

    kind = "jetstream"

    def __init__(
        self,
        transport: NatsTransport,
        *,
        prefix: str = DEFAULT_PREFIX,
        replicas: int = 1,
        max_age: float | None = None,
        max_bytes: int | None = None,
        duplicate_window: float = 120.0,
        ack_timeout: float = 5.0,
        memory_storage: bool = False,
    ) -> None:
        super().__init__()
        self.transport = transport
        self.prefix = prefix
        self.replicas = replicas
        self.max_age = max_age
        self.max_bytes = max_bytes
        self.duplicate_window = duplicate_window
        self.ack_timeout = ack_timeout
        self.memory_storage = memory_storage
        #: Frames JetStream acknowledged as duplicates (a retried batch's copies).
        self.duplicates = 0
        self.stream = ""
        self._js: Any = None
        self._log: JetStreamLog | None = None
        self._stream_missing = False

    async def open(self, bus: str, producer: str) -> None:
        await super().open(bus, producer)
        self.stream = stream_name(self.prefix, bus)
        self._js = self.transport.nc.jetstream()
        await settling(self._ensure_stream)
        self._log = JetStreamLog(self.transport, bus=bus, prefix=self.prefix)

    async def _ensure_stream(self) -> None:
        import nats.js.api as api
        import nats.js.errors

        config = api.StreamConfig(
            name=self.stream,
            subjects=[bus_subject(self.prefix, self.bus, "*")],
            allow_direct=True,
            duplicate_window=self.duplicate_window,
            max_age=self.max_age,
            max_bytes=self.max_bytes if self.max_bytes is not None else -1,
            num_replicas=self.replicas,
            storage=api.StorageType.MEMORY if self.memory_storage else api.StorageType.FILE,
            discard=api.DiscardPolicy.OLD,
        )
        try:
            await self._js.add_stream(config)
        except nats.js.errors.BadRequestError:
            # It exists with other settings: adopt ours where the server allows.
            try:
                await self._js.update_stream(config)
            except nats.js.errors.APIError as exc:
                _log.warning(
                    "event stream exists with other settings; using them",
                    stream=self.stream,
                    error=str(exc),
                )

    @property
    def max_frame_bytes(self) -> int:
        return self.transport.max_payload - _HEADROOM

    async def send(self, shard: int, first: int, records: Sequence[Record]) -> None:
        self._check_open()
        if self._stream_missing:
            await self._recreate()
        frames = encode_frames(self.producer, shard, first, records, self.max_frame_bytes)
        subject = bus_subject(self.prefix, self.bus, shard)
        if len(frames) == 1:
            await self._publish(subject, frames[0].msg_id, frames[0].data)
        else:
            results = await asyncio.gather(
                *(self._publish(subject, f.msg_id, f.data) for f in frames),
                return_exceptions=True,
            )
            # Retry the whole batch on any failure: dedupe drops the copies.
            for result in results:
                if isinstance(result, BaseException):
                    raise result

    async def _publish(self, subject: str, msg_id: str, data: bytes) -> None:
        import nats.js.errors

        try:
            ack = await self._js.publish(
                subject, data, timeout=self.ack_timeout, headers={"Nats-Msg-Id": msg_id}
            )
        except Exception as exc:
            if isinstance(exc, nats.js.errors.NoStreamResponseError):
                self._stream_missing = True  # deleted, or a leader election: check first
            raise translate_publish_error(exc, subject) from exc
        if ack.duplicate:
            self.duplicates += 1

    async def _recreate(self) -> None:
        """No stream answered the last publish: create it again if it was deleted (a
        retried batch then lands in the new stream); no JetStream at all is fatal."""
        import nats.js.errors

        try:
            await self._ensure_stream()
        except nats.js.errors.ServiceUnavailableError as exc:
            raise FatalAdapterError(
                f"JetStream is not available for stream {self.stream}: {exc.description}"
            ) from exc
        except Exception as exc:
            raise TransientAdapterError(f"cannot check stream {self.stream}: {exc!r}") from exc
        self._stream_missing = False

    async def flush(self) -> None:
        """Nothing to do: :meth:`send` returns once every frame is acknowledged."""

    @property
    def log(self) -> JetStreamLog | None:
        return self._log


def translate_publish_error(exc: BaseException, subject: str) -> AdapterError:
    """The adapter error for what nats-py raised while publishing to JetStream."""
    import nats.errors
    import nats.js.errors

    where = f"JetStream publish on {subject}"
    if isinstance(exc, nats.errors.ConnectionClosedError | nats.errors.ConnectionDrainingError):
        return AdapterConnectionError(f"{where}: the NATS connection is closed")
    if isinstance(exc, nats.errors.MaxPayloadError):
        return AdapterSerializationError(f"{where}: frame over the server's max_payload")
    if isinstance(
        exc, nats.errors.OutboundBufferLimitError | nats.js.errors.TooManyStalledMsgsError
    ):
        return AdapterBackpressureError(f"{where}: outgoing buffer full ({exc!r})")
    if isinstance(exc, nats.js.errors.APIError):
        code = exc.err_code or 0
        if code in _FULL_CODES or exc.code == 503:
            return AdapterBackpressureError(f"{where}: {exc.description} ({code})")
        if code in _TOO_LARGE_CODES:
            return AdapterSerializationError(f"{where}: {exc.description} ({code})")
        return FatalAdapterError(f"{where}: {exc.description} (JetStream error {code})")
    if isinstance(exc, nats.errors.Error | asyncio.TimeoutError):
        # No ack in time, no stream leader yet, a reconnect: the frame may or may
        # not be stored, and dedupe makes sending it again safe.
        return TransientAdapterError(f"{where}: {type(exc).__name__} {exc}")
    return FatalAdapterError(f"{where}: {type(exc).__name__}: {exc}")


class JetStreamLog(EventLog):
    """Reads a bus's stream: shards from the stream's subjects, frames by batched
    direct get (``$JS.API.DIRECT.GET``, ``next_by_subj`` from a sequence)."""

    def __init__(
        self,
        transport: NatsTransport,
        *,
        bus: str,
        prefix: str = DEFAULT_PREFIX,
        timeout: float = 5.0,
    ) -> None:
        self.transport = transport
        self.bus = bus
        self.prefix = prefix
        self.stream = stream_name(prefix, bus)
        self.timeout = timeout
        self._subject_prefix = bus_subject(prefix, bus, "")

    async def shards(self) -> list[int]:
        import nats.js.errors

        js = self.transport.nc.jetstream()
        try:
            info = await js.stream_info(self.stream, subjects_filter=f"{self._subject_prefix}*")
        except nats.js.errors.NotFoundError:
            return []
        except Exception as exc:
            raise ConsumerAdapterError(f"cannot list the shards of {self.stream}: {exc}") from exc
        out = []
        for subject in info.state.subjects or {}:
            tail = subject[len(self._subject_prefix) :]
            if tail.isdigit():
                out.append(int(tail))
        return sorted(out)

    async def read(
        self, shard: int, start: int, *, max_frames: int, max_bytes: int = DEFAULT_READ_BYTES
    ) -> FrameBatch:
        nc = self.transport.nc
        request = json.dumps(
            {
                "seq": max(start, 1),
                "next_by_subj": f"{self._subject_prefix}{shard}",
                "batch": max_frames,
                "max_bytes": max_bytes,
            }
        ).encode()
        try:
            inbox = nc.new_inbox()
            sub = await nc.subscribe(inbox)
        except Exception as exc:
            raise ConsumerAdapterError(f"cannot read {self.stream}: {exc}") from exc
        frames: list[StoredFrame] = []
        pending = 0
        try:
            await nc.publish(f"$JS.API.DIRECT.GET.{self.stream}", request, reply=inbox)
            while True:
                msg = await sub.next_msg(timeout=self.timeout)
                headers = msg.headers or {}
                status = headers.get("Status")
                if status is None:
                    frames.append(StoredFrame(int(headers["Nats-Sequence"]), msg.data))
                    pending = int(headers.get("Nats-Num-Pending", 0))
                    continue
                if status == "204":  # end of batch
                    pending = int(headers.get("Nats-Num-Pending", 0))
                elif status == "404":  # nothing at or after start
                    pending = 0
                else:
                    raise ConsumerAdapterError(
                        f"direct get on {self.stream} answered {status} "
                        f"{headers.get('Description', '')}"
                    )
                break
        except ConsumerAdapterError:
            raise
        except Exception as exc:
            raise ConsumerAdapterError(
                f"cannot read shard {shard} of {self.stream}: {type(exc).__name__} {exc}"
            ) from exc
        finally:
            try:
                await sub.unsubscribe()
            except Exception as exc:
                _log.debug("unsubscribe after direct get failed", error=repr(exc))
        return FrameBatch(frames, pending > 0)
