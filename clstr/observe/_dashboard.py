"""The live dashboard: a small web page of the cluster, served by the standard library.

``GET /`` is the page (``static/``: HTML, CSS and a little JavaScript, no
build step, no charting library: the sparklines are SVG drawn here).
``GET /events`` streams the cluster's snapshot as Server-Sent Events, one
event per change (at least one a poll, a comment every 15 s to keep proxies
from closing the stream); ``GET /api/state`` returns it once, as JSON.
The data comes from :class:`~._collector.ClusterWatch`, which reads only what
clstr publishes, so the dashboard works against any running cluster.

One HTTP request per connection; a request head over 16 KiB or slower than
10 s is dropped. Bound to loopback (the default), the server also refuses
requests whose ``Host`` is not a loopback name, so that a web page elsewhere
cannot read the cluster's state through DNS rebinding.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable, Sequence
from importlib import resources
from types import TracebackType
from typing import Final, Self
from urllib.parse import urlsplit, urlunsplit

import structlog

from .._tasks import cancel_and_wait
from ..errors import ConfigurationError, LifecycleError
from ..transports.nats import NatsOptions, NatsTransport
from ._collector import ClusterWatch
from ._settings import DashboardSettings

__all__ = ["DEFAULT_DASHBOARD_PORT", "Dashboard", "serve_dashboard"]

#: The port ``clstr dashboard`` serves on unless told otherwise.
DEFAULT_DASHBOARD_PORT: Final = 8470

_log = structlog.get_logger("clstr.dashboard")
_STATIC: Final = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/index.html": ("index.html", "text/html; charset=utf-8"),
    "/dashboard.js": ("dashboard.js", "text/javascript; charset=utf-8"),
    "/dashboard.css": ("dashboard.css", "text/css; charset=utf-8"),
}
_HEAD_LIMIT: Final = 16 * 1024
_HEAD_TIMEOUT: Final = 10.0
_KEEPALIVE: Final = 15.0
_STOP_GRACE: Final = 2.0
_LOOPBACK_NAMES: Final = frozenset({"localhost", "127.0.0.1", "::1", "[::1]"})
_SECURITY_HEADERS: Final = (
    "Content-Security-Policy: default-src 'self'; script-src 'self'; style-src 'self'; "
    "img-src 'self' data:; connect-src 'self'; base-uri 'none'; frame-ancestors 'none'\r\n"
    "X-Content-Type-Options: nosniff\r\n"
    "Referrer-Policy: no-referrer\r\n"
    "Cache-Control: no-store\r\n"
)
_REASONS: Final = {
    200: "OK",
    204: "No Content",
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
}


def _display_url(servers: Sequence[str]) -> str:
    """The server URLs without credentials (they would show on the page)."""
    shown = []
    for url in servers:
        parts = urlsplit(url)
        if parts.username or parts.password:
            host = parts.hostname or ""
            netloc = f"[{host}]" if ":" in host else host
            if parts.port is not None:
                netloc += f":{parts.port}"
            url = urlunsplit(parts._replace(netloc=netloc))
        shown.append(url)
    return ",".join(shown)


class Dashboard:
    """The dashboard's HTTP server and its cluster watch, started and stopped together.

    ``nats_url`` (one URL, a comma-separated list or a sequence) and
    ``options`` say how to reach NATS; ``connect`` replaces both with a
    coroutine function of your own. ``num_shards`` ``None`` takes the count the
    nodes announce; ``seed`` must be the nodes' for "moving" to be right.
    ``port`` 0 takes any free port; :attr:`url` then says which.

    :meth:`start` raises :class:`ConfigurationError` when the address cannot
    be bound. An unreachable cluster is no error: the page says so and the
    dashboard keeps trying.
    """

    def __init__(
        self,
        nats_url: str | Sequence[str] = "nats://127.0.0.1:4222",
        *,
        options: NatsOptions | None = None,
        connect: Callable[[], Awaitable[NatsTransport]] | None = None,
        prefix: str = "clstr",
        num_shards: int | None = None,
        seed: str = "",
        service_name: str = "clstr",
        host: str = "127.0.0.1",
        port: int = DEFAULT_DASHBOARD_PORT,
        settings: DashboardSettings | None = None,
    ) -> None:
        servers = [u for u in nats_url.split(",") if u] if isinstance(nats_url, str) else nats_url
        self.settings = settings or DashboardSettings()
        self.host = host
        self.port = port
        if connect is None:
            opts = options or NatsOptions(
                name="clstr-dashboard", connect_deadline=self.settings.connect_timeout
            )

            async def connect_nats() -> NatsTransport:
                return await NatsTransport.connect(list(servers), opts)

            connect = connect_nats
        self.watch = ClusterWatch(
            connect,
            nats_url=_display_url(servers),
            prefix=prefix,
            num_shards=num_shards,
            seed=seed,
            service_name=service_name,
            settings=self.settings,
        )
        self._files: dict[str, bytes] = {}
        self._server: asyncio.Server | None = None
        self._clients: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._encoded: tuple[int, bytes] = (-1, b"")

    @property
    def url(self) -> str:
        """The page's address (the port is the bound one once started)."""
        host = self.host if self.host not in ("", "0.0.0.0", "::") else "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}/"

    # -- lifecycle ------------------------------------------------------------

    async def start(self) -> None:
        """Bind the server and start watching the cluster."""
        if self._server is not None:
            raise LifecycleError("the dashboard is already started")
        self._files = await asyncio.to_thread(_load_static)
        try:
            self._server = await asyncio.start_server(
                self._serve, self.host, self.port, limit=_HEAD_LIMIT
            )
        except OSError as exc:
            raise ConfigurationError(
                f"cannot serve the dashboard on {self.host}:{self.port}: "
                f"{exc.strerror or exc}; choose another port (0 takes any free one)"
            ) from exc
        self.port = self._server.sockets[0].getsockname()[1]
        await self.watch.start()
        _log.info("dashboard serving", url=self.url)

    async def stop(self) -> None:
        """Stop the watch, end every open page's stream, close the server.

        The connection handlers are tasks asyncio's stream server made: they
        are ended by closing their connections, not cancelled (asyncio 3.11
        logs a cancelled one as an error).
        """
        server, self._server = self._server, None
        if server is not None:
            server.close()
        await self.watch.stop()  # wakes the streams: they see it and return
        for writer in list(self._writers):
            writer.transport.abort()
        if self._clients:
            await asyncio.wait(set(self._clients), timeout=_STOP_GRACE)
        await cancel_and_wait(list(self._clients), insist=True)
        if server is not None:
            await server.wait_closed()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # -- HTTP -------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._clients.add(task)
        self._writers.add(writer)
        try:
            await self._handle(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass  # the browser went away, or sent nonsense
        except TimeoutError:
            pass  # no request head within _HEAD_TIMEOUT
        finally:
            self._clients.discard(task)
            self._writers.discard(writer)
            writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async with asyncio.timeout(_HEAD_TIMEOUT):
            head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            await _respond(writer, 400, "text/plain", b"bad request line\n")
            return
        method, target, _ = parts
        headers = {
            name.strip().lower(): value.strip()
            for name, _, value in (line.partition(":") for line in lines[1:] if line)
        }
        if not self._host_allowed(headers.get("host", "")):
            await _respond(writer, 403, "text/plain", b"this dashboard answers to localhost only\n")
            return
        if method != "GET":
            await _respond(writer, 405, "text/plain", b"only GET\n", extra="Allow: GET\r\n")
            return
        path = urlsplit(target).path
        if path in _STATIC:
            name, kind = _STATIC[path]
            await _respond(writer, 200, kind, self._files[name])
        elif path == "/api/state":
            await _respond(writer, 200, "application/json", self._snapshot_json())
        elif path == "/events":
            await self._stream(writer)
        elif path == "/favicon.ico":
            await _respond(writer, 204, "text/plain", b"")
        else:
            await _respond(writer, 404, "text/plain", b"not found\n")

    def _host_allowed(self, host_header: str) -> bool:
        if self.host not in ("127.0.0.1", "::1", "localhost"):
            return True  # served on purpose to other machines
        name = host_header.rsplit(":", 1)[0] if not host_header.endswith("]") else host_header
        return name.lower() in _LOOPBACK_NAMES

    def _snapshot_json(self) -> bytes:
        """The current snapshot, encoded once per version for every open page."""
        watch = self.watch
        if self._encoded[0] != watch.version:
            body = json.dumps(watch.snapshot, separators=(",", ":")).encode()
            self._encoded = (watch.version, body)
        return self._encoded[1]

    async def _stream(self, writer: asyncio.StreamWriter) -> None:
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            + _SECURITY_HEADERS.encode()
            + b"Connection: close\r\nX-Accel-Buffering: no\r\n\r\nretry: 2000\n\n"
        )
        version = -1
        watch = self.watch
        while not watch.stopped:
            if watch.version != version:
                version = watch.version
                writer.write(b"data: " + self._snapshot_json() + b"\n\n")
            else:
                writer.write(b": keepalive\n\n")
            await writer.drain()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_KEEPALIVE):
                    await watch.changed(version)


