"""Limits fail with a clear error before anything is sent, on both transports.

Each refused call is followed by a valid request used as a barrier: once its
reply is back, a spy subscribed to every shard subject (and the node itself)
has seen all that was sent, and must have seen the valid request alone.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import pytest
import pytest_asyncio

from clstr import (
    BadRequestError,
    Client,
    ConfigurationError,
    Envelope,
    LimitExceededError,
    Limits,
    MemoryNetwork,
    Node,
    ShardOutOfRangeError,
    Transport,
    with_header,
)
from clstr.codec import DEFAULT_LIMITS, encode_request
from clstr.hashing import MAX_SHARDS
from clstr.testing import NatsServer
from clstr.transports.nats import NatsOptions, NatsTransport

NUM_SHARDS = 8
MAX_PAYLOAD = 4096  # a small server max_payload, so that the limit is cheap to reach


async def echo(env: Envelope) -> bytes:
    """Answers with the size of what it got."""
    return str(len(env.data)).encode()


@dataclass
class Rig:
    """A node serving every shard, a client, and a spy on every shard subject."""

    node: Node
    client: Client
    spied: list[bytes] = field(default_factory=list)

    def nothing_sent(self) -> None:
        """Assert that neither the spy nor the node saw any message."""
        assert self.spied == []
        assert self.node.stats.received == 0
        assert self.node.stats.rejected == {}

    async def barrier(self) -> None:
        """Send one valid request; once answered, the spy has seen all there was."""
        assert await self.client.request_key("barrier", "echo", b"abc") == b"3"
        assert len(self.spied) == 1
        assert self.node.stats.received == 1


@pytest.fixture(scope="module")
def small_server() -> Iterator[NatsServer]:
    """A nats-server whose max_payload is MAX_PAYLOAD."""
    with NatsServer(max_payload=MAX_PAYLOAD, jetstream=False) as server:
        yield server


@pytest_asyncio.fixture(params=["memory", "nats"])
async def rig(request: pytest.FixtureRequest) -> AsyncIterator[Rig]:
    """A :class:`Rig` on each transport, whose payload limit is MAX_PAYLOAD."""
    made: list[Transport] = []
    if request.param == "memory":
        network = MemoryNetwork(max_payload=MAX_PAYLOAD)
        made = [network.connect(n) for n in ("node", "client", "spy")]
    else:
        server: NatsServer = request.getfixturevalue("small_server")
        for name in ("node", "client", "spy"):
            made.append(await NatsTransport.connect(server.url, NatsOptions(name=name)))
    node_transport, client_transport, spy = made
    node = Node(node_transport, echo, node_id="node", num_shards=NUM_SHARDS)
    client = Client(client_transport, num_shards=NUM_SHARDS)
    rig = Rig(node, client)
    for shard in range(NUM_SHARDS):
        await spy.subscribe(f"clstr.shard.{shard}", lambda data, reply: rig.spied.append(data))
    await node.start()
    try:
        assert client.transport.max_payload == MAX_PAYLOAD
        yield rig
    finally:
        await node.stop()
        for transport in made:
            await transport.close()


def overhead(key: str, msg_type: str) -> int:
    """Bytes an envelope takes on the wire beyond its payload (within a byte or two)."""
    return len(encode_request(Envelope(msg_type, b"", key=key, ttl=5.0, id=None))) + 5


class TestPayloadLimit:
    """A message over the transport's max_payload is refused before it is sent."""

    async def test_request_over_max_payload(self, rig: Rig) -> None:
        """The error names the size and the limit; nothing reaches the node."""
        with pytest.raises(LimitExceededError, match=f"max_payload of {MAX_PAYLOAD} bytes"):
            await rig.client.request_key("k", "echo", b"x" * MAX_PAYLOAD)
        rig.nothing_sent()
        await rig.barrier()

    async def test_notify_over_max_payload(self, rig: Rig) -> None:
        """A notification over the limit is refused too, at once."""
        with pytest.raises(LimitExceededError, match="max_payload"):
            await rig.client.notify_key("k", "echo", b"x" * MAX_PAYLOAD)
        rig.nothing_sent()
        await rig.barrier()

    async def test_just_under_the_limit_goes_through(self, rig: Rig) -> None:
        """A payload that fits, with its envelope, in max_payload is delivered."""
        size = MAX_PAYLOAD - overhead("k", "echo") - 16
        assert await rig.client.request_key("k", "echo", b"x" * size) == str(size).encode()

    async def test_raw_transport_publish_over_max_payload(self, rig: Rig) -> None:
        """The transport itself refuses a body over max_payload, before sending."""
        with pytest.raises(LimitExceededError, match="max_payload"):
            await rig.client.transport.publish("clstr.shard.0", b"x" * (MAX_PAYLOAD + 1))
        rig.nothing_sent()
        await rig.barrier()


