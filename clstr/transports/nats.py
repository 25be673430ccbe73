"""The NATS transport (nats-py): moves bytes over a real NATS system.

Requests use nats-py's shared reply inbox (one wildcard subscription per
connection, not one per request). NATS "no responders" becomes
:class:`~clstr.NoShardOwnerError` at once. Subscriptions are flushed before
:meth:`NatsTransport.subscribe` returns, so a node only reports a shard as
served once the server routes its messages. Replies are plain publishes: no
request headers are echoed back.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import nats
import nats.errors
import structlog
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription as NatsSubscription

from ..errors import (
    ConnectionFailedError,
    LimitExceededError,
    NoShardOwnerError,
    RequestTimeoutError,
    TransportClosedError,
    TransportError,
)
from .base import ConnectionEvent, MessageCallback, Subscription, Transport

__all__ = ["NatsOptions", "NatsTransport"]

_log = structlog.get_logger("clstr.transport.nats")


@dataclass(frozen=True, slots=True, kw_only=True)
class NatsOptions:
    """Connection settings for :meth:`NatsTransport.connect`.

    ``connect_deadline`` bounds the initial connection over all servers:
    past it (or at once on an authorization error) ``connect`` raises
    :class:`~clstr.ConnectionFailedError` instead of retrying for minutes.
    Once connected, nats-py reconnects by itself with the reconnect settings.
    """

    name: str | None = None
    user: str | None = None
    password: str | None = None
    token: str | None = None
    credentials: str | None = None
    nkeys_seed: str | None = None
    tls: ssl.SSLContext | None = None
    tls_hostname: str | None = None
    connect_timeout: float = 2.0
    connect_deadline: float = 10.0
    allow_reconnect: bool = True
    reconnect_time_wait: float = 0.5
    max_reconnect_attempts: int = -1
    ping_interval: float = 20.0
    max_outstanding_pings: int = 2
    drain_timeout: float = 10.0
    pending_size: int = 2 * 1024 * 1024


def _is_auth_error(exc: BaseException) -> bool:
    text = str(exc).lower()
    return (
        isinstance(exc, nats.errors.AuthorizationError)
        or "authorization" in text
        or ("authentication" in text)
    )


class _NatsSubscription(Subscription):
    def __init__(self, sub: NatsSubscription) -> None:
        self.subject = sub.subject
        self._sub = sub

    async def drain(self) -> None:
        with contextlib.suppress(nats.errors.Error):
            await self._sub.drain()  # type: ignore[no-untyped-call]

    async def unsubscribe(self) -> None:
        with contextlib.suppress(nats.errors.Error):
            await self._sub.unsubscribe()


class NatsTransport(Transport):
    """A :class:`~clstr.transports.Transport` over a nats-py connection.

    Build it with :meth:`connect` (the transport then owns the connection and
    drains it on :meth:`close`) or wrap a connection you manage yourself.
    """

    def __init__(self, nc: NatsClient, *, owns_connection: bool = False) -> None:
        self.nc = nc
        self._owns = owns_connection
        self._subs: list[_NatsSubscription] = []
        self._closed = False

    @classmethod
    async def connect(
        cls,
        servers: str | Sequence[str] = "nats://127.0.0.1:4222",
        options: NatsOptions | None = None,
    ) -> NatsTransport:
        """Connect to NATS; ``servers`` may list several URLs to fail over between.

        Raises :class:`~clstr.ConnectionFailedError` naming the servers and the
        last error when no server accepts the connection within
        ``options.connect_deadline``, and at once on bad credentials.
        """
        opts = options or NatsOptions()
        urls = [servers] if isinstance(servers, str) else list(servers)
        if not urls:
            raise ConnectionFailedError("no NATS server URL given; pass at least one")
        nc = NatsClient()
        holder: list[NatsTransport] = []
        connecting = True
        seen: list[BaseException] = []
        auth_failed = asyncio.Event()

        async def error_cb(exc: Exception) -> None:
            if connecting:
                seen.append(exc)
                if _is_auth_error(exc):
                    auth_failed.set()
                return
            _log.warning("nats error", error=str(exc), error_type=type(exc).__name__)

        def tell(event: ConnectionEvent) -> None:
            for transport in holder:
                transport._notify(event)

        async def disconnected_cb() -> None:
            if not connecting:
                _log.warning("nats disconnected", name=opts.name)
                tell(ConnectionEvent.DISCONNECTED)

        async def reconnected_cb() -> None:
            _log.info("nats reconnected", name=opts.name, url=str(nc.connected_url))
            tell(ConnectionEvent.RECONNECTED)

        async def closed_cb() -> None:
            if not connecting:
                tell(ConnectionEvent.CLOSED)

        kwargs: dict[str, Any] = {
            "servers": urls,
            "name": opts.name,
            "user": opts.user,
            "password": opts.password,
            "token": opts.token,
            "tls": opts.tls,
            "tls_hostname": opts.tls_hostname,
            "connect_timeout": opts.connect_timeout,
            "allow_reconnect": opts.allow_reconnect,
            "reconnect_time_wait": opts.reconnect_time_wait,
            "max_reconnect_attempts": opts.max_reconnect_attempts,
            "ping_interval": opts.ping_interval,
            "max_outstanding_pings": opts.max_outstanding_pings,
            "drain_timeout": opts.drain_timeout,
            "pending_size": opts.pending_size,
            "error_cb": error_cb,
            "disconnected_cb": disconnected_cb,
            "reconnected_cb": reconnected_cb,
            "closed_cb": closed_cb,
        }
        if opts.credentials:
            kwargs["user_credentials"] = opts.credentials
        if opts.nkeys_seed:
            kwargs["nkeys_seed"] = opts.nkeys_seed
        connect = asyncio.ensure_future(nc.connect(**kwargs))
        auth_wait = asyncio.ensure_future(auth_failed.wait())
        try:
            await asyncio.wait(
                {connect, auth_wait},
                timeout=opts.connect_deadline,
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            auth_wait.cancel()
            connecting = False
        if connect.done() and not connect.cancelled() and connect.exception() is None:
            transport = cls(nc, owns_connection=True)
            holder.append(transport)
            return transport
        connect.cancel()
        with contextlib.suppress(BaseException):
            await connect
        with contextlib.suppress(Exception):
            await nc.close()
        last = seen[-1] if seen else (connect.exception() if not connect.cancelled() else None)
        reason = (
            "the server refused the credentials (authorization violation)"
            if auth_failed.is_set()
            else f"no server answered within {opts.connect_deadline}s"
        )
        raise ConnectionFailedError(
            f"cannot connect to NATS at {', '.join(urls)}: {reason}"
            + (f" (last error: {type(last).__name__}: {last})" if last else "")
            + "; check the URLs, that nats-server runs, and the credentials"
        ) from last

    @property
    def max_payload(self) -> int:
        return int(self.nc.max_payload)

    def _check_open(self) -> None:
        if self._closed or self.nc.is_closed:
            raise TransportClosedError("NATS transport is closed; create a new one")

    async def request(self, subject: str, data: bytes, timeout: float) -> bytes:
        self._check_open()
        try:
            msg = await self.nc.request(subject, data, timeout=timeout)
        except nats.errors.NoRespondersError:
            raise NoShardOwnerError(f"no responders on {subject!r}") from None
        except nats.errors.TimeoutError:
            raise RequestTimeoutError(f"no reply on {subject!r} within {timeout:.3f}s") from None
        except nats.errors.MaxPayloadError as exc:
            raise LimitExceededError(
                f"message of {len(data)} bytes is over the server's max_payload "
                f"of {self.max_payload} bytes"
            ) from exc
        except (nats.errors.ConnectionClosedError, nats.errors.ConnectionDrainingError) as exc:
            raise TransportClosedError("NATS connection is closed or draining") from exc
        except nats.errors.Error as exc:
            raise TransportError(f"NATS request on {subject!r} failed: {exc}") from exc
        return bytes(msg.data)

    async def publish(self, subject: str, data: bytes) -> None:
        self._check_open()
        try:
            await self.nc.publish(subject, data)
        except nats.errors.MaxPayloadError as exc:
            raise LimitExceededError(
                f"message of {len(data)} bytes is over the server's max_payload "
                f"of {self.max_payload} bytes"
            ) from exc
        except (nats.errors.ConnectionClosedError, nats.errors.ConnectionDrainingError) as exc:
            raise TransportClosedError("NATS connection is closed or draining") from exc
        except nats.errors.Error as exc:
            raise TransportError(f"NATS publish on {subject!r} failed: {exc}") from exc

    async def subscribe(
        self, subject: str, callback: MessageCallback, *, queue: str | None = None
    ) -> Subscription:
        self._check_open()

        async def deliver(msg: Msg) -> None:
            callback(msg.data, msg.reply or None)

        try:
            sub = await self.nc.subscribe(subject, queue=queue or "", cb=deliver)
            # A round trip to the server: once it answers, it routes to us.
            await self.nc.flush()
        except nats.errors.Error as exc:
            raise TransportError(f"cannot subscribe to {subject!r}: {exc}") from exc
        wrapped = _NatsSubscription(sub)
        self._subs.append(wrapped)
        return wrapped

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._owns:
            if not self.nc.is_closed:
                with contextlib.suppress(nats.errors.Error, asyncio.TimeoutError):
                    await self.nc.drain()
                if not self.nc.is_closed:
                    await self.nc.close()
        else:
            for sub in self._subs:
                await sub.unsubscribe()
        self._subs.clear()
