"""``clstr dev up`` and ``clstr demo``: the local cluster, in front of a person."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
from collections.abc import Iterator
from typing import TextIO

import structlog

from ._cli_common import EXIT_FAILED, EXIT_OK, CliError
from ._devcluster import DevCluster, DevClusterError, LogRecord, NodeProcess

__all__ = ["dev_up", "demo"]


class LogRelay:
    """Shows the children's log records in the parent's format.

    With ``--log-json`` a record is written back as one JSON line (it already
    names its node); otherwise it goes through structlog's console renderer,
    prefixed with the node id. Plain (non-JSON) output lines are prefixed too.
    """

    def __init__(
        self, *, json_lines: bool, level: str = "info", stream: TextIO | None = None
    ) -> None:
        self._json = json_lines
        self._min = _LEVELS.get(level, 20)
        self._stream = stream if stream is not None else sys.stderr
        colors = _isatty(self._stream)
        self._console = structlog.dev.ConsoleRenderer(colors=colors, pad_event_to=24)

    def __call__(self, process: NodeProcess, record: LogRecord) -> None:
        if isinstance(record, str):
            text = f"{process.node_id} | {record}"
        elif _LEVELS.get(str(record.get("level", "info")), 20) < self._min:
            return
        elif self._json:
            text = json.dumps(record, ensure_ascii=False)
        else:
            event = dict(record)
            event.pop("node_id", None)
            level = str(event.get("level", "info"))
            try:
                rendered = self._console(None, level, event)
            except Exception:  # a record the renderer cannot take: show it raw
                rendered = json.dumps(record)
            text = f"{process.node_id} | {rendered}"
        print(text, file=self._stream, flush=True)


_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40, "critical": 50}


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


@contextlib.contextmanager
def _stop_on_signals(stop: asyncio.Event) -> Iterator[None]:
    loop = asyncio.get_running_loop()
    installed = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(signum, stop.set)
        except (NotImplementedError, RuntimeError, ValueError):  # no POSIX, no main thread
            continue
        installed.append(signum)
    try:
        yield
    finally:
        for signum in installed:
            loop.remove_signal_handler(signum)


def _cluster(args: argparse.Namespace, *, quiet: bool) -> DevCluster:
    # The children always log at info at least: the parent reads their
    # "node ready" from it. What is shown is filtered here.
    shown = "warning" if quiet else (args.log_level or "info")
    return DevCluster(
        nodes=args.nodes,
        num_shards=args.shards,
        seed=args.seed,
        prefix=args.prefix,
        app=getattr(args, "app", "clstr.demo_app:app"),
        nats_url=",".join(args.nats_url) if args.nats_url_explicit else None,
        port=getattr(args, "port", 0),
        metrics_port_base=getattr(args, "metrics_port_base", None),
        service_name=args.service_name,
        log_level="debug" if shown == "debug" else "info",
        stop_timeout=getattr(args, "stop_timeout", 10.0),
        on_log=LogRelay(json_lines=args.log_json, level=shown),
    )


async def _start(cluster: DevCluster, stop: asyncio.Event) -> bool:
    """Start ``cluster`` unless a signal comes first; return whether it started."""
    from .testing import NatsServerError

    starting = asyncio.ensure_future(cluster.start())
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
        if not starting.done():
            starting.cancel()  # start() stops what it started
        with contextlib.suppress(asyncio.CancelledError):
            await stopping
    try:
        await starting
    except asyncio.CancelledError:
        return False
    except DevClusterError as exc:
        raise CliError(f"the dev cluster did not start: {exc}", code=EXIT_FAILED) from None
    except NatsServerError as exc:
        raise CliError(
            f"cannot start the embedded nats-server: {exc}; install it with "
            "pip install 'clstr[testing]', or use a running server with --nats-url",
            code=EXIT_FAILED,
        ) from None
    return True


def _banner(cluster: DevCluster, args: argparse.Namespace) -> str:
    lines = [
        f"clstr dev cluster: {len(cluster.node_ids)} nodes, {cluster.num_shards} shards, "
        f"prefix {cluster.prefix!r}",
    ]
    if cluster.embedded and cluster.server is not None:
        lines.append(
            f"  nats-server  {cluster.url}  (embedded, JetStream on, pid {cluster.server.pid})"
        )
    else:
        lines.append(f"  nats-server  {cluster.url}  (external)")
    pad = max(len(n) for n in cluster.node_ids)
    for process in cluster.processes:
        ready = process.ready_record or {}
        extra = ""
        if ready.get("metrics_port"):
            extra = f"  metrics http://127.0.0.1:{ready['metrics_port']}/metrics"
        lines.append(
            f"  {process.node_id.ljust(pad)}  pid {process.pid}  "
            f"{ready.get('shards', '?')} shards{extra}"
        )
    env = []
    if cluster.url != "nats://127.0.0.1:4222":
        env.append(f"CLSTR_NATS_URL={cluster.url}")
    if cluster.num_shards != 64:
        env.append(f"CLSTR_SHARDS={cluster.num_shards}")
    if cluster.prefix != "clstr":
        env.append(f"CLSTR_PREFIX={cluster.prefix}")
    if cluster.seed:
        env.append(f"CLSTR_SEED={cluster.seed}")
    lines += ["", "try, in another terminal:"]
    if env:
        lines.append(f"  export {' '.join(env)}")
    lines += [
        "  clstr status",
        """  clstr request user-42 Greet '{"name": "ann"}'""",
        """  clstr request counter-1 counter.add '{"by": 5}'""",
        f"  nats --server {cluster.url} micro ls   (NATS CLI: the nodes as services)",
        "",
        "cluster ready; press Ctrl-C to stop",
    ]
    return "\n".join(lines)


async def dev_up(args: argparse.Namespace) -> int:
    """Run the dev cluster until SIGINT/SIGTERM, or until a node dies (exit 1)."""
    cluster = _cluster(args, quiet=False)
    stop = asyncio.Event()
    code = EXIT_OK
    with _stop_on_signals(stop):
        try:
            if not await _start(cluster, stop):
                return EXIT_OK
            print(_banner(cluster, args), flush=True)
            died = [asyncio.ensure_future(p.wait()) for p in cluster.processes]
            stopping = asyncio.ensure_future(stop.wait())
            try:
                done, _ = await asyncio.wait({stopping, *died}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiter in (stopping, *died):
                    waiter.cancel()
                await asyncio.gather(stopping, *died, return_exceptions=True)
            if stopping not in done:
                for process in cluster.processes:
                    if process.returncode is not None:
                        print(
                            f"clstr: error: {process.node_id} exited with code "
                            f"{process.returncode}; stopping the cluster",
                            file=sys.stderr,
                        )
                code = EXIT_FAILED
            then = ", then nats-server" if cluster.embedded else ""
            print(f"stopping: the nodes first{then}", flush=True)
        finally:
            await cluster.stop()
    print("stopped", flush=True)
    return code


async def demo(args: argparse.Namespace) -> int:
    """Start a dev cluster, send requests from here, print who answered, stop."""
    from .client import Client
    from .demo_app import Greet, Greeting
    from .hashing import owner_of

    args.port = 0  # never take 4222 from a running 'clstr dev up'
    cluster = _cluster(args, quiet=True)
    stop = asyncio.Event()
    with _stop_on_signals(stop):
        try:
            if not await _start(cluster, stop):
                return EXIT_OK
            print(f"nats-server {cluster.url} (embedded, JetStream on)")
            for process in cluster.processes:
                ready = process.ready_record or {}
                print(
                    f"{process.node_id}: process {process.pid}, serving "
                    f"{ready.get('shards', '?')} of {cluster.num_shards} shards"
                )
            client = await Client.connect(
                cluster.url, num_shards=cluster.num_shards, seed=cluster.seed, prefix=cluster.prefix
            )
            answered: dict[str, int] = {}
            async with client:
                for round_ in range(args.rounds):
                    for k in range(args.keys):
                        if stop.is_set():
                            return EXIT_OK
                        key = f"user-{k}"
                        reply = await client.key(key).call(Greet(name=key), Greeting)
                        shard = client.shard_for(key)
                        expected = owner_of(shard, cluster.node_ids, cluster.seed)
                        if reply.node != expected:
                            raise CliError(
                                f"{key} was answered by {reply.node}, not its owner {expected}",
                                code=EXIT_FAILED,
                            )
                        answered[reply.node] = answered.get(reply.node, 0) + 1
                        if round_ == args.rounds - 1:
                            print(
                                f"  {key:<10} shard {shard:>3} -> {reply.node}"
                                f"  ({reply.text}, visit {reply.visits})"
                            )
            print("requests answered per node:", dict(sorted(answered.items())))
        finally:
            await cluster.stop()
    codes = {p.node_id: p.returncode for p in cluster.processes}
    print("stopped all processes:", ", ".join(f"{n} exit {c}" for n, c in codes.items()))
    return EXIT_OK
