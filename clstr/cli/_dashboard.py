"""``clstr dashboard``: the live web dashboard of a running cluster
(:mod:`clstr.observe`, docs/observability.md); and :func:`beside`, the
dashboard ``clstr dev up --dashboard`` and ``clstr demo`` serve next to their
cluster.

The dashboard (and nats-py with it) loads when it starts, not when the
``clstr`` parser is built.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import TYPE_CHECKING, Final

from ._common import EXIT_OK, CliError
from ._parser import Parser, Subcommands, add_command, port_number

if TYPE_CHECKING:
    from ..observe import Dashboard
    from ._devcluster import DevCluster

__all__ = ["DASHBOARD_PORT", "add_dashboard_port", "add_parser", "beside", "run"]

#: ``clstr.observe.DEFAULT_DASHBOARD_PORT``, repeated here so that building the
#: parser does not import the dashboard (a test keeps the two equal).
DASHBOARD_PORT: Final = 8470
#: What ``clstr dashboard`` prints once it serves (tests wait for it).
READY_PREFIX: Final = "clstr dashboard: "


def add_parser(sub: Subcommands, env: Mapping[str, str]) -> None:
    """Add ``dashboard``."""
    dashboard = add_command(
        sub,
        env,
        "dashboard",
        "serve the live web dashboard of a running cluster (shard map, nodes, rates, "
        "events) until Ctrl-C",
        run=run,
    )
    dashboard.add_argument(
        "--host",
        default="127.0.0.1",
        help="interface to serve on (default 127.0.0.1; on loopback it answers only "
        "requests addressed to a loopback name)",
    )
    dashboard.add_argument(
        "--port",
        type=port_number,
        default=DASHBOARD_PORT,
        help=f"port to serve on (default {DASHBOARD_PORT}; 0: any free port)",
    )


def add_dashboard_port(parser: Parser, implies: str = "") -> None:
    """Add ``--dashboard-port`` (for :func:`beside`) to a command of the dev cluster."""
    parser.add_argument(
        "--dashboard-port",
        type=port_number,
        default=None,
        metavar="PORT",
        help=f"port of the dashboard (default {DASHBOARD_PORT} when free, else any; "
        f"0: any){implies}",
    )


def run(args: argparse.Namespace) -> int:
    """Serve the dashboard until SIGINT or SIGTERM."""
    return asyncio.run(_serve(args))


async def _serve(args: argparse.Namespace) -> int:
    from ..errors import ConfigurationError
    from ..observe import serve_dashboard
    from ._connection import nats_options

    serving = asyncio.ensure_future(
        serve_dashboard(
            args.nats_url,
            # The connect deadline of the command line (3 s by default) bounds each
            # attempt; the dashboard retries, and its page says why it cannot connect.
            options=nats_options(args, "clstr-dashboard"),
            prefix=args.prefix,
            # Unless told, the count the nodes announce.
            num_shards=args.shards if args.shards_explicit else None,
            seed=args.seed,
            service_name=args.service_name,
            host=args.host,
            port=args.port,
            ready=lambda dashboard: _say(f"{READY_PREFIX}{dashboard.url} (Ctrl-C to stop)"),
        )
    )
    with _cancel_on_signals(serving):
        try:
            await serving
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # this command itself is cancelled, not only the dashboard
        except ConfigurationError as exc:
            raise CliError(str(exc)) from None
    return EXIT_OK


@contextlib.contextmanager
def _cancel_on_signals(task: asyncio.Future[None]) -> Iterator[None]:
    """SIGINT and SIGTERM cancel ``task`` (the dashboard then closes its pages' streams)."""
    loop = asyncio.get_running_loop()
    installed = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(signum, task.cancel)
        except (NotImplementedError, RuntimeError, ValueError):  # no POSIX, no main thread
            continue
        installed.append(signum)
    try:
        yield
    finally:
        for signum in installed:
            loop.remove_signal_handler(signum)


def _say(line: str) -> None:
    with contextlib.suppress(OSError):  # nobody reads stdout any more: serve regardless
        print(line, flush=True)


@contextlib.asynccontextmanager
async def beside(cluster: DevCluster, port: int | None) -> AsyncIterator[Dashboard]:
    """A dashboard of the started ``cluster``, served while in the block.

    ``port`` ``None`` takes :data:`DASHBOARD_PORT` when it is free and any free
    port when it is not, as the dev cluster does for its NATS port; a port
    given that cannot be bound is a :class:`CliError`.
    """
    from ..errors import ConfigurationError
    from ..observe import Dashboard

    def make(port: int) -> Dashboard:
        return Dashboard(
            cluster.url,
            prefix=cluster.prefix,
            num_shards=cluster.num_shards,
            seed=cluster.seed,
            service_name=cluster.service_name,
            port=port,
        )

    dashboard = make(DASHBOARD_PORT if port is None else port)
    try:
        await dashboard.start()
    except ConfigurationError as exc:
        if port is not None:
            raise CliError(f"{exc} (--dashboard-port)") from None
        dashboard = make(0)
        await dashboard.start()
    try:
        yield dashboard
    finally:
        await dashboard.stop()
