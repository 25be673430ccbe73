"""``clstr node``: one node process of a user's handler, the way production runs it.

The process connects to NATS, starts a :class:`~clstr.Node` with the handler
named by ``--app module:attr``, answers NATS service discovery, optionally
serves Prometheus metrics over HTTP, logs ``node ready`` once all of that is
up, and stops gracefully on SIGTERM or SIGINT (a second signal exits at once).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import inspect
import os
import signal
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import structlog

from ..errors import ClstrError, ConnectionFailedError
from ..handlers import Handler, KeyHandler, Router
from ..membership import KvMembership
from ..metrics import NOOP_METRICS, Metrics, PrometheusMetrics
from ..node import Node
from ..observe import ServiceDiscovery, ShardStats
from ..transports.nats import NatsOptions, NatsTransport
from ._common import CliError

__all__ = ["NodeOptions", "load_app", "parse_node_list", "run_node"]

_log = structlog.get_logger("clstr.cli.node")


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
    nats_options: NatsOptions = field(default_factory=NatsOptions)
    watch_stdin: bool = False


async def load_app(spec: str, node_id: str) -> Handler:
    """Import ``module:attr`` and return the handler it names.

    ``attr`` (dotted paths allowed) is a handler (a :class:`~clstr.Router`,
    :class:`~clstr.KeyHandler` or any ``async (Envelope) -> bytes | None``
    callable) or a factory that returns one: a callable with no required
    argument, or one with a ``node_id`` parameter, which gets this node's id.
    A factory may be ``async``. Raises :class:`CliError` saying what is wrong.
    """
    module_name, sep, attr_path = spec.partition(":")
    if not sep or not module_name or not attr_path:
        raise CliError(f"--app must be 'module:attr' (e.g. clstr.demo_app:app), got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and module_name.startswith(exc.name):
            raise CliError(
                f"cannot import {module_name!r} for --app: no such module; "
                "check the name and that it is on PYTHONPATH"
            ) from None
        raise CliError(f"importing {module_name!r} for --app failed: {exc}") from None
    except Exception as exc:
        raise CliError(
            f"importing {module_name!r} for --app failed: {type(exc).__name__}: {exc}"
        ) from None
    obj: Any = module
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise CliError(f"module {module_name!r} has no attribute {attr_path!r}") from None
    handler = obj
    if not isinstance(obj, Router | KeyHandler):
        factory_kwargs = _factory_kwargs(obj, node_id)
        if factory_kwargs is not None:
            try:
                handler = obj(**factory_kwargs)
                if inspect.isawaitable(handler):
                    handler = await handler
            except Exception as exc:
                raise CliError(
                    f"the --app factory {spec!r} raised {type(exc).__name__}: {exc}"
                ) from None
    if not callable(handler):
        raise CliError(
            f"--app {spec!r} is a {type(handler).__name__}, not a handler: name an async "
            "callable (Envelope) -> bytes, a Router, a KeyHandler, or a factory of one"
        )
    checked: Handler = handler
    return checked


def _factory_kwargs(obj: Any, node_id: str) -> dict[str, str] | None:
    """How to call ``obj`` as a factory, or ``None`` when it is a handler itself."""
    if isinstance(obj, type):
        return {}
    if not callable(obj):
        return None
    try:
        params = inspect.signature(obj).parameters
    except (TypeError, ValueError):
        return None
    if "node_id" in params:
        return {"node_id": node_id}
    required = [
        p
        for p in params.values()
        if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
    return {} if not required else None


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
    if not options.static_nodes and options.membership == "static":
        log.warning(
            "no --static-nodes: this node serves every shard; list every member "
            "with --static-nodes to share the shards between nodes"
        )
    try:
        await node.start()
        if discovery is not None:
            await discovery.start()
        connected = transport.nc.connected_url
        extra: dict[str, Any] = {}
        if metrics_port is not None:
            extra["metrics_port"] = metrics_port
        if discovery is not None:
            extra["service"] = options.service_name
        log.info(
            "node ready",
            shards=len(node.shards),
            num_shards=node.num_shards,
            prefix=node.prefix,
            nats_url=connected.geturl() if connected is not None else None,
            pid=os.getpid(),
            loop=type(asyncio.get_running_loop()).__module__.split(".")[0],
            **extra,
        )
        await signals.stop.wait()
        log.info("node stopping", reason=signals.reason, stop_timeout=options.stop_timeout)
    finally:
        if discovery is not None:
            await discovery.stop()
        await node.stop()
    log.info("node exit", handled=node.stats.handled, errors=node.stats.errors)


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