async def _respond(
    writer: asyncio.StreamWriter, status: int, kind: str, body: bytes, *, extra: str = ""
) -> None:
    head = (
        f"HTTP/1.1 {status} {_REASONS[status]}\r\n"
        f"Content-Type: {kind}\r\nContent-Length: {len(body)}\r\n"
        f"{_SECURITY_HEADERS}{extra}Connection: close\r\n\r\n"
    )
    writer.write(head.encode("latin-1") + body)
    await writer.drain()


def _load_static() -> dict[str, bytes]:
    folder = resources.files(__package__).joinpath("static")
    return {
        name: folder.joinpath(name).read_bytes() for name in {name for name, _ in _STATIC.values()}
    }


async def serve_dashboard(
    nats_url: str | Sequence[str] = "nats://127.0.0.1:4222",
    *,
    options: NatsOptions | None = None,
    connect: Callable[[], Awaitable[NatsTransport]] | None = None,
    prefix: str = "clstr",
    num_shards: int | None = None,
    seed: str = "",
    service_name: str = "clstr",
    host: str = "127.0.0.1",
    port: int = DEFAULT_DASHBOARD_PORT,
    settings: DashboardSettings | None = None,
    ready: Callable[[Dashboard], None] | None = None,
) -> None:
    """Serve the dashboard until cancelled (see :class:`Dashboard` for the arguments).

    ``ready`` is called with the started dashboard (its :attr:`~Dashboard.url`
    names the bound port). Raises :class:`ConfigurationError` when the
    address cannot be bound.
    """
    dashboard = Dashboard(
        nats_url,
        options=options,
        connect=connect,
        prefix=prefix,
        num_shards=num_shards,
        seed=seed,
        service_name=service_name,
        host=host,
        port=port,
        settings=settings,
    )
    async with dashboard:
        if ready is not None:
            ready(dashboard)
        await asyncio.get_running_loop().create_future()
