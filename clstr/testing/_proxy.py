"""A TCP proxy that can cut, stall or slow a connection on command: partitions,
black holes and distant regions against a real server."""

from __future__ import annotations

import asyncio
import collections
import contextlib
from types import TracebackType
from typing import Self

__all__ = ["TcpProxy"]


class _Direction:
    """One way through the proxy: whether it flows now."""

    def __init__(self) -> None:
        self.flowing = asyncio.Event()
        self.flowing.set()


class TcpProxy:
    """Forwards ``127.0.0.1:<port>`` to ``upstream`` until :meth:`cut` is called.

    ``cut()`` closes every open connection and refuses new ones (the client
    sees its server vanish); ``heal()`` accepts connections again.
    ``stall()`` keeps the connections open but moves nothing (a black hole:
    neither side notices until its own timeouts), both ways or, with
    ``upstream=False`` or ``downstream=False``, one way only (requests reach
    the server and its replies are held, say); ``resume()`` delivers what
    waited, in order. ``delay`` adds that many seconds of latency to every
    byte, each way (a distant region: a round trip costs twice the delay),
    without limiting throughput; it may be changed while connections are open.
    Use it to put one node on the far side of a partition from a real
    nats-server::

        async with TcpProxy("127.0.0.1", server.port) as proxy:
            transport = await NatsTransport.connect(proxy.url)
            await proxy.cut()   # the node loses NATS
            await proxy.heal()  # and gets it back (nats-py reconnects by itself)
    """

    def __init__(self, upstream_host: str, upstream_port: int, *, delay: float = 0.0) -> None:
        if delay < 0:
            raise ValueError(f"delay must be >= 0 seconds, got {delay}")
        self.upstream = (upstream_host, upstream_port)
        #: Seconds of latency added to each direction.
        self.delay = delay
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._open = True
        self._up = _Direction()  # client -> upstream
        self._down = _Direction()  # upstream -> client
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

    def stall(self, *, upstream: bool = True, downstream: bool = True) -> None:
        """Stop forwarding without closing anything: towards the server
        (``upstream``), towards the client (``downstream``), or both."""
        if upstream:
            self._up.flowing.clear()
        if downstream:
            self._down.flowing.clear()

    def resume(self) -> None:
        """Forward again, both ways; what was held back goes first."""
        self._up.flowing.set()
        self._down.flowing.set()

    async def heal(self) -> None:
        """Accept connections again, on the same port."""
        self._open = True
        if self._server is None:
            await self.start()

    async def stop(self) -> None:
        """Close the listener and every connection."""
        self.resume()
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
        for src, dst, direction in (
            (reader, up_writer, self._up),
            (up_reader, writer, self._down),
        ):
            task = loop.create_task(self._pipe(src, dst, direction))
            self._pipes.add(task)
            task.add_done_callback(self._pipes.discard)

    async def _pipe(
        self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, direction: _Direction
    ) -> None:
        """Read ``src`` as it comes, stamping each chunk with its arrival, and write
        each chunk to ``dst`` once its delay has passed and the direction flows:
        the delay is latency, not a pause between chunks."""
        loop = asyncio.get_running_loop()
        queue: collections.deque[tuple[float, bytes]] = collections.deque()
        arrived = asyncio.Event()
        ended = False

        async def read() -> None:
            nonlocal ended
            try:
                while data := await src.read(65536):
                    queue.append((loop.time(), data))
                    arrived.set()
            except (ConnectionError, OSError):
                pass
            finally:
                ended = True
                arrived.set()

        reading = loop.create_task(read())
        try:
            while True:
                if not queue:
                    if ended:
                        break
                    arrived.clear()
                    await arrived.wait()
                    continue
                stamp, data = queue[0]
                wait = stamp + self.delay - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)  # the chunk's latency, not a poll
                await direction.flowing.wait()
                queue.popleft()
                dst.write(data)
                await dst.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            reading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reading
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
