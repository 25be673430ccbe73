"""The NATS transport against a real nats-server: what only it can get wrong.

Connecting (and giving up on a connection), draining on close, subscriptions
confirmed before ``subscribe`` returns, and one reply subscription per
connection however many requests wait.
"""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
import pytest_asyncio

import clstr.transports.nats as nats_transport
from clstr import Client, ConfigurationError
from clstr.testing import NatsServer, TcpProxy
from clstr.transports.nats import NatsConnection, NatsOptions, NatsTransport

from _support import eventually


@pytest.fixture
def connections(monkeypatch: pytest.MonkeyPatch) -> list[NatsConnection]:
    """Every nats-py connection NatsTransport.connect makes during the test."""
    made: list[NatsConnection] = []

    class Recorded(NatsConnection):
        def __init__(self) -> None:
            super().__init__()
            made.append(self)

    monkeypatch.setattr(nats_transport, "NatsConnection", Recorded)
    return made


class SilentServer:
    """Accepts TCP connections and never says a word (a NATS server that hangs)."""

    def __init__(self) -> None:
        self.accepted = asyncio.Event()
        self.url = ""
        self._server: asyncio.Server | None = None

    async def _hold(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted.set()
        await reader.read()  # until the client hangs up
        writer.close()

    async def __aenter__(self) -> SilentServer:
        self._server = await asyncio.start_server(self._hold, "127.0.0.1", 0)
        self.url = f"nats://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()


def tasks_left(before: set[asyncio.Task[Any]]) -> list[str]:
    """Tasks started since ``before`` that still run (the silent server's own aside)."""
    return [
        repr(task.get_coro())
        for task in asyncio.all_tasks() - before
        if not task.done()
        and task is not asyncio.current_task()
        and not getattr(task.get_coro(), "__qualname__", "").endswith("SilentServer._hold")
    ]


class TestConnect:
    @pytest.mark.parametrize("via", ["transport", "client"])
    async def test_cancelled_connect_leaves_nothing_behind(
        self, via: str, connections: list[NatsConnection]
    ) -> None:
        """Cancelling NatsTransport.connect (or Client.connect) while the server has
        not answered yet raises CancelledError, leaves no task running and closes
        the nats-py client."""
        options = NatsOptions(connect_timeout=30, connect_deadline=60, allow_reconnect=False)
        async with SilentServer() as server:
            before = asyncio.all_tasks()
            connect: Awaitable[object] = (
                NatsTransport.connect(server.url, options)
                if via == "transport"
                else Client.connect(server.url, num_shards=4, nats_options=options)
            )
            attempt = asyncio.ensure_future(connect)
            await server.accepted.wait()  # connected, waiting for the server's INFO
            attempt.cancel()
            with pytest.raises(asyncio.CancelledError):
                await attempt
            assert tasks_left(before) == []
            assert len(connections) == 1
            assert connections[0].is_closed

    async def test_client_refusing_its_settings_closes_the_connection(
        self, clstr_nats_url: str, connections: list[NatsConnection]
    ) -> None:
        """Client.connect with a setting the client refuses raises it and does not
        leave the connection it made open."""
        with pytest.raises(ConfigurationError, match="timeout"):
            await Client.connect(clstr_nats_url, num_shards=4, timeout=0)
        assert len(connections) == 1
        assert connections[0].is_closed


class TestClose:
    async def test_close_drains_messages_already_on_their_way(
        self, clstr_nats_server: NatsServer
    ) -> None:
        """Messages the server routed to a subscription before close() are still
        delivered: close drains (unsubscribe, then read up to the server's PONG)
        instead of dropping the connection at once."""
        got: list[bytes] = []
        async with TcpProxy("127.0.0.1", clstr_nats_server.port) as proxy:
            receiver = await NatsTransport.connect(proxy.url, NatsOptions(name="receiver"))
            sender = await NatsTransport.connect(clstr_nats_server.url, NatsOptions(name="sender"))
            try:
                await receiver.subscribe("drain.test", lambda data, reply: got.append(data))
                proxy.stall()  # what the server sends the receiver now waits in the proxy
                for i in range(100):
                    sender.publish_nowait("drain.test", b"%d" % i)
                await sender.nc.flush()  # the server has routed all of them
                closing = asyncio.create_task(receiver.close())
                await eventually(lambda: receiver.nc.is_draining or receiver.nc.is_closed)
                proxy.resume()
                await closing
                assert got == [b"%d" % i for i in range(100)]
            finally:
                await receiver.close()
                await sender.close()


class TestSubscribe:
    async def test_message_sent_right_after_subscribe_is_delivered(
        self, clstr_nats_server: NatsServer
    ) -> None:
        """Once subscribe() returns, the server routes to it: a message published at
        once from another connection arrives (no sleep in between). The subscriber
        sits behind a proxy, so an unconfirmed SUB would still be on its way."""
        async with TcpProxy("127.0.0.1", clstr_nats_server.port) as proxy:
            subscriber = await NatsTransport.connect(proxy.url)
            publisher = await NatsTransport.connect(clstr_nats_server.url)
            try:
                for i in range(20):
                    arrived = asyncio.Event()
                    await subscriber.subscribe(f"flush.test.{i}", lambda d, r, e=arrived: e.set())
                    await publisher.publish(f"flush.test.{i}", b"x")
                    async with asyncio.timeout(5):
                        await arrived.wait()
            finally:
                await subscriber.close()
                await publisher.close()


@pytest.fixture(scope="module")
def monitored_server() -> Iterator[NatsServer]:
    """A nats-server with HTTP monitoring, to ask it about subscriptions."""
    with NatsServer(monitor=True, jetstream=False) as server:
        yield server


def subscriptions_of(server: NatsServer, name: str) -> list[str]:
    """The subjects the server holds for the connection named ``name`` (connz)."""
    with urllib.request.urlopen(f"{server.monitor_url}/connz?subs=1", timeout=5) as response:
        connz = json.load(response)
    (conn,) = [c for c in connz["connections"] if c.get("name") == name]
    return list(conn.get("subscriptions_list", []))


@pytest_asyncio.fixture
async def echo_pair(
    monitored_server: NatsServer,
) -> AsyncIterator[Callable[[], Awaitable[tuple[NatsTransport, NatsTransport]]]]:
    made: list[NatsTransport] = []

    async def make() -> tuple[NatsTransport, NatsTransport]:
        responder = await NatsTransport.connect(monitored_server.url, NatsOptions(name="echo"))
        requester = await NatsTransport.connect(monitored_server.url, NatsOptions(name="requester"))
        made.extend((responder, requester))
        return responder, requester

    try:
        yield make
    finally:
        for transport in made:
            await transport.close()


class TestReplySubscription:
    async def test_many_concurrent_requests_share_one_reply_subscription(
        self,
        monitored_server: NatsServer,
        echo_pair: Callable[[], Awaitable[tuple[NatsTransport, NatsTransport]]],
    ) -> None:
        """200 requests in flight at once use one wildcard reply subscription (the
        server's own count), not one per request, and each gets its own reply."""
        responder, requester = await echo_pair()
        held: list[tuple[bytes, str]] = []
        all_in = asyncio.Event()

        def hold(data: bytes, reply: str | None) -> None:
            assert reply is not None
            held.append((data, reply))
            if len(held) == 200:
                all_in.set()

        await responder.subscribe("echo", hold)
        calls = [asyncio.create_task(requester.request("echo", b"%d" % i, 10)) for i in range(200)]
        await all_in.wait()  # every request is waiting for its reply now
        subs = await asyncio.to_thread(subscriptions_of, monitored_server, "requester")
        assert len(subs) == 1
        assert subs[0].endswith(".*")
        for data, reply in held:
            responder.publish_nowait(reply, b"re:" + data)
        assert await asyncio.gather(*calls) == [b"re:%d" % i for i in range(200)]
