"""Persisted messages survive their owner's SIGKILL: every message is answered, its
effect applied once in effect, and any client reads the reply afterwards."""

from __future__ import annotations

import asyncio
import collections
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from clstr import Client
from clstr.persist import PersistedClient
from clstr.testing import NatsServer
from clstr.transports.jetstream import stop_watcher
from clstr.transports.nats import NatsTransport

from _support import ScriptNode, eventually

NODE_SCRIPT = Path(__file__).with_name("_persist_node.py")
NUM_SHARDS = 8
MESSAGES = 240
KEYS = 40


class StoredReplies:
    """The ids whose reply is stored, as the reply bucket's watch reports them."""

    def __init__(self) -> None:
        self.ids: set[str] = set()
        self._task: asyncio.Task[None] | None = None
        self._watcher: object = None

    async def start(self, persisted: PersistedClient) -> None:
        bucket = await persisted.replies.bucket()
        self._watcher = watcher = await bucket.watchall()

        async def follow() -> None:
            async for entry in watcher:
                if entry is not None and entry.value:
                    self.ids.add(entry.key)

        self._task = asyncio.create_task(follow())

    async def stop(self) -> None:
        if self._watcher is not None:
            await stop_watcher(self._watcher)
        if self._task is not None:
            await self._task


@pytest.fixture
async def nodes() -> AsyncIterator[dict[str, ScriptNode]]:
    made = {name: ScriptNode(NODE_SCRIPT, name) for name in ("n1", "n2")}
    try:
        yield made
    finally:
        for node in made.values():
            await node.cleanup()


class TestOwnerCrash:
    async def test_every_message_is_answered_and_applied_once_in_effect(
        self, clstr_nats_server: NatsServer, nodes: dict[str, ScriptNode], tmp_path: Path
    ) -> None:
        """The owner of half the shards is SIGKILLed while it handles persisted messages:
        the other node takes its shards and its pending messages; every reply is stored;
        each message's effect was applied once; a duplicate delivery happened only for a
        message whose effect the killed node applied before the kill and whose reply it
        never stored, and the guard refused it; a fresh client reads every reply."""
        prefix = f"c{uuid.uuid4().hex[:8]}"
        record = tmp_path / "record"
        url = clstr_nats_server.url
        for name, node in nodes.items():
            await node.start(url, name, str(NUM_SHARDS), prefix, str(record), "0.1")
        transport = await NatsTransport.connect(url)
        client = Client(transport, num_shards=NUM_SHARDS, prefix=prefix)
        persisted = PersistedClient(client)
        stored = StoredReplies()
        await stored.start(persisted)
        try:
            ids = [
                await persisted.send_raw("job", b"", key=f"k{n % KEYS}") for n in range(MESSAGES)
            ]
            await eventually(lambda: len(stored.ids) >= MESSAGES // 4, 30)
            await nodes["n1"].kill()
            killed_at = nodes["n1"].killed_at
            assert killed_at is not None
            await eventually(lambda: len(stored.ids) >= MESSAGES, 40)
        finally:
            await stored.stop()
            await client.close()
            await transport.close()

        assert stored.ids == set(ids)
        lines = [line.split() for line in record.read_text().splitlines()]
        applied = collections.Counter(rid for kind, rid, _, _ in lines if kind == "A")
        assert applied == collections.Counter(set(ids)), "an effect was applied twice or never"
        first = {rid: (node, float(t)) for kind, rid, node, t in lines if kind == "A"}
        refused = [(rid, node, float(t)) for kind, rid, node, t in lines if kind == "D"]
        for rid, node, t in refused:
            assert first[rid][0] == "n1", f"{rid}: a duplicate of an effect not on the killed node"
            assert first[rid][1] < killed_at < t, f"{rid}: a duplicate away from the kill"
            assert node == "n2"
        starts = collections.Counter(rid for kind, rid, _, _ in lines if kind == "S")
        again = {rid for rid, n in starts.items() if n > 1}
        started_on_n1 = {rid for kind, rid, node, t in lines if kind == "S" and node == "n1"}
        assert again <= started_on_n1, "a message ran twice without a crash in between"
        cut = started_on_n1 - {rid for rid, (node, _) in first.items() if node == "n1"}
        print(
            f"{len(refused)} duplicate deliveries refused, {len(again)} messages run again, "
            f"{len(cut)} cut short before their effect"
        )

        fresh_transport = await NatsTransport.connect(url)
        fresh = PersistedClient(Client(fresh_transport, num_shards=NUM_SHARDS, prefix=prefix))
        try:
            replies = await asyncio.gather(*(fresh.await_reply(r, timeout=10) for r in ids))
            assert set(replies) <= {b"n1", b"n2"}
            for rid, _, _ in refused:
                assert await fresh.replies_for(rid) == [b"n2"]
        finally:
            await fresh_transport.close()