class TestEnvelopeLimits:
    """Keys, message types and headers over the documented Limits are refused before sending."""

    async def test_key_over_max_key_bytes(self, rig: Rig) -> None:
        """A key over max_key_bytes (1024 bytes of UTF-8) is refused, one that fits is not."""
        too_long = "é" * (DEFAULT_LIMITS.max_key_bytes // 2 + 1)  # 2 bytes each in UTF-8
        with pytest.raises(LimitExceededError, match="key is 1026 bytes"):
            await rig.client.request_key(too_long, "echo")
        rig.nothing_sent()
        assert await rig.client.request_key("k" * DEFAULT_LIMITS.max_key_bytes, "echo") == b"0"

    async def test_type_over_max_type_bytes(self, rig: Rig) -> None:
        """A message type over max_type_bytes (256) is refused."""
        with pytest.raises(LimitExceededError, match="message type is 257 bytes"):
            await rig.client.request_key("k", "t" * (DEFAULT_LIMITS.max_type_bytes + 1))
        rig.nothing_sent()
        await rig.barrier()

    async def test_headers_over_max_headers_bytes(self, rig: Rig) -> None:
        """Headers whose names and values exceed max_headers_bytes (16 KiB) are refused."""
        big = "v" * (DEFAULT_LIMITS.max_headers_bytes // 2)
        options = [with_header("a", big), with_header("b", big)]
        with pytest.raises(LimitExceededError, match="headers take"):
            await rig.client.request_key("k", "echo", options=options)
        rig.nothing_sent()
        await rig.barrier()

    async def test_too_many_headers(self, rig: Rig) -> None:
        """More than max_header_count (64) headers are refused."""
        options = [with_header(f"h{i}", "v") for i in range(DEFAULT_LIMITS.max_header_count + 1)]
        with pytest.raises(LimitExceededError, match="65 headers"):
            await rig.client.notify_key("k", "echo", options=options)
        rig.nothing_sent()
        await rig.barrier()

    async def test_node_enforces_its_own_limits(self, rig: Rig) -> None:
        """A sender with looser limits than the node gets bad_request, not a handler run."""
        loose = Client(
            rig.client.transport,
            num_shards=NUM_SHARDS,
            limits=Limits(max_key_bytes=4096),
        )
        with pytest.raises(BadRequestError, match="key is 2000 bytes"):
            await loose.request_key("k" * 2000, "echo")
        assert rig.node.stats.rejected == {"bad_request": 1}
        assert rig.node.stats.received == 0


class TestShardLimits:
    """num_shards and shard ids out of range are refused with a clear error."""

    @pytest.mark.parametrize("num_shards", [0, -1, MAX_SHARDS + 1, True, 2.0])
    def test_num_shards_out_of_range(self, num_shards: object) -> None:
        """Client and Node refuse num_shards outside 1..MAX_SHARDS (and non-ints)."""
        transport = MemoryNetwork().connect()
        with pytest.raises(ConfigurationError, match="num_shards"):
            Client(transport, num_shards=num_shards)  # type: ignore[arg-type]
        with pytest.raises(ConfigurationError, match="num_shards"):
            Node(transport, echo, num_shards=num_shards)  # type: ignore[arg-type]

    @pytest.mark.parametrize("shard", [-1, NUM_SHARDS, 10**9])
    async def test_shard_id_out_of_range(self, rig: Rig, shard: int) -> None:
        """A request or notification to a shard outside 0..num_shards-1 is refused."""
        with pytest.raises(ShardOutOfRangeError, match=rf"0\.\.{NUM_SHARDS - 1}"):
            await rig.client.request_shard(shard, "echo")
        with pytest.raises(ShardOutOfRangeError):
            await rig.client.notify_shard(shard, "echo")
        with pytest.raises(ShardOutOfRangeError):
            rig.client.shard(shard)
        rig.nothing_sent()
        await rig.barrier()

    def test_node_shard_list_out_of_range(self) -> None:
        """A node told to serve a shard that does not exist refuses to be built."""
        with pytest.raises(ShardOutOfRangeError, match=r"shard 8 is out of range 0\.\.7"):
            Node(MemoryNetwork().connect(), echo, num_shards=NUM_SHARDS, shards=[0, 8])
