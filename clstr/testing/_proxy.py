"""A TCP proxy that can cut a connection on command: partitions against a real server."""

from __future__ import annotations

import asyncio
import contextlib
from types import TracebackType
from typing import Self

__all__ = ["TcpProxy"]


class TcpProxy:
    """Forwards ``127.0.0.1:<port>`` to ``upstream`` until :meth:`cut` is called.

    ``cut()`` closes every open connection and refuses new ones (the client
    sees its server vanish); ``heal()`` accepts connections again.
    ``stall()`` keeps the connections open but moves nothing in either
    direction (a black hole: neither side notices until its own timeouts),
    and ``resume()`` delivers what waited, in order. Use it to
    put one node on the far side of a partition from a real nats-server::

        async with TcpProxy("127.0.0.1", server.port) as proxy:
            transport = await NatsTransport.connect(proxy.url)
            await proxy.cut()   # the node loses NATS
            await proxy.heal()  # and gets it back (nats-py reconnects by itself)
    """

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._open = True
        self._flowing = asyncio.Event()
        self._flowing.set()
        self.port = 0

    @property
    def url(self) -> str:
        """``nats://127.0.0.1:<port>`` of the proxy."""
        return f"nats://127.0.0.1:{self.port}"

    async def start(self) -> None:
        """Listen on a free port."""
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def cut(self) -> None:
        """Drop every connection and refuse new ones (connection refused) until
        :meth:`heal`."""
        self._open = False
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()

    def stall(self) -> None:
        """Stop forwarding, both ways, without closing anything."""
        self._flowing.clear()

    def resume(self) -> None:
        """Forward again; what was held back goes first."""
        self._flowing.set()

    async def heal(self) -> None:
        """Accept connections again, on the same port."""
        self._open = True
        if self._server is None:
            await self.start()

    async def stop(self) -> None:
        """Close the listener and every connection."""
        self._flowing.set()
        await self.cut()
        for task in list(self._pipes):
            task.cancel()
        if self._pipes:
            await asyncio.wait(self._pipes)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self._open:
            await _close(writer)
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            await _close(writer)
            return
        self._writers.update((writer, up_writer))
        loop = asyncio.get_running_loop()
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = loop.create_task(self._pipe(src, dst))
            self._pipes.add(task)
            task.add_done_callback(self._pipes.discard)

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while data := await src.read(65536):
                await self._flowing.wait()
                dst.write(data)
                await dst.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            self._writers.discard(dst)
            await _close(dst)

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


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.transport.abort()
    writer.close()
    with contextlib.suppress(Exception):
        await writer.wait_closed()
