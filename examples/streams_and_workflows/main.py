"""A streamed report and a workflow job that outlives its caller, over an embedded
nats-server.

One node serves two routes. ``report`` is an async generator: the caller reads
its rows as they are produced (``client.key(k).stream(...)``), a window of
chunks at a time. ``run_job`` is a slow, multi-step job: it is sent as a
*persisted* message (written to JetStream before ``send`` returns its request
id), the caller exits at once, and a new client, later, awaits the reply the
node stored when the job was done.

    python examples/streams_and_workflows/main.py
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass

import structlog

from clstr import Client, Node, Router
from clstr.persist import PersistedClient, serve_persisted
from clstr.testing import NatsServer
from clstr.transports.nats import NatsTransport

NUM_SHARDS = 8


@dataclass
class Query:
    region: str
    rows: int


@dataclass
class Row:
    n: int
    text: str


@dataclass
class RunJob:
    name: str
    steps: int


@dataclass
class JobDone:
    name: str
    steps_done: int
    node: str


def build_router(node_id: str) -> Router:
    router = Router()

    @router.on(Query)
    async def report(query: Query) -> AsyncIterator[Row]:
        for n in range(query.rows):
            yield Row(n, f"{query.region} sales line {n}")  # waits while the reader is behind

    @router.on(RunJob)
    async def run_job(job: RunJob) -> JobDone:
        for step in range(job.steps):
            await asyncio.sleep(0.2)  # a step of real work
            print(f"  [{node_id}] {job.name}: step {step + 1}/{job.steps} done", flush=True)
        return JobDone(job.name, job.steps, node_id)

    return router


async def submit(url: str, job: RunJob) -> str:
    """A caller that persists a job, prints its request id and goes away."""
    transport = await NatsTransport.connect(url)
    persisted = PersistedClient(Client(transport, num_shards=NUM_SHARDS))
    request_id = await persisted.send(job, key=f"job/{job.name}")
    print(f"submitted {job.name} as request {request_id}; the caller exits")
    await transport.close()
    return request_id


async def collect(url: str, request_id: str) -> None:
    """A new client, later: awaits the stored reply of the job."""
    transport = await NatsTransport.connect(url)
    persisted = PersistedClient(Client(transport, num_shards=NUM_SHARDS))
    print(f"a new client awaits request {request_id}")
    done = await persisted.await_reply(request_id, JobDone, timeout=30)
    print(f"{done.name} finished {done.steps_done} steps on {done.node}")
    again = await persisted.replies_for(request_id, JobDone)
    print(f"replies_for({request_id}) -> {len(again)} stored reply")
    await transport.close()


async def main() -> None:
    structlog.configure(
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        wrapper_class=structlog.make_filtering_bound_logger(30),
    )
    async with NatsServer(jetstream=True) as server:
        node_transport = await NatsTransport.connect(server.url)
        node = Node(node_transport, build_router("node-1"), num_shards=NUM_SHARDS, node_id="node-1")
        serve_persisted(node)  # consume the persisted messages of the shards it serves
        await node.start()

        client_transport = await NatsTransport.connect(server.url)
        client = Client(client_transport, num_shards=NUM_SHARDS)
        print("streaming the report:")
        count = 0
        async for row in client.key("report/emea").stream(Query("emea", 5), Row, window=2):
            print(f"  row {row.n}: {row.text}")
            count += 1
        print(f"streamed {count} rows")
        await client_transport.close()

        request_id = await submit(server.url, RunJob("nightly-rollup", 3))
        await collect(server.url, request_id)

        await node.stop()
        await node_transport.close()


if __name__ == "__main__":
    asyncio.run(main())
