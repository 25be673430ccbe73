"""The client: hashes keys to shards, builds envelopes, sends, maps errors.

One deadline per request: the call's ``timeout`` and the envelope's TTL are
the same budget (see :mod:`clstr.client._budget` for how it is split).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
import os
import sys
import time
from collections.abc import AsyncGenerator, Sequence
from functools import partial
from types import TracebackType
from typing import Any, Final, Self, TypeVar

from .._clock import monotonic
from ..codec import (
    DEFAULT_LIMITS,
    Limits,
    check_limits,
    decode_payload,
    decode_reply,
    encode_payload,
    encode_request,
)
from ..envelope import _NO_HEADERS, Envelope, EnvelopeOption, _envelope
from ..errors import (
    ConfigurationError,
    DeadlineExceededError,
    LimitExceededError,
    MissingKeyError,
    NoShardOwnerError,
    RequestError,
    RequestTimeoutError,
    ShardOutOfRangeError,
    TransportClosedError,
)
from ..hashing import ShardCache, ShardMapper
from ..metrics import NOOP_METRICS, Metrics
from ..protocol import (
    DEFAULT_PREFIX,
    INTERRUPT_TYPE,
    entity_key,
    entity_type_name,
    shard_subject,
)
from ..tracing import NOOP_TRACING, NoopTracing, Tracing
from ..transports.base import Transport
from ._budget import node_budget as _node_budget
from ._retry import MIN_ATTEMPT, RetryPolicy
from ._scoped import ScopedClient
from ._stream import interrupt_request, receive_stream
from ._traced import traced_stream, with_trace

__all__ = [
    "Client",
    "ClientState",
    "ScopedClient",
    "DEFAULT_TIMEOUT",
]

T = TypeVar("T")

#: Default credit window of a streamed reply, in chunks.
DEFAULT_WINDOW: Final = 64

#: Default request timeout (and so TTL), in seconds.
DEFAULT_TIMEOUT: Final = 5.0


class ClientState(enum.Enum):
    """Lifecycle of a :class:`Client`."""

    OPEN = "open"
    CLOSED = "closed"


# Read per call: a module global is cheaper than the enum's class attribute.
_CLOSED: Final = ClientState.CLOSED


class Client:
    """Routes requests and notifications to the node that owns each key.

    ``num_shards``, ``seed`` and ``prefix`` must match the nodes'.
    ``timeout`` is the default request deadline in seconds; ``options`` are
    envelope options (:func:`~clstr.with_header`, :func:`~clstr.with_ttl`)
    applied to every envelope before the per-call ones. With a ``retry``
    policy, requests that meet a retryable error (no owner, not owner,
    overloaded) are sent again with jittered backoff until their deadline,
    under one request id so that the node never applies them twice. With a
    ``tracing``, every call is a span continued on the node (docs/observability.md).
    """

    def __init__(
        self,
        transport: Transport,
        *,
        num_shards: int,
        seed: str = "",
        prefix: str = DEFAULT_PREFIX,
        timeout: float = DEFAULT_TIMEOUT,
        options: Sequence[EnvelopeOption] = (),
        limits: Limits = DEFAULT_LIMITS,
        metrics: Metrics = NOOP_METRICS,
        tracing: Tracing = NOOP_TRACING,
        retry: RetryPolicy | None = None,
        interrupt_on_cancel: bool = True,
        owns_transport: bool = False,
    ) -> None:
        if not timeout > 0:
            raise ConfigurationError(f"timeout must be > 0 seconds, got {timeout!r}")
        self._mapper = ShardMapper(num_shards, seed)
        # Keys repeat: a dict look-up instead of a BLAKE3 digest per call.
        self._shard_of = ShardCache(self._mapper)
        self.num_shards = num_shards
        self.seed = seed
        self.prefix = prefix
        self.transport = transport
        self.timeout = timeout
        self.options = tuple(options)
        self.limits = limits
        self.metrics = metrics
        self.retry = retry
        self._owns_transport = owns_transport
        #: Cancelling a request's awaiting task interrupts its handler too.
        self.interrupt_on_cancel = interrupt_on_cancel
        self._metered = metrics is not NOOP_METRICS
        self.tracing = tracing
        self._traced = not isinstance(tracing, NoopTracing)  # (the no-op one is never called)
        self.state = ClientState.OPEN
        self._subjects = [shard_subject(prefix, s) for s in range(num_shards)]
        # Request ids: 96 random bits per client and a counter, unique across
        # clients as a UUID is, without a system call per request.
        self._id_prefix = os.urandom(12).hex() + "."
        self._ids = itertools.count(1)

    @classmethod
    async def connect(
        cls,
        servers: str | Sequence[str] = "nats://127.0.0.1:4222",
        *,
        num_shards: int,
        nats_options: Any = None,
        **kwargs: Any,
    ) -> Client:
        """Connect to NATS and return a client that owns (and closes) the connection.

        ``nats_options`` is a :class:`~clstr.transports.nats.NatsOptions`;
        the other keyword arguments are those of :class:`Client`.
        """
        from ..transports.nats import NatsTransport

        transport = await NatsTransport.connect(
            servers, nats_options, metrics=kwargs.get("metrics", NOOP_METRICS)
        )
        try:
            return cls(transport, num_shards=num_shards, owns_transport=True, **kwargs)
        except BaseException:
            # A setting the client refuses: the connection must not outlive it.
            await transport.close()
            raise

    # -- routing ------------------------------------------------------------

    def shard_for(self, key: str | bytes) -> int:
        """The shard ``key`` belongs to."""
        return self._mapper.shard(key)

    def _check_shard(self, shard: int) -> None:
        if not isinstance(shard, int) or not 0 <= shard < self.num_shards:
            raise ShardOutOfRangeError(f"shard {shard!r} is out of range 0..{self.num_shards - 1}")

    def _check_open(self) -> None:
        if self.state is _CLOSED:
            raise TransportClosedError("client is closed; create a new Client to send again")

    def _build(
        self,
        shard: int,
        msg_type: str,
        data: bytes,
        key: str | None,
        options: Sequence[EnvelopeOption],
        request_id: str | None,
        stream: int = 0,
    ) -> Envelope:
        self._check_open()
        self._check_shard(shard)
        if not isinstance(msg_type, str) or not msg_type:
            raise ConfigurationError(f"message type must be a non-empty str, got {msg_type!r}")
        if data.__class__ is not bytes and not isinstance(data, bytearray | memoryview | bytes):
            raise TypeError(
                f"data must be bytes, got {type(data).__name__}; "
                "use client.key(k).request(obj) for typed payloads"
            )
        env = _envelope(
            msg_type,
            data if data.__class__ is bytes else bytes(data),
            shard,
            key,
            _NO_HEADERS,
            None,
            time.time(),
            request_id,
            None,
            stream,
        )
        limits = self.limits
        if self.options or options:
            for option in (*self.options, *options):
                env = option(env)
            check_limits(env, limits)
        elif (
            len(msg_type) + (len(key) if key else 0) + (len(request_id) if request_id else 0)
        ) * 4 > limits._strings_fit:
            # (Shorter strings, even at 4 UTF-8 bytes a character, break no limit.)
            check_limits(env, limits)
        return env

    def _budget(self, env: Envelope, timeout: float | None) -> float:
        """Seconds the call may take: ``timeout`` (default the client's), capped by
        the time left of a TTL an option set."""
        budget = self.timeout if timeout is None else timeout
        if not budget > 0:
            raise ConfigurationError(f"timeout must be > 0 seconds, got {budget!r}")
        if env.deadline is not None:
            budget = min(budget, env.deadline - monotonic())
        return budget

    def _encode(
        self, env: Envelope, ttl: float | None = None, created_at: float | None = None
    ) -> bytes:
        body = encode_request(env, ttl=ttl, created_at=created_at)
        if len(body) > self.transport.max_payload:
            raise LimitExceededError(
                f"message of {len(body)} bytes is over the transport's max_payload of "
                f"{self.transport.max_payload} bytes; send less data per message"
            )
        return body

    def build_request(
        self,
        shard: int,
        msg_type: str,
        data: bytes = b"",
        *,
        key: str | None = None,
        options: Sequence[EnvelopeOption] = (),
        request_id: str | None = None,
    ) -> tuple[Envelope, bytes]:
        """The envelope and the v1 body a request to ``shard`` would carry, without
        sending it (persisted messages are published with it): the client's and
        the call's options applied, the limits and the transport's
        ``max_payload`` checked (:class:`~clstr.LimitExceededError`). The body
        carries a TTL only when an option set one."""
        env = self._build(shard, msg_type, data, key, options, request_id)
        return env, self._encode(env)

    # -- raw API --------------------------------------------------------------

    async def request_shard(
        self,
        shard: int,
        msg_type: str,
        data: bytes = b"",
        *,
        key: str | None = None,
        timeout: float | None = None,
        options: Sequence[EnvelopeOption] = (),
        request_id: str | None = None,
    ) -> bytes:
        """Send a request to ``shard`` and return the reply's payload.

        One deadline: ``timeout`` (default the client's), capped by the time
        left of a TTL an option set. The call waits at most that long; the
        envelope carries the same deadline less the reply reserve (see the
        :mod:`~clstr.client._budget`), so that a handler too slow for it ends in
        the node's :class:`~clstr.HandlerTimeoutError` rather than the caller's
        own timeout.

        Raises :class:`NoShardOwnerError` at once when no node serves the
        shard, :class:`~clstr.RequestTimeoutError` (or the node's
        :class:`~clstr.HandlerTimeoutError`) past the deadline, and the
        :class:`~clstr.RequestError` subclass for any error the node replied.
        """
        retry = self.retry
        if retry is not None and request_id is None:
            # The id makes the retries one request: the node answers a retried id
            # with the first reply instead of running the handler again.
            request_id = f"{self._id_prefix}{next(self._ids)}"
        env = self._build(shard, msg_type, data, key, options, request_id)
        budget = self._budget(env, timeout)
        deadline = monotonic() + budget
        started = time.perf_counter() if self._metered else 0.0
        ok = False
        span = self.tracing.start_call("request", msg_type, shard, key) if self._traced else None
        try:
            attempt = 0
            last: RequestError | None = None
            while True:
                left = deadline - monotonic() if attempt else budget
                if left <= MIN_ATTEMPT and last is not None:
                    # The backoff ate the deadline: the last answer stands (better
                    # than a timeout of an attempt that had no time to succeed).
                    raise last
                wait = left
                if retry is not None and retry.attempt_timeout is not None:
                    wait = min(left, retry.attempt_timeout)
                # The handler may use the whole deadline even when the client
                # re-sends sooner: the TTL is what is left, not the attempt's wait.
                # The TTL goes on the wire as given: no copy of the envelope per attempt.
                # A retry is a new message: stamped now, or a node would judge the
                # shrinking TTL against the first attempt's time and call it stale.
                stamp = time.time() if attempt else None
                sent = env if span is None else with_trace(env, span, attempt + 1, self.limits)
                body = self._encode(sent, ttl=_node_budget(left), created_at=stamp)
                try:
                    try:
                        reply = await self.transport.request(self._subjects[shard], body, wait)
                    except asyncio.CancelledError:
                        if self.interrupt_on_cancel:
                            self._interrupt_nowait(env, stamp)
                            if span is not None:
                                span.event("clstr.interrupt", {"clstr.attempt": attempt + 1})
                        raise
                    payload = decode_reply(reply, limits=self.limits)
                except RequestError as exc:
                    if retry is None:
                        raise
                    attempt += 1
                    lost = isinstance(exc, RequestTimeoutError) and wait < left
                    pause = retry.pause_after(exc, attempt, deadline - monotonic(), lost=lost)
                    if pause is None:
                        raise
                    self.metrics.request_retried(msg_type, exc.code)
                    if span is not None:
                        span.retry(attempt, exc.code, pause)
                    last = exc
                    await asyncio.sleep(pause)
                    continue
                ok = True
                return payload
        except NoShardOwnerError:
            self.metrics.transport_error("no_subscriber")
            raise
        except DeadlineExceededError:
            self.metrics.transport_error("timeout")
            raise
        finally:
            if self._metered:
                self.metrics.request_completed(msg_type, ok, time.perf_counter() - started)
            if span is not None:  # (not ok: the exception on its way out is this call's)
                span.end(None if ok else sys.exc_info()[1])

    async def request_key(
        self,
        key: str,
        msg_type: str,
        data: bytes = b"",
        *,
        timeout: float | None = None,
        options: Sequence[EnvelopeOption] = (),
        request_id: str | None = None,
    ) -> bytes:
        """Send a request to the owner of ``key``; see :meth:`request_shard`."""
        return await self.request_shard(
            self._shard_of_key(key),
            msg_type,
            data,
            key=key,
            timeout=timeout,
            options=options,
            request_id=request_id,
        )

    async def notify_shard(
        self,
        shard: int,
        msg_type: str,
        data: bytes = b"",
        *,
        key: str | None = None,
        options: Sequence[EnvelopeOption] = (),
    ) -> None:
        """Publish to ``shard`` and return at once: no reply, no waiting.

        Nothing tells the caller whether a node handled it; give it a TTL
        (``with_ttl``) so that a message nobody takes in time is dropped.
        """
        env = self._build(shard, msg_type, data, key, options, None)
        span = None
        if self._traced:
            span = self.tracing.start_call("notify", msg_type, shard, key)
            env = with_trace(env, span, 1, self.limits)
        ok = False
        try:
            await self.transport.publish(self._subjects[shard], self._encode(env))
            ok = True
        finally:
            if self._metered:
                self.metrics.notify_completed(msg_type, ok)
            if span is not None:
                span.end(None if ok else sys.exc_info()[1])

    async def notify_key(
        self,
        key: str,
        msg_type: str,
        data: bytes = b"",
        *,
        options: Sequence[EnvelopeOption] = (),
    ) -> None:
        """Publish to the owner of ``key``; see :meth:`notify_shard`."""
        await self.notify_shard(self._shard_of_key(key), msg_type, data, key=key, options=options)

    def _shard_of_key(self, key: str) -> int:
        if not isinstance(key, str):
            raise TypeError(f"key must be str, got {type(key).__name__}")
        if not key:
            raise MissingKeyError("key must not be empty; every key-routed call needs a key")
        return self._shard_of[key]

    # -- streamed replies -------------------------------------------------

    def stream_shard(
        self,
        shard: int,
        msg_type: str,
        data: bytes = b"",
        *,
        key: str | None = None,
        window: int = DEFAULT_WINDOW,
        timeout: float | None = None,
        options: Sequence[EnvelopeOption] = (),
    ) -> AsyncGenerator[bytes, None]:
        """Ask ``shard`` for a streamed reply and iterate its chunks, in order.

        The node has at most ``window`` chunks unacknowledged: reading slowly
        holds its handler. ``timeout`` (default the client's) bounds the whole
        stream. Leaving the loop early (``break``, an exception, cancellation)
        cancels the handler; for cleanup at a known point, wrap the iterator in
        ``contextlib.aclosing``. Raises the :class:`~clstr.RequestError` of an
        error frame, :class:`~clstr.RequestTimeoutError` past the deadline.
        """
        if not isinstance(window, int) or window < 1:
            raise ConfigurationError(f"window must be an int >= 1, got {window!r}")
        env = self._build(shard, msg_type, data, key, options, None, window)
        budget = self._budget(env, timeout)
        ttl = _node_budget(budget)
        body = self._encode(env, ttl=ttl)  # (its errors are raised here, traced or not)
        frames = partial(
            receive_stream,
            self.transport,
            self._subjects[shard],
            window=window,
            budget=budget,
            limits=self.limits,
            abandon=partial(self._interrupt_nowait, env, None),
        )
        if self._traced:  # one span over the whole stream, from its first iteration
            return traced_stream(
                self.tracing, env, frames, partial(self._encode, ttl=ttl), self.limits
            )
        return frames(body)

    def stream_key(
        self,
        key: str,
        msg_type: str,
        data: bytes = b"",
        *,
        window: int = DEFAULT_WINDOW,
        timeout: float | None = None,
        options: Sequence[EnvelopeOption] = (),
    ) -> AsyncGenerator[bytes, None]:
        """A streamed reply from the owner of ``key``; see :meth:`stream_shard`."""
        return self.stream_shard(
            self._shard_of_key(key),
            msg_type,
            data,
            key=key,
            window=window,
            timeout=timeout,
            options=options,
        )

    # -- interrupts ---------------------------------------------------------

    async def interrupt(
        self,
        request_id: str,
        *,
        key: str | None = None,
        shard: int | None = None,
        timeout: float | None = None,
    ) -> int:
        """Interrupt the request sent with ``request_id`` to ``key``'s owner (or to
        ``shard``): a running handler is cancelled and its caller gets
        :class:`~clstr.RequestInterruptedError`; a queued one never runs. Returns
        how many were interrupted (0: done already, or unknown there)."""
        return await self._send_interrupt({"id": request_id}, key, shard, timeout)

    async def interrupt_current(self, key: str, *, timeout: float | None = None) -> int:
        """Interrupt whatever ``key`` (an entity's key, say) runs or has queued now."""
        return await self._send_interrupt({"current": True}, key, None, timeout)

    async def _send_interrupt(
        self, target: dict[str, Any], key: str | None, shard: int | None, timeout: float | None
    ) -> int:
        if shard is None:
            if key is None:
                raise ConfigurationError("interrupt needs the request's key or shard")
            shard = self._shard_of_key(key)
        reply = await self.request_shard(
            shard, INTERRUPT_TYPE, encode_payload(target), key=key, timeout=timeout
        )
        return decode_payload(reply, int)

    def _interrupt_nowait(self, env: Envelope, stamp: float | None) -> None:
        """Interrupt ``env``'s handler from a cancelled request (never waits): by its
        id, or by its fingerprint and timestamp when it has none."""
        with contextlib.suppress(Exception):  # closed, say: the request's own error stands
            self.transport.publish_nowait(self._subjects[env.shard], interrupt_request(env, stamp))

    # -- scoped clients -----------------------------------------------------

    def key(self, key: str, *options: EnvelopeOption) -> ScopedClient:
        """A client bound to ``key``: every call goes to its owner, with the key."""
        return ScopedClient(self, self._shard_of_key(key), key, options)

    def entity(
        self, entity_type: type | str, entity_id: str, *options: EnvelopeOption
    ) -> ScopedClient:
        """A client bound to one entity: ``entity_type`` is an entity class (its
        ``type_name``, else its name) or a type name; calls go to the entity's owner
        with the key ``<type>/<id>`` (see :func:`~clstr.protocol.entity_key`)::

            total = await client.entity(Cart, "cart-42").call(AddItem("tea"), Total)
        """
        name = entity_type if isinstance(entity_type, str) else entity_type_name(entity_type)
        return self.key(entity_key(name, entity_id), *options)

    def shard(self, shard: int, *options: EnvelopeOption) -> ScopedClient:
        """A client bound to ``shard`` (no key)."""
        self._check_shard(shard)
        return ScopedClient(self, shard, None, options)

    # -- lifecycle ----------------------------------------------------------

    async def close(self) -> None:
        """Refuse further calls; close the transport if this client owns it."""
        if self.state is ClientState.CLOSED:
            return
        self.state = ClientState.CLOSED
        if self._owns_transport:
            await self.transport.close()

    async def __aenter__(self) -> Self:
        self._check_open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
