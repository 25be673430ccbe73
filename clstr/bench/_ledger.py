"""The ledger over NATS (group ``ledger``): events per second through
``LedgerClient.create_event`` against raw nats-py writing the same bytes to
JetStream.

Three processes: a ledger node (``LedgerService``: one node serving the 64
shards, snapshots write-through, its journal and snapshots in JetStream under
a prefix of the stage's own), a client process with a ``LedgerClient`` over a
``Client``, and a raw nats-py process that never imports clstr. 1024
accounts of one bucket, 256 events in flight, each a credit of 1; the first
run starts with a warm-up (accounts created and live; the raw side's
accounts have a sequence and a snapshot).

* clstr: ``create_event(bucket, account, 1)``: a request to the account's
  owner, which appends the event to the bucket's journal (a publish
  conditional on the account's last sequence, with a message id), folds it
  in and writes the account's snapshot to KV before it answers.
* raw: ``js.publish`` of real event bodies (read from the ledger's journal
  before each round) to a stream configured as a journal, with a message id
  and ``Nats-Expected-Last-Subject-Sequence``, one event per account at a
  time (a lock per account, as the account's lane does).
* raw + snapshot (report only): the same, and a KV update of a real account
  snapshot (read from the ledger's store before each round) conditional on
  the last revision: the two JetStream writes an event costs the ledger.

The gap to the first baseline is the request to the owner, the second write
and the ledger's own work; the second row leaves only the request and the work.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import uuid
from typing import Any, Final

from ._group import Context, Group, Workers, side_order
from ._pairs import drop_streams, pair_stage
from ._protocol import JSON, cpu, quiet_logs, serve
from ._specs import KEYS, Spec
from ._timing import drive, throughput

_PREFIX: Final = "benchledger"
_BUCKET: Final = "bench"
# Real bodies and snapshots the raw side writes, sampled before each round.
_SAMPLE_EVENTS: Final = 256
_SAMPLE_SNAPSHOTS: Final = 64

_WHAT: Final = (
    "LedgerClient.create_event over NATS (LedgerService, 1 node, write-through "
    "snapshots; 256 in flight, 1024 accounts)"
)
_SPECS: Final = (
    Spec(
        "ledger_create_event",
        "ledger",
        _WHAT,
        "raw nats-py: JetStream publish of the same event bytes, conditional on the "
        "account's last sequence",
        "events/s",
        True,
        # Medians of --runs 3: 0.15-0.22x on both loops (CPU 0.11-0.18x; single runs
        # 0.08-0.22x): the floor is ~60 % of the ~0.17x typical of them.
        0.1,
    ),
    Spec(
        "ledger_vs_publish_kv",
        "ledger",
        _WHAT,
        "raw nats-py: the same + a conditional KV update of the account's snapshot bytes",
        "events/s",
        True,
        # Medians of --runs 3: 0.24-0.39x (CPU 0.21-0.31x): the floor is ~60 % of
        # the ~0.31x typical of them.
        0.18,
    ),
)


def _accounts() -> list[str]:
    return [f"acct-{i}" for i in range(KEYS)]


async def ledger_node(cfg: JSON) -> None:
    """One ledger node serving every shard, its store under ``cfg["store"]``."""
    from clstr.ledger import LedgerService, LedgerSettings
    from clstr.transports.nats import NatsOptions, NatsTransport

    quiet_logs()
    transport = await NatsTransport.connect(cfg["url"], NatsOptions(name="bench-ledger-node"))
    service = LedgerService(
        transport,
        num_shards=cfg["shards"],
        node_id="bench-ledger",
        prefix=_PREFIX,
        settings=LedgerSettings(store_prefix=cfg["store"]),
    )
    try:
        async with service:
            await serve({"cpu": cpu})
    finally:
        await drop_streams(transport.nc, cfg["store"])
        await transport.close()


async def ledger_client(cfg: JSON) -> None:
    """Credits of 1 through a :class:`~clstr.ledger.LedgerClient`."""
    from clstr import Client
    from clstr.ledger import LedgerClient
    from clstr.transports.nats import NatsOptions, NatsTransport

    quiet_logs()
    transport = await NatsTransport.connect(cfg["url"], NatsOptions(name="bench-ledger-client"))
    client = Client(transport, num_shards=cfg["shards"], prefix=_PREFIX, timeout=30.0)
    ledger = LedgerClient(client)
    accounts = _accounts()

    async def credit(i: int) -> object:
        return await ledger.create_event(_BUCKET, accounts[i % KEYS], 1)

    async def warm(cmd: JSON) -> JSON:
        await drive(credit, cmd["warmup"], cfg["inflight"])
        return {}

    async def measure(cmd: JSON) -> JSON:
        return await throughput(credit, cmd["n"], 0, cfg["inflight"])

    try:
        await serve({"ledger_warm": warm, "ledger_event": measure})
    finally:
        await client.close()
        await transport.close()


class _RawJournal:
    """Raw nats-py's side: a journal-like stream and a snapshot bucket of its own,
    written with bodies and snapshots read from the ledger's store."""

    def __init__(self, js: Any, store: str) -> None:
        self.js = js
        self.store = store
        self.raw = f"{store}raw"
        self.stream = f"{self.raw}_journal"
        self.accounts = _accounts()
        self.locks = {account: asyncio.Lock() for account in self.accounts}
        self.last: dict[str, int] = {}
        self.revisions: dict[str, int] = {}
        self.bodies: list[bytes] = []
        self.snapshots: list[bytes] = []
        self.kv: Any = None
        # Message ids as unique as the journal's (32 hex digits).
        self.ids = (f"{os.urandom(8).hex()}{n:016x}" for n in itertools.count())

    async def open(self) -> None:
        await self.js.add_stream(
            name=self.stream,
            subjects=[f"{self.raw}.*"],
            duplicate_window=120.0,
            allow_direct=True,
            deny_delete=True,
            deny_purge=True,
        )
        self.kv = await self.js.create_key_value(bucket=f"{self.raw}_snapshots", history=1)

    async def sample(self) -> None:
        """The ledger's latest event bodies and account snapshots (the last
        messages of its journal and of its snapshot bucket's stream)."""
        self.bodies = await self._latest(f"{self.store}_ledger_{_BUCKET}", _SAMPLE_EVENTS)
        snapshots = f"KV_{self.store}_entity_LedgerAccount"
        self.snapshots = await self._latest(snapshots, _SAMPLE_SNAPSHOTS)

    async def _latest(self, stream: str, count: int) -> list[bytes]:
        last = (await self.js.stream_info(stream)).state.last_seq
        found = []
        for seq in range(max(1, last - count + 1), last + 1):
            data = (await self.js.get_msg(stream, seq=seq)).data
            if data:
                found.append(bytes(data))
        return found

    async def event(self, i: int, *, snapshot: bool) -> None:
        account = self.accounts[i % KEYS]
        async with self.locks[account]:
            ack = await self.js.publish(
                f"{self.raw}.{account}",
                self.bodies[i % len(self.bodies)],
                stream=self.stream,
                headers={
                    "Nats-Msg-Id": next(self.ids),
                    "Nats-Expected-Last-Subject-Sequence": str(self.last.get(account, 0)),
                },
            )
            self.last[account] = ack.seq
            if snapshot:
                value = self.snapshots[i % len(self.snapshots)]
                revision = self.revisions.get(account)
                if revision is None:
                    self.revisions[account] = await self.kv.create(account, value)
                else:
                    self.revisions[account] = await self.kv.update(account, value, last=revision)


