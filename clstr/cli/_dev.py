"""``clstr dev up`` and ``clstr demo``: the local cluster, in front of a person,
with the live dashboard beside it when asked (``demo``: unless told not to).

The cluster's machinery (:mod:`clstr.testing`, nats-py) loads when a cluster
starts, not when the ``clstr`` parser is built.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Final

from ..protocol import DEFAULT_PREFIX
from ._common import (
    DEFAULT_APP,
    DEFAULT_NATS_URL,
    DEFAULT_SERVICE_NAME,
    DEFAULT_SHARDS,
    DEV_MEMBERSHIPS,
    EXIT_FAILED,
    EXIT_OK,
    CliError,
)
from ._dashboard import add_dashboard_port, beside
from ._logrelay import LogRelay
from ._parser import Parser, Subcommands, add_command, port_number, positive_int, seconds

if TYPE_CHECKING:
    from ..observe import Dashboard
    from ..transports.nats import NatsTransport
    from ._devcluster import DevCluster

__all__ = ["READY_LINE", "STOP_SIGNALS", "add_parser", "run", "dev_up", "demo"]


# -- the parsers -------------------------------------------------------------------


def add_parser(sub: Subcommands, env: Mapping[str, str]) -> None:
    """Add ``dev up`` and ``demo``."""
    dev = add_command(sub, env, "dev", "a local cluster for development", log_level="info")
    actions = dev.add_subparsers(
        dest="dev_command", metavar="ACTION", required=True, parser_class=Parser
    )
    _add_up(actions, env)
    _add_demo(sub, env)


def _add_up(actions: Subcommands, env: Mapping[str, str]) -> None:
    up = add_command(
        actions,
        env,
        "up",
        "start nats-server and N node processes of the demo app (or --app); Ctrl-C stops all",
        run=run,
        log_level="info",
    )
    up.add_argument("--nodes", type=positive_int, default=3, help="node processes (default 3)")
    up.add_argument(
        "--port",
        type=port_number,
        default=None,
        help="client port of the embedded nats-server (default 4222 when free; 0: any)",
    )
    up.add_argument("--app", default=DEFAULT_APP, help=f"module:attr (default {DEFAULT_APP})")
    up.add_argument(
        "--metrics-port-base",
        type=port_number,
        default=None,
        metavar="PORT",
        help="serve node i's Prometheus metrics on PORT+i (default off)",
    )
    up.add_argument(
        "--stop-timeout",
        type=seconds,
        default=10.0,
        help="seconds nodes get to finish in-flight work on stop (default 10)",
    )
    _add_membership(up)
    up.add_argument(
        "--dashboard",
        action="store_true",
        help="serve the live web dashboard of the cluster too (docs/observability.md)",
    )
    add_dashboard_port(up, "; implies --dashboard")


def _add_membership(parser: Parser) -> None:
    parser.add_argument(
        "--membership",
        choices=DEV_MEMBERSHIPS,
        default="static",
        help="static (default): a fixed member list, a dead node's shards stay without "
        "owner and the cluster stops; kv: dynamic membership on the embedded server's "
        "JetStream KV, a dead node's shards move to the others and the cluster serves on",
    )


def _add_demo(sub: Subcommands, env: Mapping[str, str]) -> None:
    demo = add_command(
        sub,
        env,
        "demo",
        "run a local cluster, send requests, show who answered and the shard map, "
        "then serve until Ctrl-C (--once: stop after the requests)",
        run=run,
    )
    demo.add_argument("--nodes", type=positive_int, default=3, help="node processes (default 3)")
    demo.add_argument("--keys", type=positive_int, default=12, help="distinct keys (default 12)")
    demo.add_argument("--rounds", type=positive_int, default=3, help="requests per key (default 3)")
    demo.add_argument(
        "--once",
        action="store_true",
        help="stop the cluster and exit after the requests (for scripts)",
    )
    demo.add_argument(
        "--port",
        type=port_number,
        default=None,
        help="client port of the embedded nats-server (default 4222 when free, "
        "else any; with --once any; 0: any)",
    )
    _add_membership(demo)
    demo.add_argument(
        "--no-dashboard",
        dest="dashboard",
        action="store_false",
        help="do not serve the live web dashboard (--once never does)",
    )
    add_dashboard_port(demo)


def run(args: argparse.Namespace) -> int:
    """Run ``dev up`` or ``demo`` until it ends."""
    return asyncio.run(demo(args) if args.command == "demo" else dev_up(args))


# -- the cluster in front of a person ----------------------------------------------------


#: The signals that stop the local cluster: Ctrl-C, a polite kill, and a closed terminal.
STOP_SIGNALS: Final = tuple(
    getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name)
)
#: The line that says the cluster serves until stopped (scripts and tests wait for it).
READY_LINE: Final = "cluster ready; press Ctrl-C to stop"


@contextlib.contextmanager
def _stop_on_signals(stop: asyncio.Event) -> Iterator[None]:
    loop = asyncio.get_running_loop()
    installed = []
    for signum in STOP_SIGNALS:
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


def _say(*lines: str) -> None:
    """Print to stdout for the person watching; output nobody can read any more (a
    closed terminal after SIGHUP, a closed pipe) must not stop the orderly shutdown."""
    with contextlib.suppress(OSError):
        print("\n".join(lines), flush=True)


def _cluster(args: argparse.Namespace, *, quiet: bool, port: int | None) -> DevCluster:
    from ._devcluster import DevCluster

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
        port=port,
        metrics_port_base=getattr(args, "metrics_port_base", None),
        service_name=args.service_name,
        membership=args.membership,
        log_level="debug" if shown == "debug" else "info",
        stop_timeout=getattr(args, "stop_timeout", 10.0),
        on_log=LogRelay(json_lines=args.log_json, level=shown),
    )


async def _start(cluster: DevCluster, stop: asyncio.Event) -> bool:
    """Start ``cluster`` unless a signal comes first; return whether it started."""
    from ..testing import NatsServerError, NodeProcessError

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
    except NodeProcessError as exc:
        raise CliError(f"the dev cluster did not start: {exc}", code=EXIT_FAILED) from None
    except NatsServerError as exc:
        raise CliError(
            f"cannot start the embedded nats-server: {exc}; install it with "
            "pip install 'clstr[testing]', or use a running server with --nats-url",
            code=EXIT_FAILED,
        ) from None
    return True


def _banner(cluster: DevCluster, dashboard: Dashboard | None) -> str:
    """The cluster's processes: the server, the dashboard and every node, with pids
    and shards."""
    lines = [
        f"clstr dev cluster: {len(cluster.node_ids)} nodes, {cluster.num_shards} shards, "
        f"prefix {cluster.prefix!r}" + (", kv membership" if cluster.membership == "kv" else ""),
    ]
    if cluster.embedded and cluster.server is not None:
        lines.append(
            f"  nats-server  {cluster.url}  (embedded, JetStream on, pid {cluster.server.pid})"
        )
    else:
        lines.append(f"  nats-server  {cluster.url}  (external)")
    if dashboard is not None:
        lines.append(f"  dashboard    {dashboard.url}")
    pad = max(len(n) for n in cluster.node_ids)
    for process in cluster.processes:
        ready = process.ready_record or {}
        extra = ""
        if ready.get("metrics_port"):
            extra = f"  metrics http://127.0.0.1:{ready['metrics_port']}/metrics"
        lines.append(
            f"  {process.node_id.ljust(pad)}  pid {process.pid}  "
            f"{cluster.shards.get(process.node_id, '?')} shards{extra}"
        )
    return "\n".join(lines)


def _hints(cluster: DevCluster) -> str:
    """What to try against the running cluster, then the ready line."""
    env = []
    if cluster.url != DEFAULT_NATS_URL:
        env.append(f"CLSTR_NATS_URL={cluster.url}")
    if cluster.num_shards != DEFAULT_SHARDS:
        env.append(f"CLSTR_SHARDS={cluster.num_shards}")
    if cluster.prefix != DEFAULT_PREFIX:
        env.append(f"CLSTR_PREFIX={cluster.prefix}")
    if cluster.seed:
        env.append(f"CLSTR_SEED={cluster.seed}")
    if cluster.service_name != DEFAULT_SERVICE_NAME:
        env.append(f"CLSTR_SERVICE_NAME={cluster.service_name}")
    lines = ["try, in another terminal:"]
    if env:
        lines.append(f"  export {' '.join(env)}")
    lines += [
        "  clstr status",
        """  clstr request user-42 Greet '{"name": "ann"}'""",
        """  clstr request counter-1 counter.add '{"by": 5}'""",
        f"  nats --server {cluster.url} micro ls   (NATS CLI: the nodes as services)",
    ]
    if cluster.membership == "kv":
        lines.append(
            "  kill -9 <a node's pid>   (its shards move to the others once its heartbeat expires)"
        )
    lines += ["", READY_LINE]
    return "\n".join(lines)


async def _serve(cluster: DevCluster, stop: asyncio.Event) -> int:
    """Wait for a stop signal (exit code 0) or a node's death. Under static membership
    a dead node's shards are left without owner: say so and stop (exit code 1). Under
    KV membership they move to the others: warn and serve on, until the last node
    dies (exit code 1)."""
    stopping = asyncio.ensure_future(stop.wait())
    died = {asyncio.ensure_future(p.wait()): p for p in cluster.processes}
    try:
        while True:
            done, _ = await asyncio.wait({stopping, *died}, return_when=asyncio.FIRST_COMPLETED)
            if stopping in done:
                return EXIT_OK
            gone = sorted((died.pop(w) for w in done), key=lambda p: p.node_id)
            if cluster.membership == "kv" and died:
                for process in gone:
                    _complain(
                        f"clstr: warning: {process.node_id} exited with code "
                        f"{process.returncode}; its shards move to the other nodes"
                    )
                continue
            for process in gone:
                _complain(
                    f"clstr: error: {process.node_id} exited with code "
                    f"{process.returncode}; stopping the cluster"
                )
            return EXIT_FAILED
    finally:
        for waiter in (stopping, *died):
            waiter.cancel()
        await asyncio.gather(stopping, *died, return_exceptions=True)


def _complain(line: str) -> None:
    """One line on stderr, if anyone can still read it."""
    with contextlib.suppress(OSError):
        print(line, file=sys.stderr, flush=True)


def _stopping(cluster: DevCluster) -> str:
    return "stopping: the nodes first" + (", then nats-server" if cluster.embedded else "")


def _stopped(cluster: DevCluster) -> str:
    """What a stop ended: every node with its exit code, and the server."""
    parts = [f"{p.node_id} (exit {p.returncode})" for p in cluster.processes]
    if cluster.embedded:
        return "stopped: " + ", ".join([*parts, "nats-server"])
    return f"stopped: {', '.join(parts)}; the external nats-server at {cluster.url} keeps running"


async def dev_up(args: argparse.Namespace) -> int:
    """Run the dev cluster until SIGINT/SIGTERM/SIGHUP, or until a node dies (exit 1)."""
    cluster = _cluster(args, quiet=False, port=args.port)
    stop = asyncio.Event()
    with _stop_on_signals(stop):
        try:
            if not await _start(cluster, stop):
                return EXIT_OK
            wanted = args.dashboard or args.dashboard_port is not None
            async with contextlib.AsyncExitStack() as stack:
                # Entered once the cluster runs, left before it stops.
                dashboard = (
                    await stack.enter_async_context(beside(cluster, args.dashboard_port))
                    if wanted
                    else None
                )
                _say(_banner(cluster, dashboard), "", _hints(cluster))
                code = await _serve(cluster, stop)
                _say(_stopping(cluster))
        finally:
            await cluster.stop()
    _say(_stopped(cluster))
    return code


async def demo(args: argparse.Namespace) -> int:
    """Start a dev cluster, send requests from here and show who answered each key;
    then show the shard map and serve until a signal, or with ``--once`` stop at once."""
    from ..errors import ConnectionFailedError
    from ..transports.nats import NatsOptions, NatsTransport

    # With --once nobody connects afterwards: leave 4222 to a 'clstr dev up'.
    port = args.port if args.port is not None else (0 if args.once else None)
    cluster = _cluster(args, quiet=True, port=port)
    stop = asyncio.Event()
    code = EXIT_OK
    with _stop_on_signals(stop):
        try:
            if not await _start(cluster, stop):
                return EXIT_OK
            async with contextlib.AsyncExitStack() as stack:
                # Nobody could open it before --once ends the demo.
                dashboard = (
                    await stack.enter_async_context(beside(cluster, args.dashboard_port))
                    if args.dashboard and not args.once
                    else None
                )
                _say(_banner(cluster, dashboard), "")
                try:
                    transport = await NatsTransport.connect(
                        cluster.url, NatsOptions(name="clstr-demo")
                    )
                except ConnectionFailedError as exc:
                    raise CliError(
                        f"the demo cannot reach its cluster: {exc}", code=EXIT_FAILED
                    ) from None
                try:
                    # A signal during the requests ends the demo there.
                    serve = await _demo_requests(cluster, transport, args, stop) and not args.once
                    if serve:
                        _say("", await _shard_map(cluster, transport), "", _hints(cluster))
                finally:
                    await transport.close()
                if serve:
                    code = await _serve(cluster, stop)
                _say(_stopping(cluster))
        finally:
            await cluster.stop()
    _say(_stopped(cluster))
    return code


async def _demo_requests(
    cluster: DevCluster, transport: NatsTransport, args: argparse.Namespace, stop: asyncio.Event
) -> bool:
    """Greet ``args.keys`` keys ``args.rounds`` times each; check every reply came from
    the key's HRW owner. Returns ``False`` when a signal came first."""
    from ..client import Client
    from ..errors import ClstrError
    from ..hashing import owner_of
    from .demo_app import Greet, Greeting

    client = Client(
        transport, num_shards=cluster.num_shards, seed=cluster.seed, prefix=cluster.prefix
    )
    answered: dict[str, int] = {}
    _say(f"{args.keys} keys, {args.rounds} requests each, from this process; the last round:")
    for round_ in range(args.rounds):
        for k in range(args.keys):
            if stop.is_set():
                return False
            key = f"user-{k}"
            try:
                reply = await client.key(key).call(Greet(name=key), Greeting)
            except ClstrError as exc:
                raise CliError(
                    f"the request for {key!r} failed: {type(exc).__name__}: {exc}",
                    code=EXIT_FAILED,
                ) from None
            shard = client.shard_for(key)
            expected = owner_of(shard, cluster.node_ids, cluster.seed)
            if reply.node != expected:
                raise CliError(
                    f"{key} was answered by {reply.node}, not its owner {expected}",
                    code=EXIT_FAILED,
                )
            answered[reply.node] = answered.get(reply.node, 0) + 1
            if round_ == args.rounds - 1:
                _say(
                    f"  {key:<10} shard {shard:>3} -> {reply.node}"
                    f"  ({reply.text}, visit {reply.visits})"
                )
    _say(
        f"requests answered per node: {dict(sorted(answered.items()))}",
        "every key was answered by its owner, the node HRW places its shard on",
    )
    return True


async def _shard_map(cluster: DevCluster, transport: NatsTransport) -> str:
    """The cluster as ``clstr status`` prints it."""
    from ..observe import gather_view, render_table

    view = await gather_view(
        transport,
        num_shards=cluster.num_shards,
        prefix=cluster.prefix,
        seed=cluster.seed,
        service_name=cluster.service_name,
        expected_nodes=len(cluster.node_ids),
    )
    return render_table(view)
