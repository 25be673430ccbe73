"""``clstr node``: one node process of a user's handler, the way production runs it.

The process connects to NATS, starts a :class:`~clstr.Node` with the handler
named by ``--app module:attr``, answers NATS service discovery, optionally
serves Prometheus metrics over HTTP, logs ``node ready`` once all of that is
up, and stops gracefully on SIGTERM or SIGINT (a second signal exits at once).

nats-py and the service discovery load when the node starts, not when the
``clstr`` parser is built.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import structlog

from ..errors import ClstrError, ConnectionFailedError
from ..handlers import Handler
from ..membership import KvMembership
from ..metrics import NOOP_METRICS, Metrics, PrometheusMetrics
from ..node import Node
from . import _connection
from ._app import load_app
from ._common import CliError
from ._parser import (
    Parser,
    Subcommands,
    add_command,
    env_flag,
    non_negative_int,
    port_number,
    positive_int,
    seconds,
)

if TYPE_CHECKING:
    from ..observe import ServiceDiscovery
    from ..transports.nats import NatsOptions, NatsTransport

__all__ = ["NodeOptions", "add_parser", "parse_node_list", "run", "run_node"]

_log = structlog.get_logger("clstr.cli.node")


# -- the parser ---------------------------------------------------------------------


def add_parser(sub: Subcommands, env: Mapping[str, str]) -> None:
    """Add ``node``."""
    node = add_command(
        sub,
        env,
        "node",
        "run one node process of a handler (the way production runs it)",
        run=run,
        log_level="info",
    )
    _add_app_options(node, env)
    _add_membership_options(node, env)
    _add_serving_options(node, env)
    _add_process_options(node, env)


def _add_app_options(node: Parser, env: Mapping[str, str]) -> None:
    """Who this node is and what it runs."""
    node.add_argument(
        "--id",
        dest="node_id",
        default=env.get("CLSTR_NODE_ID"),
        required=not env.get("CLSTR_NODE_ID"),
        help="this node's id [CLSTR_NODE_ID]",
    )
    node.add_argument(
        "--app",
        default=env.get("CLSTR_APP"),
        required=not env.get("CLSTR_APP"),
        metavar="MODULE:ATTR",
        help="the handler, or a factory of one [CLSTR_APP], e.g. clstr.demo_app:app",
    )
    node.add_argument(
        "--app-dir",
        default=".",
        help="directory put first on sys.path to import --app from (default .)",
    )


def _add_membership_options(node: Parser, env: Mapping[str, str]) -> None:
    """Which shards this node serves."""
    node.add_argument(
        "--static-nodes",
        type=parse_node_list,
        default=env.get("CLSTR_STATIC_NODES", ""),
        metavar="A,B,C",
        help="every member's id, this one included [CLSTR_STATIC_NODES]; "
        "without it the node serves every shard",
    )
    node.add_argument(
        "--membership",
        choices=("static", "kv"),
        default=env.get("CLSTR_MEMBERSHIP", "static"),
        help="static: --static-nodes (or every shard); kv: dynamic membership on "
        "JetStream KV, nodes join and leave freely [CLSTR_MEMBERSHIP]",
    )
    node.add_argument(
        "--weight",
        type=seconds,
        default=1.0,
        help="capacity weight of this node under --membership kv (default 1)",
    )


def _add_serving_options(node: Parser, env: Mapping[str, str]) -> None:
    """What the node shows of itself, and how much work it takes on."""
    node.add_argument(
        "--metrics-port",
        type=port_number,
        default=env.get("CLSTR_METRICS_PORT") or None,
        help="serve Prometheus metrics over HTTP on this port [CLSTR_METRICS_PORT] "
        "(0: any free port)",
    )
    node.add_argument(
        "--metrics-host",
        default="0.0.0.0",
        help="interface of the metrics server (default 0.0.0.0)",
    )
    node.add_argument(
        "--no-discovery",
        dest="discovery",
        action="store_false",
        help="do not answer NATS service discovery ($SRV.PING/INFO/STATS)",
    )
    node.add_argument(
        "--max-concurrency",
        type=positive_int,
        default=100,
        help="handlers running at once (default 100)",
    )
    node.add_argument(
        "--max-pending",
        type=non_negative_int,
        default=10_000,
        help="messages waiting for a busy worker before the node answers overloaded "
        "(default 10000; 0: take only what free workers can start at once)",
    )
    node.add_argument(
        "--stop-timeout",
        type=seconds,
        default=10.0,
        help="seconds in-flight handlers get on SIGTERM before they are cancelled",
    )


def _add_process_options(node: Parser, env: Mapping[str, str]) -> None:
    """How the process runs: its event loop, its parent."""
    node.add_argument(
        "--uvloop",
        action="store_true",
        default=env_flag(env, "CLSTR_UVLOOP"),
        help="run on uvloop, the faster event loop [CLSTR_UVLOOP=1] (pip install 'clstr[uvloop]')",
    )
    node.add_argument(
        "--watch-stdin",
        action="store_true",
        help="stop when stdin closes (for a supervising parent process)",
    )


# -- the command ----------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    """Run the node ``args`` describe, on uvloop when asked, until a signal."""
    app_dir = os.path.abspath(args.app_dir)
    if app_dir not in sys.path:
        sys.path.insert(0, app_dir)
    options = _node_options(args)
    if args.uvloop:
        try:
            import uvloop
        except ImportError:
            raise CliError(
                "--uvloop needs the uvloop package: pip install 'clstr[uvloop]'"
            ) from None
        return int(uvloop.run(run_node(options)))
    return asyncio.run(run_node(options))


def _node_options(args: argparse.Namespace) -> NodeOptions:
    return NodeOptions(
        node_id=args.node_id,
        servers=args.nats_url,
        num_shards=args.shards,
        seed=args.seed,
        prefix=args.prefix,
        static_nodes=args.static_nodes,
        membership=args.membership,
        weight=args.weight,
        app=args.app,
        metrics_port=args.metrics_port,
        metrics_host=args.metrics_host,
        service_name=args.service_name,
        discovery=args.discovery,
        max_concurrency=args.max_concurrency,
        max_pending=args.max_pending,
        stop_timeout=args.stop_timeout,
        nats_options=_connection.nats_options(args, f"clstr-node-{args.node_id}"),
        watch_stdin=args.watch_stdin,
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeOptions:
    """Everything ``clstr node`` was told."""

    node_id: str
    servers: Sequence[str]
    num_shards: int
    seed: str = ""
    prefix: str = "clstr"
    static_nodes: Sequence[str] = ()
    membership: str = "static"
    weight: float = 1.0
    app: str = "clstr.demo_app:app"
    metrics_port: int | None = None
    metrics_host: str = "0.0.0.0"
    service_name: str = "clstr"
    discovery: bool = True
    max_concurrency: int = 100
    max_pending: int = 10_000
    stop_timeout: float = 10.0
    #: Credentials, TLS and the connect deadline (no default: nats-py loads on demand).
    nats_options: NatsOptions
    watch_stdin: bool = False


@contextlib.contextmanager
def _metrics_server(port: int | None, host: str) -> Iterator[tuple[Metrics, int | None]]:
    """Serve Prometheus metrics of a dedicated registry over HTTP while in the block."""
    if port is None:
        yield NOOP_METRICS, None
        return
    from prometheus_client import CollectorRegistry, start_http_server

    registry = CollectorRegistry()
    metrics = PrometheusMetrics(registry)
    try:
        server, thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise CliError(
            f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}; "
            "choose another --metrics-port"
        ) from None
    try:
        yield metrics, int(server.server_port)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


class _Signals:
    """SIGTERM/SIGINT (and, when watched, EOF on stdin) set ``stop``; a second
    signal exits at once."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.stop = asyncio.Event()
        self.reason = ""
        self._loop = loop
        self._installed: list[int] = []

    def install(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            try:
                self._loop.add_signal_handler(signum, self._on_signal, signum)
            except (NotImplementedError, RuntimeError, ValueError):  # no POSIX, no main thread
                continue
            self._installed.append(signum)

    def uninstall(self) -> None:
        for signum in self._installed:
            self._loop.remove_signal_handler(signum)
        self._installed.clear()

    def _on_signal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if self.stop.is_set():
            _log.warning("second signal: exiting without a graceful stop", signal=name)
            os._exit(128 + signum)
        self.request(name)

    def request(self, reason: str) -> None:
        if not self.stop.is_set():
            self.reason = reason
            self.stop.set()

    async def watch_stdin(self) -> asyncio.BaseTransport | None:
        """Stop when stdin reaches EOF: the parent that holds its other end is gone.

        Returns the pipe transport to close when done (``None`` when stdin
        cannot be watched, e.g. a regular file).
        """
        signals = self

        class _Watch(asyncio.Protocol):
            def data_received(self, data: bytes) -> None:
                pass  # only the end of the pipe matters

            def eof_received(self) -> bool:
                signals.request("stdin closed")
                return False

            def connection_lost(self, exc: Exception | None) -> None:
                signals.request("stdin closed")

        try:
            transport, _ = await self._loop.connect_read_pipe(_Watch, sys.stdin)
        except (OSError, ValueError) as exc:
            _log.warning("cannot watch stdin", error=str(exc))
            return None
        return transport


async def run_node(options: NodeOptions) -> int:
    """Run one node until a signal; return the exit code.

    Raises :class:`CliError` for a bad ``--app``, an unreachable server, a
    metrics port in use, or a node configuration clstr refuses.
    """
    from ..transports.nats import NatsTransport

    handler = await load_app(options.app, options.node_id)
    signals = _Signals(asyncio.get_running_loop())
    signals.install()
    watcher = await signals.watch_stdin() if options.watch_stdin else None
    try:
        with _metrics_server(options.metrics_port, options.metrics_host) as (metrics, port):
            try:
                transport = await NatsTransport.connect(
                    list(options.servers),
                    replace(options.nats_options, name=f"clstr-node-{options.node_id}"),
                )
            except ConnectionFailedError as exc:
                raise CliError(str(exc)) from None
            try:
                await _serve(transport, handler, metrics, port, signals, options)
            finally:
                await transport.close()
    finally:
        if watcher is not None:
            watcher.close()
        signals.uninstall()
    return 0


async def _serve(
    transport: NatsTransport,
    handler: Handler,
    metrics: Metrics,
    metrics_port: int | None,
    signals: _Signals,
    options: NodeOptions,
) -> None:
    log = _log.bind(node_id=options.node_id)
    node, discovery = _make_node(transport, handler, metrics, options)
    if not options.static_nodes and options.membership == "static":
        log.warning(
            "no --static-nodes: this node serves every shard; list every member "
            "with --static-nodes to share the shards between nodes"
        )
    try:
        await node.start()
        if discovery is not None:
            await discovery.start()
        log.info("node ready", **_ready_fields(transport, node, metrics_port, options))
        await signals.stop.wait()
        log.info("node stopping", reason=signals.reason, stop_timeout=options.stop_timeout)
    finally:
        if discovery is not None:
            await discovery.stop()
        await node.stop()
    log.info("node exit", handled=node.stats.handled, errors=node.stats.errors)


def _make_node(
    transport: NatsTransport, handler: Handler, metrics: Metrics, options: NodeOptions
) -> tuple[Node, ServiceDiscovery | None]:
    """The node, and its service discovery unless turned off; what clstr refuses
    of the configuration is a :class:`CliError`."""
    from ..observe import ServiceDiscovery, ShardStats

    shard_stats = ShardStats()
    try:
        node = Node(
            transport,
            shard_stats.wrap(handler) if options.discovery else handler,
            node_id=options.node_id,
            **_membership(options),
            num_shards=options.num_shards,
            seed=options.seed,
            prefix=options.prefix,
            max_concurrency=options.max_concurrency,
            max_pending=options.max_pending,
            stop_timeout=options.stop_timeout,
            metrics=metrics,
        )
        discovery = (
            ServiceDiscovery(node, transport, name=options.service_name, shard_stats=shard_stats)
            if options.discovery
            else None
        )
    except ClstrError as exc:
        raise CliError(str(exc)) from None
    return node, discovery


def _ready_fields(
    transport: NatsTransport, node: Node, metrics_port: int | None, options: NodeOptions
) -> dict[str, Any]:
    """What ``node ready`` says: the parent process (``clstr dev up``) reads it."""
    connected = transport.nc.connected_url
    fields: dict[str, Any] = {
        "shards": len(node.shards),
        "num_shards": node.num_shards,
        "prefix": node.prefix,
        "nats_url": connected.geturl() if connected is not None else None,
        "pid": os.getpid(),
        "loop": type(asyncio.get_running_loop()).__module__.split(".")[0],
    }
    if metrics_port is not None:
        fields["metrics_port"] = metrics_port
    if options.discovery:
        fields["service"] = options.service_name
    return fields


def _membership(options: NodeOptions) -> dict[str, Any]:
    """The Node keyword that places this node's shards, from the command line."""
    if options.membership == "kv":
        if options.static_nodes:
            raise CliError("--static-nodes and --membership kv exclude each other")
        return {"membership": KvMembership(weight=options.weight)}
    return {"nodes": list(options.static_nodes) or None}


def parse_node_list(text: str) -> list[str]:
    """``a,b,c`` (spaces allowed) as a list of ids, without empty entries."""
    return [part.strip() for part in text.split(",") if part.strip()]
