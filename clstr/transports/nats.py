"""The NATS transport (nats-py): moves bytes over a real NATS system.

Requests use nats-py's shared reply inbox (one wildcard subscription per
connection, not one per request). NATS "no responders" becomes
:class:`~clstr.NoShardOwnerError` at once. Subscriptions are flushed before
:meth:`NatsTransport.subscribe` returns, so a node only reports a shard as
served once the server routes its messages, and a subscription the server
refuses (a permissions violation) raises instead of staying silent. Replies
are plain publishes: no request headers are echoed back.

What nats-py reports asynchronously is logged and counted: a slow consumer
(messages dropped because the subscriber fell behind) as the
``slow_consumer`` transport error, a permissions violation as
``permission_denied``.

The connection (:class:`NatsConnection`, nats-py's client with its fast
paths) lives in ``_nats_connection.py`` and the settings
(:class:`NatsOptions`) in ``_nats_options.py``; both are importable from here.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import deque
from collections.abc import Sequence
from typing import Any, Final

import nats
import nats.errors
import structlog

from .._clock import Timeouts, expire
from ..errors import (
    ConfigurationError,
    ConnectionFailedError,
    LimitExceededError,
    NoShardOwnerError,
    RequestTimeoutError,
    TransportClosedError,
    TransportError,
)
from ..metrics import NOOP_METRICS, Metrics
from ._nats_connection import DirectCallback as DirectCallback
from ._nats_connection import NatsConnection, _abandon, _NatsSubscription
from ._nats_options import NatsOptions, _is_auth_error, _is_tls_error, _seed_options
from .base import ConnectionEvent, MessageCallback, Subscription, Transport

__all__ = ["NatsConnection", "NatsOptions", "NatsTransport"]

# How the server says that nobody listens on a request's subject (a header block
# with status 503 and no payload).
_NO_RESPONDERS: Final = b"NATS/1.0 503"


_log = structlog.get_logger("clstr.transport.nats")

# A slow consumer drops many messages in a burst: log it at most this often.
_SLOW_CONSUMER_LOG_INTERVAL: Final = 1.0
_PERMISSIONS_VIOLATION: Final = "permissions violation"


class NatsTransport(Transport):
    """A :class:`~clstr.transports.Transport` over a nats-py connection.

    Build it with :meth:`connect` (the transport then owns the connection and
    drains it on :meth:`close`) or wrap a :class:`NatsConnection` you
    connected and manage yourself.
    """

    def __init__(
        self,
        nc: NatsConnection,
        *,
        owns_connection: bool = False,
        metrics: Metrics = NOOP_METRICS,
        options: NatsOptions | None = None,
    ) -> None:
        if not isinstance(nc, NatsConnection):
            raise ConfigurationError(
                f"NatsTransport needs a clstr.transports.nats.NatsConnection, got "
                f"{type(nc).__module__}.{type(nc).__qualname__}: create the connection "
                "with NatsConnection() and connect it like a nats-py Client, "
                "or use NatsTransport.connect()"
            )
        self.nc = nc
        self.metrics = metrics
        self._owns = owns_connection
        self._opts = options or NatsOptions()
        self._subs: set[_NatsSubscription] = set()
        self._round: asyncio.Future[None] | None = None  # the next confirmation round
        self._rounds: set[asyncio.Future[None]] = set()
        self._closed = False
        # Replies to our requests: one wildcard subscription, a future per token.
        self._mux_prefix: str | None = None
        self._mux_ready: asyncio.Future[str] | None = None
        self._waiting: dict[bytes, asyncio.Future[bytes]] = {}
        self._timeouts: Timeouts[asyncio.Future[Any]] | None = None
        self._tokens = itertools.count(1)
        #: Messages nats-py dropped because a subscription fell behind.
        self.slow_consumer_drops = 0
        self._slow_logged_at = -_SLOW_CONSUMER_LOG_INTERVAL
        self._slow_since_log = 0
        # Recent permissions violations the server reported (its own words),
        # numbered so that a subscription looks only at those that came after it.
        self._denied: deque[str] = deque(maxlen=64)
        self._denied_seen = 0

    @property
    def connected_url(self) -> str | None:
        """The URL of the server the connection uses now, or ``None`` while disconnected."""
        url = self.nc.connected_url
        if url is None or not self.nc.is_connected:
            return None
        return f"{url.scheme}://{url.netloc}"

    def _on_error(self, exc: Exception) -> None:
        """Log and count what nats-py reports once connected (its error callback)."""
        if isinstance(exc, nats.errors.SlowConsumerError):
            self.slow_consumer_drops += 1
            self._slow_since_log += 1
            self.metrics.transport_error("slow_consumer")
            now = time.monotonic()
            if now - self._slow_logged_at >= _SLOW_CONSUMER_LOG_INTERVAL:
                _log.warning(
                    "slow consumer: nats-py dropped messages of a subscription that fell "
                    "behind; their requesters time out",
                    subject=exc.subject,
                    dropped=self._slow_since_log,
                    dropped_total=self.slow_consumer_drops,
                )
                self._slow_logged_at = now
                self._slow_since_log = 0
            return
        text = str(exc)
        if _PERMISSIONS_VIOLATION in text.lower():
            self._denied.append(text)
            self._denied_seen += 1
            self.metrics.transport_error("permission_denied")
            _log.warning("nats permissions violation", error=text)
            return
        _log.warning("nats error", error=text, error_type=type(exc).__name__)

    def _denied_subscription(self, subject: str, since: int) -> str | None:
        """The server's refusal of a subscription to ``subject`` among the violations
        reported after the ``since``-th one, if it sent one."""
        recent = list(self._denied)[max(0, len(self._denied) - (self._denied_seen - since)) :]
        for text in recent:
            if "subscription" in text.lower() and f'"{subject}"' in text:
                return text
        return None

    @classmethod
    async def connect(
        cls,
        servers: str | Sequence[str] = "nats://127.0.0.1:4222",
        options: NatsOptions | None = None,
        *,
        metrics: Metrics = NOOP_METRICS,
    ) -> NatsTransport:
        """Connect to NATS; ``servers`` may list several URLs to fail over between.

        Raises :class:`~clstr.ConnectionFailedError` naming the servers and the
        last error when no server accepts the connection within
        ``options.connect_deadline``, and at once on refused credentials or a
        TLS certificate that does not verify. ``metrics`` counts what nats-py
        reports later (``slow_consumer``, ``permission_denied`` transport errors).
        """
        opts = options or NatsOptions()
        urls = [servers] if isinstance(servers, str) else list(servers)
        if not urls:
            raise ConnectionFailedError("no NATS server URL given; pass at least one")
        nc = NatsConnection()
        holder: list[NatsTransport] = []
        connecting = True
        seen: list[BaseException] = []
        # Why retrying cannot help (refused credentials, TLS), what to check, the error.
        fatal: list[tuple[str, str, BaseException]] = []
        gave_up = asyncio.Event()

        async def error_cb(exc: Exception) -> None:
            if connecting:
                seen.append(exc)
                if _is_auth_error(exc):
                    fatal.append(
                        (
                            "the server refused the credentials (authorization violation)",
                            "check the user and password, token, nkey seed or credentials file",
                            exc,
                        )
                    )
                    gave_up.set()
                elif _is_tls_error(exc):
                    fatal.append(
                        (
                            "the TLS handshake failed",
                            "check the CA the client trusts, its client certificate, "
                            "and the server's certificate and TLS settings",
                            exc,
                        )
                    )
                    gave_up.set()
                return
            if holder:
                holder[0]._on_error(exc)
            else:  # pragma: no cover - between connect and the transport's creation
                _log.warning("nats error", error=str(exc), error_type=type(exc).__name__)

        def tell(event: ConnectionEvent) -> None:
            for transport in holder:
                transport._notify(event)

        async def disconnected_cb() -> None:
            if not connecting and not (holder and holder[0]._closed):
                _log.warning("nats disconnected", name=opts.name)
                tell(ConnectionEvent.DISCONNECTED)

        async def reconnected_cb() -> None:
            url = nc.connected_url
            _log.info(
                "nats reconnected",
                name=opts.name,
                url=f"{url.scheme}://{url.netloc}" if url is not None else None,
            )
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
            "inbox_prefix": opts.inbox_prefix,
            "dont_randomize": not opts.randomize_servers,
            "error_cb": error_cb,
            "disconnected_cb": disconnected_cb,
            "reconnected_cb": reconnected_cb,
            "closed_cb": closed_cb,
        }
        if opts.credentials:
            kwargs["user_credentials"] = opts.credentials
        if opts.nkeys_seed:
            kwargs.update(_seed_options(opts.nkeys_seed))
        connect = asyncio.create_task(nc.connect(**kwargs))
        fatal_wait = asyncio.create_task(gave_up.wait())
        connected = False
        try:
            await asyncio.wait(
                {connect, fatal_wait},
                timeout=opts.connect_deadline,
                return_when=asyncio.FIRST_COMPLETED,
            )
            connected = connect.done() and not connect.cancelled() and connect.exception() is None
        finally:
            try:
                if not connected:
                    # Timed out, refused, or the caller was cancelled: nothing of
                    # the attempt (its task, nats-py's own) may outlive it. Its
                    # callbacks stay quiet meanwhile (`connecting`).
                    await _abandon(connect, fatal_wait, nc)
                else:
                    fatal_wait.cancel()
            finally:
                connecting = False
        if connected:
            transport = cls(nc, owns_connection=True, metrics=metrics, options=opts)
            holder.append(transport)
            return transport
        last: BaseException | None
        if fatal:
            reason, advice, last = fatal[0]
        else:
            reason = f"no server answered within {opts.connect_deadline}s"
            advice = "check the URLs and that nats-server runs there"
            last = seen[-1] if seen else (connect.exception() if not connect.cancelled() else None)
        raise ConnectionFailedError(
            f"cannot connect to NATS at {', '.join(urls)}: {reason}"
            + (f" ({type(last).__name__}: {last})" if last else "")
            + f"; {advice}"
        ) from last

    @property
    def max_payload(self) -> int:
        # (What nats-py's max_payload property returns: read per message, so
        # without that second call.)
        limit: int = self.nc._max_payload
        return limit

    def _check_open(self) -> None:
        if self._closed or self.nc.is_closed:
            raise TransportClosedError("NATS transport is closed; create a new one")

    def _translate(
        self, exc: nats.errors.Error, what: str, subject: str, size: int, timeout: float = 0.0
    ) -> Exception:
        """clstr's exception for nats-py's ``exc``, most specific first."""
        if isinstance(exc, nats.errors.NoRespondersError):
            return NoShardOwnerError(f"no responders on {subject!r}")
        if isinstance(exc, nats.errors.TimeoutError):
            return RequestTimeoutError(f"no reply on {subject!r} within {timeout:.3f}s")
        if isinstance(exc, nats.errors.MaxPayloadError):
            return LimitExceededError(
                f"message of {size} bytes is over the server's max_payload "
                f"of {self.max_payload} bytes"
            )
        if isinstance(exc, nats.errors.ConnectionClosedError | nats.errors.ConnectionDrainingError):
            return TransportClosedError("NATS connection is closed or draining")
        return TransportError(f"NATS {what} on {subject!r} failed: {exc}")

    async def _reply_prefix(self) -> str:
        """The reply subject prefix of this connection's requests (subscribed once)."""
        if self._mux_prefix is not None:
            return self._mux_prefix
        if self._mux_ready is None:
            self._mux_ready = asyncio.get_running_loop().create_future()
            prefix = f"{self.nc.new_inbox()}."
            skip = len(prefix.encode())
            waiting = self._waiting

            def on_reply(subject: bytes, reply: bytes, data: bytes, headers: bytes | None) -> None:
                future = waiting.get(subject[skip:])
                if future is not None and not future.done():
                    if headers is not None and headers.startswith(_NO_RESPONDERS):
                        future.set_exception(NoShardOwnerError(f"no responders on {prefix}"))
                    else:
                        future.set_result(data)

            try:
                await self.nc.subscribe_direct(prefix + "*", on_reply)
            except BaseException as exc:
                self._mux_ready.set_exception(exc)
                self._mux_ready = None
                raise
            self._mux_prefix = prefix
            self._mux_ready.set_result(prefix)
            return prefix
        return await asyncio.shield(self._mux_ready)

    async def request(self, subject: str, data: bytes, timeout: float) -> bytes:
        # Not nc.request(): per request it draws random token bytes (a getrandom
        # system call) and waits with asyncio.wait_for (a wrapper, a second
        # future and a timer); this is one future and one timer. And errors are
        # translated only when one happens: a `with` per message costs ~1 µs.
        self._check_open()
        try:
            prefix = self._mux_prefix or await self._reply_prefix()
            token = b"%d" % next(self._tokens)
            timeouts = self._timeouts
            if timeouts is None:
                timeouts = self._timeouts = Timeouts(asyncio.get_running_loop(), expire)
            # The connection's loop, the one its reply subscription runs on (not
            # asyncio.get_running_loop(): on 3.11 a getpid() system call each).
            loop = timeouts.loop
            future: asyncio.Future[bytes] = loop.create_future()
            self._waiting[token] = future
            slot = timeouts.add(loop.time() + timeout, future)
            try:
                nc = self.nc
                nc.publish_nowait(subject, data, prefix + token.decode())
                if nc.buffer_full:  # back-pressure, as publish() applies it
                    await nc.make_room()
                return await future
            finally:
                timeouts.discard(slot, future)
                del self._waiting[token]
        except TimeoutError:
            raise RequestTimeoutError(f"no reply on {subject!r} within {timeout:.3f}s") from None
        except NoShardOwnerError:
            raise NoShardOwnerError(f"no responders on {subject!r}") from None
        except nats.errors.Error as exc:
            raise self._translate(exc, "request", subject, len(data), timeout) from exc

    async def publish(self, subject: str, data: bytes, *, reply: str | None = None) -> None:
        """Send ``data``, waiting only while nats-py's outgoing buffer is full;
        ``reply`` sets the message's reply subject."""
        self._check_open()
        nc = self.nc
        try:
            nc.publish_nowait(subject, data, reply or "")
            if nc.buffer_full:
                await nc.make_room()
        except nats.errors.Error as exc:
            raise self._translate(exc, "publish", subject, len(data)) from exc

    def new_inbox(self) -> str:
        return str(self.nc.new_inbox())

    def publish_nowait(self, subject: str, data: bytes) -> None:
        self._check_open()
        try:
            self.nc.publish_nowait(subject, data)
        except nats.errors.Error as exc:
            raise self._translate(exc, "publish", subject, len(data)) from exc

    async def subscribe(
        self, subject: str, callback: MessageCallback, *, queue: str | None = None
    ) -> Subscription:
        self._check_open()

        def deliver(_subject: bytes, reply: bytes, data: bytes, _headers: bytes | None) -> None:
            callback(data, reply.decode() if reply else None)

        since = self._denied_seen
        try:
            sub = await self.nc.subscribe_direct(subject, deliver, queue=queue or "")
        except nats.errors.Error as exc:
            raise TransportError(f"cannot subscribe to {subject!r}: {exc}") from exc
        try:
            await self._confirm()
        except BaseException as exc:
            # Not confirmed (failed or cancelled): take the interest back, or
            # nats-py would keep it, and resubscribe it after reconnects.
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()
            if isinstance(exc, nats.errors.Error):
                raise TransportError(f"cannot subscribe to {subject!r}: {exc}") from exc
            raise
        denied = self._denied_subscription(subject, since)
        if denied is not None:
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()
            raise TransportError(
                f"the NATS server refused the subscription to {subject!r} ({denied}); "
                "the connection's user lacks subscribe permission on it (see docs/security.md)"
            )
        wrapped = _NatsSubscription(sub, self._subs.discard)
        self._subs.add(wrapped)
        return wrapped

    async def _confirm(self) -> None:
        """Wait until the server has seen every subscription made so far.

        Subscriptions made in the same moment (a node taking 1024 shards) share
        one confirmation round instead of a round trip each.
        """
        round_ = self._round
        if round_ is None:
            round_ = self._round = asyncio.ensure_future(self._round_trips())
            self._rounds.add(round_)
            round_.add_done_callback(self._rounds.discard)
        await asyncio.shield(round_)

    async def _round_trips(self) -> None:
        # This runs one loop turn after the round was opened: every SUB written
        # until now precedes the PING. Later subscriptions open the next round.
        self._round = None
        # Once the server answers the PING it routes to us. A refusal (-ERR
        # permissions violation) is not ordered before that PONG, so a second
        # round trip gives it time to arrive.
        await self.nc.flush()
        await self.nc.flush()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for round_ in list(self._rounds):
            round_.cancel()
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(
                    TransportClosedError("NATS transport closed while waiting for a reply")
                )
        if self._owns:
            if not self.nc.is_closed:
                with contextlib.suppress(nats.errors.Error, asyncio.TimeoutError):
                    await self.nc.drain()
                if not self.nc.is_closed:
                    await self.nc.close()
        else:
            for sub in list(self._subs):
                await sub.unsubscribe()
        self._subs.clear()
