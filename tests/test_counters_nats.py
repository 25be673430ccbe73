"""Counters on a real nats-server, under faults: client processes count while node
processes are SIGKILLed and added (the totals are exact), a client process dies
with unflushed deltas (only those are lost), and the `clstr counter` command."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from clstr import Client
from clstr.cli import main
from clstr.counters import StrictCounter
from clstr.testing import NatsServer
from clstr.transports.nats import NatsTransport

from _support import ScriptNode, eventually

NODE_SCRIPT = Path(__file__).with_name("_counter_node.py")
CLIENT_SCRIPT = Path(__file__).with_name("_counter_client.py")
NUM_SHARDS = 16


class ClientProcess:
    """A counter client script in its own process: its progress as it reports it,
    and the JSON lines it prints."""

    def __init__(self, *args: str, log: Path) -> None:
        self.args = args
        self.log = log
        self.progress = 0
        self.results: list[dict[str, Any]] = []
        self.process: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        with self.log.open("wb") as log:  # the child writes its own copy
            self.process = await asyncio.create_subprocess_exec(
                sys.executable,
                str(CLIENT_SCRIPT),
                *self.args,
                stdout=asyncio.subprocess.PIPE,
                stderr=log,
            )
        assert self.process.stdout is not None
        async with asyncio.timeout(20):
            assert (await self.process.stdout.readline()).strip() == b"ready"
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.process is not None
        assert self.process.stdout is not None
        async for raw in self.process.stdout:
            line = raw.decode().strip()
            if line.startswith("progress "):
                self.progress = int(line.split()[1])
            elif line.startswith("{"):
                self.results.append(json.loads(line))

    async def wait(self, timeout: float = 60) -> int:
        assert self.process is not None
        assert self._reader is not None
        async with asyncio.timeout(timeout):
            code = await self.process.wait()
            await self._reader
        return code

    async def cleanup(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
            await self.process.wait()
        if self._reader is not None:
            await self._reader

    def explain(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


@pytest.fixture
async def server() -> AsyncIterator[NatsServer]:
    async with NatsServer(jetstream=True) as srv:
        yield srv


@pytest.fixture
async def client(server: NatsServer) -> AsyncIterator[Client]:
    transport = await NatsTransport.connect(server.url)
    made = Client(transport, num_shards=NUM_SHARDS)
    yield made
    await made.close()
    await transport.close()


async def _totals(client: Client, namespace: str, keys: list[str]) -> dict[str, int]:
    async with StrictCounter(client, namespace, timeout=20.0) as counter:
        return {key: await counter.get(key) for key in keys}


def _sum(dicts: list[dict[str, int]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for d in dicts:
        for key, value in d.items():
            out[key] = out.get(key, 0) + value
    return out


class TestChurn:
    async def test_totals_are_exact_while_nodes_are_killed_and_added(
        self, server: NatsServer, client: Client, tmp_path: Path
    ) -> None:
        """Two strict and two lax client processes count on 20 keys while two of three
        node processes are SIGKILLed, one after the other, each while both kinds of
        clients write, and a fourth joins between the kills: every strict total
        equals the increments acknowledged to the clients, every lax total the
        increments issued (all flushed by close()) — none lost, none counted twice.
        (With the writer sessions switched off, each kill catches operations the
        killed node applied and never answered: their retries count twice.)"""
        nodes = {n: ScriptNode(NODE_SCRIPT, n) for n in ("n1", "n2", "n3", "n4")}
        common = (server.url,)
        strict = [
            ClientProcess(
                "strict", *common, "s", str(NUM_SHARDS), "20", "5000", log=tmp_path / f"s{i}"
            )
            for i in range(2)
        ]
        lax = [
            ClientProcess(
                "lax", *common, "l", str(NUM_SHARDS), "20", "40000", log=tmp_path / f"l{i}"
            )
            for i in range(2)
        ]
        clients = strict + lax

        def past(strict_ops: int, lax_acks: int) -> bool:
            return all(c.progress >= strict_ops for c in strict) and all(
                c.progress >= lax_acks for c in lax
            )

        try:
            for name in ("n1", "n2", "n3"):
                await nodes[name].start(server.url, name, str(NUM_SHARDS))
            await asyncio.gather(*(c.start() for c in clients))
            await eventually(lambda: past(200, 5000), 30)
            await nodes["n2"].kill()
            await eventually(lambda: past(400, 10000), 30)
            await nodes["n4"].start(server.url, "n4", str(NUM_SHARDS))
            await eventually(lambda: past(700, 20000), 30)
            assert all(c.progress < 5000 for c in strict), "strict clients ended before the kill"
            assert all(c.progress < 40000 for c in lax), "lax clients ended before the kill"
            await nodes["n3"].kill()
            codes = [await c.wait() for c in clients]
            assert codes == [0, 0, 0, 0], "\n".join(c.explain() for c in clients)
            keys = [f"key-{i}" for i in range(20)]
            acked = _sum([c.results[-1]["acked"] for c in strict])
            assert sum(c.results[-1]["failed"] for c in strict) == 0
            issued = _sum([c.results[-1]["issued"] for c in lax])
            assert sum(issued.values()) == 80_000
            totals = (await _totals(client, "s", keys), await _totals(client, "l", keys))
            excess = [
                sum(t.values()) - sum(w.values())
                for t, w in zip(totals, (acked, issued), strict=True)
            ]
            assert totals == (acked, issued), f"counted too much (strict, lax): {excess}"
            print(f"strict: {sum(acked.values())} acknowledged; lax: {sum(issued.values())}")
            print(*(c.results[-1]["stats"] for c in lax), sep="\n")
        finally:
            for c in clients:
                await c.cleanup()
            for node in nodes.values():
                await node.cleanup()


class TestLaxLoss:
    async def test_a_dead_client_loses_only_its_unflushed_deltas(
        self, server: NatsServer, client: Client, tmp_path: Path
    ) -> None:
        """A lax client process flushes 2,000 increments of 2 (acknowledged), adds
        2,000 more it never sends, and SIGKILLs itself; then one of the two nodes
        is SIGKILLed too: the totals are exactly the acknowledged ones (nothing
        unsent arrives, nothing acknowledged is lost with its owner)."""
        nodes = {n: ScriptNode(NODE_SCRIPT, n) for n in ("n1", "n2")}
        dying = ClientProcess(
            "die", server.url, "d", str(NUM_SHARDS), "10", "2000", log=tmp_path / "die"
        )
        try:
            for name in nodes:
                await nodes[name].start(server.url, name, str(NUM_SHARDS))
            await dying.start()
            assert await dying.wait() == -9, dying.explain()  # killed itself, SIGKILL
            acked, unflushed = dying.results[0]["acked"], dying.results[1]["unflushed"]
            assert sum(acked.values()) == 4000
            assert sum(unflushed.values()) == 2000
            await nodes["n1"].kill()  # nothing acknowledged is lost with its owner either
            keys = [f"key-{i}" for i in range(10)]
            assert await _totals(client, "d", keys) == acked
        finally:
            await dying.cleanup()
            for node in nodes.values():
                await node.cleanup()


class TestCommand:
    async def test_counter_commands_against_serving_nodes(
        self, server: NatsServer, capsys: pytest.CaptureFixture[str], tmp_path: Path
    ) -> None:
        """`clstr counter serve` runs a node of counters; inc, get, set, del and clear
        (strict, and inc --lax) print what they did."""
        serve = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "clstr",
            "counter",
            "serve",
            "--id",
            "c1",
            "--nats-url",
            server.url,
            "--shards",
            str(NUM_SHARDS),
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            assert serve.stderr is not None
            async with asyncio.timeout(20):
                async for line in serve.stderr:
                    if b"serving counters" in line:
                        break
            base = ["--nats-url", server.url, "--shards", str(NUM_SHARDS), "-n", "pv"]

            async def clstr(*argv: str) -> tuple[int, str]:
                capsys.readouterr()
                code = await asyncio.to_thread(main, ["counter", *argv, *base])
                return code, capsys.readouterr().out.strip()

            assert await clstr("inc", "home") == (0, "1")
            assert await clstr("inc", "home", "41") == (0, "42")
            assert await clstr("inc", "home", "--lax", "8") == (0, "50")
            assert await clstr("get", "home") == (0, "50")
            assert await clstr("set", "home", "7") == (0, "7")
            assert await clstr("del", "home") == (0, "7")
            assert await clstr("get", "home") == (0, "0")
            await clstr("inc", "away")
            assert await clstr("clear") == (0, "")
            code, out = await clstr("get", "away", "--json")
            assert code == 0
            assert json.loads(out)["value"] == 0
            assert (await clstr("set", "home"))[0] == 2  # no value: a usage error
        finally:
            serve.terminate()
            assert await serve.wait() == 0
