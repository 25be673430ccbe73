"""``clstr ledger serve`` (one ledger node process) and ``clstr ledger up`` (an
embedded nats-server and N ledger nodes, until Ctrl-C).

``serve`` runs a :class:`~clstr.ledger.LedgerService` the way ``clstr node``
runs a handler: it connects (to the cluster's NATS, and to the store's when it
is another), joins the membership, answers NATS service discovery, logs
``node ready`` once it serves, and stops gracefully on SIGTERM or SIGINT.
``up`` is the ledger's dev cluster: the same process hygiene as ``clstr dev
up`` (:class:`~clstr.cli._devcluster.DevCluster`), with ledger nodes.

nats-py and the ledger load when a command runs, not when the parser is built.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import structlog

from ..errors import ClstrError, ConnectionFailedError
from . import _connection, _dev
from ._common import DEFAULT_NATS_URL, DEFAULT_SHARDS, EXIT_OK, CliError
from ._devcluster import DevCluster
from ._logrelay import LogRelay
from ._node import _metrics_server, _Signals

if TYPE_CHECKING:
    from ..ledger import LedgerService
    from ..transports.nats import NatsTransport

__all__ = ["LedgerDevCluster", "ledger_up", "serve", "serve_argv"]

_log = structlog.get_logger("clstr.cli.ledger")


def serve_argv(
    node_id: str,
    nats_url: str,
    *,
    num_shards: int,
    prefix: str = "clstr",
    store_url: str | None = None,
    heartbeat_ttl: float | None = None,
    sweep_interval: float | None = None,
    log_level: str = "info",
    extra_args: tuple[str, ...] = (),
) -> list[str]:
    """The argv of a ``clstr ledger serve`` child logging JSON and watching its stdin
    (for :class:`~clstr.testing.NodeProcess`.from_argv)."""
    argv = [
        sys.executable,
        "-m",
        "clstr",
        "--log-json",
        "--log-level",
        log_level,
        "--nats-url",
        nats_url,
        "--shards",
        str(num_shards),
        "--prefix",
        prefix,
        "ledger",
        "serve",
        "--id",
        node_id,
        "--watch-stdin",
    ]
    if store_url is not None:
        argv += ["--store-url", store_url]
    if heartbeat_ttl is not None:
        argv += ["--heartbeat-ttl", str(heartbeat_ttl)]
    if sweep_interval is not None:
        argv += ["--sweep-interval", str(sweep_interval)]
    return [*argv, *extra_args]


def serve(args: argparse.Namespace) -> int:
    """Run one ledger node until a signal."""
    return asyncio.run(_serve(args))


async def _serve(args: argparse.Namespace) -> int:
    from ..transports.nats import NatsTransport

    node_id: str = args.node_id
    signals = _Signals(asyncio.get_running_loop())
    signals.install()
    watcher = await signals.watch_stdin() if args.watch_stdin else None
    opened: list[NatsTransport] = []
    try:
        with _metrics_server(args.metrics_port, args.metrics_host) as (metrics, metrics_port):
            options = _connection.nats_options(args, f"clstr-ledger-{node_id}")
            try:
                transport = await NatsTransport.connect(args.nats_url, options)
                opened.append(transport)
                store = transport
                if args.store_url:
                    store = await NatsTransport.connect(
                        args.store_url, replace(options, name=f"clstr-ledger-store-{node_id}")
                    )
                    opened.append(store)
            except ConnectionFailedError as exc:
                raise CliError(str(exc)) from None
            service = _service(args, transport, store, metrics)
            await _run(service, transport, signals, args, metrics_port)
    finally:
        for connection in reversed(opened):
            await connection.close()
        if watcher is not None:
            watcher.close()
        signals.uninstall()
    return EXIT_OK


def _service(
    args: argparse.Namespace, transport: NatsTransport, store: NatsTransport, metrics: Any
) -> LedgerService:
    from ..ledger import LedgerService, LedgerSettings
    from ..membership import KvMembership, KvSettings

    ttl: float = args.heartbeat_ttl
    membership_settings = KvSettings(
        heartbeat_interval=ttl / 4, heartbeat_ttl=ttl, reconcile_interval=min(1.0, ttl / 4)
    )
    try:
        settings = LedgerSettings(
            store_prefix=args.store_prefix,
            replicas=args.replicas,
            sweep_interval=args.sweep_interval,
            snapshot_every=args.snapshot_every,
        )
        membership: dict[str, Any] = (
            {"nodes": args.static_nodes}
            if args.static_nodes
            else {"membership": lambda group: KvMembership(settings=membership_settings)}
        )
        return LedgerService(
            transport,
            store=store,
            num_shards=args.shards,
            node_id=args.node_id,
            prefix=args.prefix,
            seed=args.seed,
            settings=settings,
            metrics=metrics,
            node_options={"stop_timeout": args.stop_timeout},
            **membership,
        )
    except ClstrError as exc:
        raise CliError(str(exc)) from None


async def _run(
    service: LedgerService,
    transport: NatsTransport,
    signals: _Signals,
    args: argparse.Namespace,
    metrics_port: int | None,
) -> None:
    from ..observe import ServiceDiscovery

    log = _log.bind(node_id=service.node_id)
    node = service.sharding.nodes["default"]
    discovery = (
        ServiceDiscovery(node, transport, name=args.service_name) if args.discovery else None
    )
    try:
        await service.start()
        if discovery is not None:
            await discovery.start()
        connected = transport.nc.connected_url
        log.info(
            "node ready",
            shards=len(node.shards),
            num_shards=node.num_shards,
            prefix=node.prefix,
            epoch=service.epoch,
            nats_url=connected.geturl() if connected is not None else None,
            store=args.store_url or "same",
            pid=os.getpid(),
            **({"metrics_port": metrics_port} if metrics_port is not None else {}),
        )
        await signals.stop.wait()
        log.info("node stopping", reason=signals.reason)
    finally:
        if discovery is not None:
            await discovery.stop()
        await service.shutdown()
    log.info("node exit", handled=node.stats.handled, errors=node.stats.errors)


# -- the ledger's dev cluster ----------------------------------------------------------------


class LedgerDevCluster(DevCluster):
    """:class:`DevCluster` with ``clstr ledger serve`` nodes (KV membership, so more
    may join with ``clstr ledger serve --id ...`` against it)."""

    def __init__(self, *, heartbeat_ttl: float = 3.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.node_ids = [f"ledger-{n + 1}" for n in range(len(self.node_ids))]
        self.heartbeat_ttl = heartbeat_ttl

    async def start(self) -> None:
        from ..testing import NodeProcess

        try:
            if self._nats_url is None:
                await self._start_server()
            for node_id in self.node_ids:
                argv = serve_argv(
                    node_id,
                    self.url,
                    num_shards=self.num_shards,
                    prefix=self.prefix,
                    heartbeat_ttl=self.heartbeat_ttl,
                    log_level=self.log_level,
                    extra_args=("--stop-timeout", str(self.stop_timeout)),
                )
                process = NodeProcess.from_argv(node_id, argv, on_log=self._on_log)
                self.processes.append(process)
                await process.start()
            await asyncio.gather(*(p.wait_ready(self.ready_timeout) for p in self.processes))
        except BaseException:
            await self.stop()
            raise


def ledger_up(args: argparse.Namespace) -> int:
    """Run the ledger's dev cluster until a signal or a node's death."""
    return asyncio.run(_up(args))


async def _up(args: argparse.Namespace) -> int:
    shown = args.log_level or "info"
    cluster = LedgerDevCluster(
        nodes=args.nodes,
        num_shards=args.shards,
        prefix=args.prefix,
        nats_url=",".join(args.nats_url) if args.nats_url_explicit else None,
        port=args.port,
        log_level="debug" if shown == "debug" else "info",
        heartbeat_ttl=args.heartbeat_ttl,
        on_log=LogRelay(json_lines=args.log_json, level=shown),
    )
    stop = asyncio.Event()
    with _dev._stop_on_signals(stop):
        try:
            if not await _dev._start(cluster, stop):
                return EXIT_OK
            owned = await _settled(cluster, stop)
            _dev._say(_banner(cluster, owned), "", _hints(cluster))
            code = await _dev._serve(cluster, stop)
            _dev._say(_dev._stopping(cluster))
        finally:
            await cluster.stop()
    _dev._say(_dev._stopped(cluster))
    return code


async def _settled(cluster: DevCluster, stop: asyncio.Event) -> dict[str, int]:
    """Shards per node once every shard has an owner and every node serves some
    (the membership has spread them), or as they are after a bounded wait."""
    from ..observe import gather_view
    from ..transports.nats import NatsTransport

    loop = asyncio.get_running_loop()
    deadline = loop.time() + 15.0
    transport = await NatsTransport.connect(cluster.url)
    try:
        while True:
            view = await gather_view(
                transport,
                num_shards=cluster.num_shards,
                prefix=cluster.prefix,
                expected_nodes=len(cluster.node_ids),
            )
            owned = {node.node_id: len(node.shards) for node in view.nodes}
            spread = len([n for n in owned.values() if n]) == len(cluster.node_ids)
            if (view.complete and spread) or loop.time() >= deadline or stop.is_set():
                return owned
            # Nothing announces that the membership has settled: ask again shortly.
            await asyncio.sleep(0.25)
    finally:
        await transport.close()


def _banner(cluster: DevCluster, owned: dict[str, int]) -> str:
    """The cluster's processes: the server and every node, with pids and shards."""
    lines = [
        f"clstr ledger cluster: {len(cluster.node_ids)} nodes, {cluster.num_shards} shards, "
        f"prefix {cluster.prefix!r}"
    ]
    if cluster.embedded and cluster.server is not None:
        lines.append(
            f"  nats-server  {cluster.url}  (embedded, JetStream on, pid {cluster.server.pid})"
        )
    else:
        lines.append(f"  nats-server  {cluster.url}  (external)")
    for process in cluster.processes:
        lines.append(
            f"  {process.node_id}  pid {process.pid}  {owned.get(process.node_id, 0)} shards"
        )
    return "\n".join(lines)


def _hints(cluster: DevCluster) -> str:
    env = []
    if cluster.url != DEFAULT_NATS_URL:
        env.append(f"CLSTR_NATS_URL={cluster.url}")
    if cluster.num_shards != DEFAULT_SHARDS:
        env.append(f"CLSTR_SHARDS={cluster.num_shards}")
    lines = ["try, in another terminal:"]
    if env:
        lines.append(f"  export {' '.join(env)}")
    lines += [
        "  clstr ledger event credits alice 100 --note 'top-up'",
        "  clstr ledger event credits alice -30 --min-balance 0",
        "  clstr ledger reserve credits alice 20 --ttl 60",
        "  clstr ledger balance credits",
        "  clstr ledger account credits alice",
        "",
        _dev.READY_LINE,
    ]
    return "\n".join(lines)