async def raw_ledger(cfg: JSON) -> None:
    """Raw nats-py writing the ledger's bytes (never imports clstr)."""
    import nats

    nc = await nats.connect(cfg["url"], name="bench-ledger-raw")
    raw = _RawJournal(nc.jetstream(), cfg["store"])
    inflight = cfg["inflight"]

    async def warm(cmd: JSON) -> JSON:
        await raw.open()
        await raw.sample()

        async def both(i: int) -> None:
            await raw.event(i, snapshot=True)

        await drive(both, cmd["warmup"], inflight)
        return {}

    async def measure(cmd: JSON) -> JSON:
        await raw.sample()
        snapshot = cmd["snapshot"]

        async def one(i: int) -> None:
            await raw.event(i, snapshot=snapshot)

        answer = await throughput(one, cmd["n"], 0, inflight)
        answer["body_bytes"] = sum(map(len, raw.bodies)) / len(raw.bodies)
        answer["snapshot_bytes"] = sum(map(len, raw.snapshots)) / len(raw.snapshots)
        return answer

    try:
        await serve({"ledger_warm": warm, "ledger_event": measure})
    finally:
        await drop_streams(nc, raw.raw)
        await nc.drain()


def _config(context: Context) -> JSON:
    sizes = context.sizes
    return {
        "url": context.url,
        "shards": sizes.nats_shards,
        "inflight": sizes.inflight,
        "store": f"benchldg{uuid.uuid4().hex[:8]}",
    }


_STAGE: Final = pair_stage(
    {"ledger-node": ledger_node, "ledger-client": ledger_client, "ledger-raw": raw_ledger},
    _config,
    what="ledger workers (a node, a client, raw nats-py)",
)


async def _measure(context: Context, workers: Workers, run_index: int) -> None:
    sizes = context.sizes
    node, client, raw = workers["ledger-node"], workers["ledger-client"], workers["ledger-raw"]
    if run_index == 0:
        context.progress.begin("ledger: warm-up")
        warm = {"op": "ledger_warm", "warmup": sizes.ledger_warmup}
        await client.call(warm)  # first: the raw side reads the ledger's bytes
        await raw.call(warm)
    n = sizes.ledger_events
    answers: dict[str, JSON] = {}
    for side in side_order(run_index):
        kinds = ("raw", "raw_kv") if side == "raw" else ("clstr",)
        for kind in kinds:
            context.progress.begin(f"ledger: {kind} {context.run_text(run_index)}")
            if kind == "clstr":
                before = (await node.call({"op": "cpu"}))["cpu"]
                answers[kind] = await client.call({"op": "ledger_event", "n": n})
                node_cpu = (await node.call({"op": "cpu"}))["cpu"] - before
                answers[kind]["node_cpu_us"] = node_cpu / n * 1e6
            else:
                command = {"op": "ledger_event", "n": n, "snapshot": kind == "raw_kv"}
                answers[kind] = await raw.call(command)
            context.progress.advance()
    ledger = answers["clstr"]
    out = context.out
    for row, kind in (("ledger_create_event", "raw"), ("ledger_vs_publish_kv", "raw_kv")):
        out.add(row, ledger["rate"], answers[kind]["rate"])
        out.cpu(row, "client", ledger["cpu_us"], answers[kind]["cpu_us"])
        out.cpu(row, "node", ledger["node_cpu_us"], 0.0)
    sizes_seen = answers["raw_kv"]
    out.note_run(
        "ledger_vs_publish_kv",
        event_bytes=sizes_seen["body_bytes"],
        snapshot_bytes=sizes_seen["snapshot_bytes"],
    )


GROUP: Final = Group(name="ledger", specs=_SPECS, steps=3, stage=_STAGE, measure=_measure)
