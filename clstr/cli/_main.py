"""The ``clstr`` command: a local cluster, requests from the shell, the shard map.

::

    clstr dev up [--nodes 3]          nats-server + N node processes, until Ctrl-C
    clstr demo [--once]               the same, sends requests, prints who answered and
                                      the shard map, serves until Ctrl-C (--once: exits)
    clstr request KEY TYPE [JSON]     send a request; print the reply and the node
    clstr notify KEY TYPE [JSON]      fire and forget
    clstr status [--json]             nodes, shard counts and the shard map
    clstr shard KEY                   the shard of a key (offline)
    clstr node --id ID --app M:ATTR   run one node process (production)
    clstr bench ...                   benchmarks (clstr.bench)

Options shared by every command may come before or after it; each has an
environment variable (see :data:`ENV_VARS`) so containers configure it
without flags. Options may also come between the positional arguments of
``request`` and ``notify``. The CLI is the one place that configures logging
(the library never does). Exit codes: 0 success, 1 the operation failed (a
handler error, a timeout, shards without owner), 2 a usage or environment
error, told in one line on stderr; 141 (as if killed by SIGPIPE) when the
reader of its output went away, as in ``clstr status | head -1``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import inspect
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final

from ..hashing import shard_for_key
from ._common import (
    DEFAULT_APP,
    DEFAULT_NATS_URL,
    DEFAULT_SERVICE_NAME,
    DEFAULT_SHARDS,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    CliError,
    configure_logging,
)

if TYPE_CHECKING:
    from ..client import Client
    from ..protocol import NodeInfo
    from ..transports.base import Transport

__all__ = [
    "ENV_VARS",
    "DEFAULT_NATS_URL",
    "EXIT_OK",
    "EXIT_FAILED",
    "EXIT_USAGE",
    "build_parser",
    "main",
]

#: Environment variables the command reads, and the option each one sets.
ENV_VARS: Final[Mapping[str, str]] = {
    "CLSTR_NATS_URL": "--nats-url",
    "CLSTR_SHARDS": "--shards",
    "CLSTR_SEED": "--seed",
    "CLSTR_PREFIX": "--prefix",
    "CLSTR_SERVICE_NAME": "--service-name",
    "CLSTR_LOG_LEVEL": "--log-level",
    "CLSTR_LOG_JSON": "--log-json",
    "CLSTR_NATS_CREDS": "--creds",
    "CLSTR_NATS_NKEY": "--nkey-seed",
    "CLSTR_NATS_USER": "--user",
    "CLSTR_NATS_PASSWORD": "--password",
    "CLSTR_NATS_TOKEN": "--token",
    "CLSTR_TLS_CA": "--tls-ca",
    "CLSTR_TLS_CERT": "--tls-cert",
    "CLSTR_TLS_KEY": "--tls-key",
    "CLSTR_NODE_ID": "node --id",
    "CLSTR_STATIC_NODES": "node --static-nodes",
    "CLSTR_MEMBERSHIP": "node --membership",
    "CLSTR_UVLOOP": "node --uvloop",
    "CLSTR_APP": "node --app",
    "CLSTR_METRICS_PORT": "node --metrics-port",
}

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"", "0", "false", "no", "off"}


# -- argument types ----------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 0..65535, got {value}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0 seconds, got {value}")
    return value


def _urls(text: str) -> list[str]:
    urls = [part.strip() for part in text.split(",") if part.strip()]
    if not urls:
        raise argparse.ArgumentTypeError("expected at least one NATS URL")
    return urls


def _header(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"a header is NAME=VALUE, got {text!r}")
    return name, value


def _node_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _env_flag(environ: Mapping[str, str], name: str) -> bool:
    raw = environ.get(name, "").strip().lower()
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    raise CliError(f"{name}={environ[name]!r} is not a yes/no value; use 1 or 0")


class _Explicit(argparse.Action):
    """Store the value and remember that it was given on the command line."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        setattr(namespace, self.dest, values)
        setattr(namespace, f"{self.dest}_explicit", True)


# -- the parser --------------------------------------------------------------------


def _add_common(parser: argparse.ArgumentParser, env: Mapping[str, str], *, top: bool) -> None:
    """The options every command takes. On subcommands they default to SUPPRESS,
    so ``clstr --shards 8 status`` and ``clstr status --shards 8`` both work."""

    def default(value: Any) -> Any:
        return value if top else argparse.SUPPRESS

    group = parser.add_argument_group("cluster options (any command, env in brackets)")
    group.add_argument(
        "--nats-url",
        metavar="URL[,URL...]",
        type=_urls,
        action=_Explicit,
        default=default(env.get("CLSTR_NATS_URL", DEFAULT_NATS_URL)),
        help=f"NATS server(s) to connect to [CLSTR_NATS_URL] (default {DEFAULT_NATS_URL})",
    )
    group.add_argument(
        "--shards",
        metavar="N",
        type=_positive_int,
        action=_Explicit,
        default=default(env.get("CLSTR_SHARDS", str(DEFAULT_SHARDS))),
        help=f"number of shards; must match the nodes' [CLSTR_SHARDS] (default {DEFAULT_SHARDS})",
    )
    group.add_argument(
        "--seed",
        default=default(env.get("CLSTR_SEED", "")),
        help="hash seed; must match the nodes' [CLSTR_SEED] (default none)",
    )
    group.add_argument(
        "--prefix",
        default=default(env.get("CLSTR_PREFIX", "clstr")),
        help="subject prefix; must match the nodes' [CLSTR_PREFIX] (default clstr)",
    )
    group.add_argument(
        "--service-name",
        default=default(env.get("CLSTR_SERVICE_NAME", DEFAULT_SERVICE_NAME)),
        help="NATS service discovery name [CLSTR_SERVICE_NAME] (default clstr)",
    )
    group.add_argument(
        "--connect-timeout",
        metavar="SECONDS",
        type=_seconds,
        default=default(3.0),
        help="give up connecting to NATS after this long (default 3)",
    )
    auth = parser.add_argument_group("NATS credentials and TLS (prefer the variables for secrets)")
    for flag, var, text in (
        ("--creds", "CLSTR_NATS_CREDS", "a .creds file (JWT and NKey)"),
        ("--nkey-seed", "CLSTR_NATS_NKEY", "an NKey seed file"),
        ("--user", "CLSTR_NATS_USER", "user name"),
        ("--password", "CLSTR_NATS_PASSWORD", "password"),
        ("--token", "CLSTR_NATS_TOKEN", "authentication token"),
        ("--tls-ca", "CLSTR_TLS_CA", "CA bundle to verify the server with (turns TLS on)"),
        ("--tls-cert", "CLSTR_TLS_CERT", "client certificate, for mutual TLS"),
        ("--tls-key", "CLSTR_TLS_KEY", "the client certificate's key"),
    ):
        auth.add_argument(
            flag,
            metavar="FILE" if var.endswith(("CREDS", "NKEY", "CA", "CERT", "KEY")) else "VALUE",
            default=default(env.get(var) or None),
            help=f"{text} [{var}]",
        )
    group.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        default=default(env.get("CLSTR_LOG_LEVEL") or None),
        help="log level [CLSTR_LOG_LEVEL] (default info for node and dev, else warning)",
    )
    group.add_argument(
        "--log-json",
        action="store_true",
        default=default(_env_flag(env, "CLSTR_LOG_JSON")),
        help="log one JSON object per line [CLSTR_LOG_JSON=1]",
    )


def _subcommand(
    sub: Any, env: Mapping[str, str], name: str, help_text: str, **kwargs: Any
) -> _Parser:
    parser = sub.add_parser(name, help=help_text, description=help_text, **kwargs)
    assert isinstance(parser, _Parser)  # the subparsers are made with parser_class=_Parser
    _add_common(parser, env, top=False)
    return parser


def build_parser(environ: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    """The ``clstr`` argument parser, its defaults read from ``environ`` (default
    ``os.environ``; see :data:`ENV_VARS`).

    Raises :class:`CliError` when an environment variable holds a value no
    option accepts in a way argparse cannot report (a yes/no flag).
    """
    env = os.environ if environ is None else environ
    parser = argparse.ArgumentParser(
        prog="clstr",
        description="clstr: route keyed requests to the node that owns the key, over NATS.",
        epilog="Run 'clstr COMMAND --help' for a command's options.",
    )
    _add_common(parser, env, top=True)
    parser.set_defaults(
        nats_url_explicit=False,
        shards_explicit="CLSTR_SHARDS" in env,
        handler=None,
    )
    sub = parser.add_subparsers(
        dest="command", metavar="COMMAND", required=True, parser_class=_Parser
    )

    # dev up
    dev = _subcommand(sub, env, "dev", "a local cluster for development")
    dev_sub = dev.add_subparsers(
        dest="dev_command", metavar="ACTION", required=True, parser_class=_Parser
    )
    up = _subcommand(
        dev_sub,
        env,
        "up",
        "start nats-server and N node processes of the demo app (or --app); Ctrl-C stops all",
    )
    up.add_argument("--nodes", type=_positive_int, default=3, help="node processes (default 3)")
    up.add_argument(
        "--port",
        type=_port,
        default=None,
        help="client port of the embedded nats-server (default 4222 when free; 0: any)",
    )
    up.add_argument("--app", default=DEFAULT_APP, help=f"module:attr (default {DEFAULT_APP})")
    up.add_argument(
        "--metrics-port-base",
        type=_port,
        default=None,
        metavar="PORT",
        help="serve node i's Prometheus metrics on PORT+i (default off)",
    )
    up.add_argument(
        "--stop-timeout",
        type=_seconds,
        default=10.0,
        help="seconds nodes get to finish in-flight work on stop (default 10)",
    )
    up.set_defaults(handler=_run_dev_up)

    # demo
    demo = _subcommand(
        sub,
        env,
        "demo",
        "run a local cluster, send requests, show who answered and the shard map, "
        "then serve until Ctrl-C (--once: stop after the requests)",
    )
    demo.add_argument("--nodes", type=_positive_int, default=3, help="node processes (default 3)")
    demo.add_argument("--keys", type=_positive_int, default=12, help="distinct keys (default 12)")
    demo.add_argument(
        "--rounds", type=_positive_int, default=3, help="requests per key (default 3)"
    )
    demo.add_argument(
        "--once",
        action="store_true",
        help="stop the cluster and exit after the requests (for scripts)",
    )
    demo.add_argument(
        "--port",
        type=_port,
        default=None,
        help="client port of the embedded nats-server (default 4222 when free, "
        "else any; with --once any; 0: any)",
    )
    demo.set_defaults(handler=_run_demo)

    # request / notify
    for name, help_text in (
        ("request", "send a request to the owner of KEY; print the reply and who answered"),
        ("notify", "send a notification to the owner of KEY (no reply)"),
    ):
        cmd = _subcommand(sub, env, name, help_text)
        cmd.intermixed = True  # `request KEY TYPE --shards 16 JSON` works too
        cmd.add_argument("key", metavar="KEY", help="the routing key (non-empty)")
        cmd.add_argument("type", metavar="TYPE", help="the message type, e.g. Greet")
        cmd.add_argument(
            "payload",
            metavar="JSON",
            nargs="?",
            default=None,
            help="payload as JSON, sent as msgpack; '-' reads it from stdin (default empty)",
        )
        cmd.add_argument(
            "-H",
            "--header",
            type=_header,
            action="append",
            default=[],
            metavar="NAME=VALUE",
            help="a user header (repeatable)",
        )
        if name == "request":
            cmd.add_argument(
                "--timeout",
                type=_seconds,
                default=5.0,
                help="deadline in seconds (default 5)",
            )
            cmd.add_argument(
                "--json",
                action="store_true",
                help="print one JSON object: key, shard, node, ms, reply",
            )
            cmd.set_defaults(handler=_run_request)
        else:
            cmd.set_defaults(handler=_run_notify)

    # status
    status = _subcommand(sub, env, "status", "the cluster: nodes, shard counts, shard map")
    status.add_argument("--json", action="store_true", help="print JSON for scripts")
    status.add_argument(
        "--wait",
        type=_seconds,
        default=None,
        metavar="SECONDS",
        help="wait up to SECONDS until every shard has an owner",
    )
    status.add_argument(
        "--timeout",
        type=_seconds,
        default=2.0,
        help="seconds to wait for each node's answer (default 2)",
    )
    status.set_defaults(handler=_run_status)

    # shard
    shard = _subcommand(sub, env, "shard", "print the shard of KEY (offline)")
    shard.add_argument("key", metavar="KEY", help="the routing key (non-empty)")
    shard.set_defaults(handler=_run_shard)

    # node
    node = _subcommand(
        sub, env, "node", "run one node process of a handler (the way production runs it)"
    )
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
    node.add_argument(
        "--static-nodes",
        type=_node_list,
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
        type=_seconds,
        default=1.0,
        help="capacity weight of this node under --membership kv (default 1)",
    )
    node.add_argument(
        "--metrics-port",
        type=_port,
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
    node.add_argument("--max-concurrency", type=_positive_int, default=100)
    node.add_argument("--max-pending", type=_positive_int, default=10_000)
    node.add_argument(
        "--stop-timeout",
        type=_seconds,
        default=10.0,
        help="seconds in-flight handlers get on SIGTERM before they are cancelled",
    )
    node.add_argument(
        "--uvloop",
        action="store_true",
        default=_env_flag(env, "CLSTR_UVLOOP"),
        help="run on uvloop, the faster event loop [CLSTR_UVLOOP=1] (pip install 'clstr[uvloop]')",
    )
    node.add_argument(
        "--watch-stdin",
        action="store_true",
        help="stop when stdin closes (for a supervising parent process)",
    )
    node.set_defaults(handler=_run_node)

    # operations on a node with dynamic membership
    for op, text in (
        ("cordon", "place no new shards on a node (kv membership); it hands back its shards"),
        ("uncordon", "let a cordoned node take shards again"),
        ("drain", "move every shard away from a node, then return (before stopping it)"),
    ):
        cmd = _subcommand(sub, env, op, text)
        cmd.add_argument("node_id", metavar="NODE_ID")
        cmd.add_argument("--timeout", type=_seconds, default=60.0, help="seconds (default 60)")
        cmd.set_defaults(handler=_run_control, op=op)

    # bench (lazily loaded from clstr.bench)
    bench = sub.add_parser("bench", help="benchmarks (clstr.bench)")
    bench.lazy = _load_bench
    bench.set_defaults(handler=_run_bench)

    return parser


class _Parser(argparse.ArgumentParser):
    """A subcommand parser whose arguments may be added on first use (``bench``:
    its options come from ``clstr.bench``, imported only when asked for), and
    which may take options between its positionals (``intermixed``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy: Callable[[_Parser], None] | None = None
        #: Take no arguments at all (a command that can only report it is unavailable).
        self.ignore_args = False
        #: Accept options between positionals, as parse_intermixed_args does; only
        #: for a parser without subparsers (argparse's own restriction).
        self.intermixed = False
        self._in_intermixed = False

    def _load(self) -> None:
        lazy, self.lazy = self.lazy, None
        if lazy is not None:
            lazy(self)

    # typeshed overloads parse_known_args on the namespace type; one signature suffices here.
    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        self._load()
        if self.ignore_args:
            return super().parse_known_args([], namespace)[0], []
        if self.intermixed and not self._in_intermixed:
            # The parent parser hands its subcommand's arguments to parse_known_args;
            # the intermixed parse calls it again (twice), which must then parse plainly.
            self._in_intermixed = True
            try:
                return super().parse_known_intermixed_args(args, namespace)
            finally:
                self._in_intermixed = False
        return super().parse_known_args(args, namespace)

    def format_help(self) -> str:
        self._load()
        return super().format_help()


def _load_bench(parser: _Parser) -> None:
    """Fill the ``bench`` parser from ``clstr.bench``, or make it report why it cannot."""
    try:
        bench = importlib.import_module("clstr.bench")
    except ImportError as exc:
        if isinstance(exc, ModuleNotFoundError) and exc.name in ("clstr.bench", None):
            problem = "clstr bench is not available in this build (no clstr.bench module)"
        else:
            problem = f"clstr bench cannot load: {exc}"
        parser.ignore_args = True
        parser.set_defaults(bench_problem=problem)
        return
    bench.add_arguments(parser)
    parser.set_defaults(bench_module=bench)


# -- main ---------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``clstr`` command; returns the exit code."""
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        level = args.log_level or ("info" if args.command in ("node", "dev") else "warning")
        configure_logging(level, json_lines=args.log_json)
        handler: Callable[[argparse.Namespace], int] = args.handler
        code = handler(args)
        try:
            sys.stdout.flush()  # here, where a closed pipe is still handled below
        except BrokenPipeError:
            raise
        except OSError:  # the terminal is gone (SIGHUP): nobody left to tell
            _drop_stdout()
        return code
    except CliError as exc:
        print(f"clstr: error: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        print("clstr: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader of our output went away (`clstr status | head -1`): end
        # quietly, with the status a shell shows for a command SIGPIPE killed.
        _drop_stdout()
        return 128 + signal.SIGPIPE


def _drop_stdout() -> None:
    """Point stdout at /dev/null: what is still buffered would fail again at exit
    (and turn the exit code into 120)."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


# -- commands -------------------------------------------------------------------------


def _run_shard(args: argparse.Namespace) -> int:
    _check_key(args.key)
    print(shard_for_key(args.key, args.shards, args.seed))
    return EXIT_OK


def _run_node(args: argparse.Namespace) -> int:
    from ._node import NodeOptions, run_node

    app_dir = os.path.abspath(args.app_dir)
    if app_dir not in sys.path:
        sys.path.insert(0, app_dir)
    options = NodeOptions(
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
        nats_options=_nats_options(args, f"clstr-node-{args.node_id}"),
        watch_stdin=args.watch_stdin,
    )
    if args.uvloop:
        try:
            import uvloop
        except ImportError:
            raise CliError(
                "--uvloop needs the uvloop package: pip install 'clstr[uvloop]'"
            ) from None
        return int(uvloop.run(run_node(options)))
    return asyncio.run(run_node(options))


def _run_dev_up(args: argparse.Namespace) -> int:
    from ._dev import dev_up

    return asyncio.run(dev_up(args))


def _run_demo(args: argparse.Namespace) -> int:
    from ._dev import demo

    return asyncio.run(demo(args))


def _run_bench(args: argparse.Namespace) -> int:
    problem = getattr(args, "bench_problem", None)
    if problem is not None:
        raise CliError(f"{problem}; update clstr, or run the benchmarks in benchmarks/")
    result = args.bench_module.run(args)
    if inspect.isawaitable(result):
        result = asyncio.run(_await(result))
    return int(result or 0)


async def _await(awaitable: Any) -> Any:
    return await awaitable


# -- talking to a cluster ----------------------------------------------------------------


@contextlib.asynccontextmanager
async def _transport(args: argparse.Namespace) -> AsyncIterator[Any]:
    from ..errors import ConnectionFailedError
    from ..transports.nats import NatsTransport
    from ._common import quiet_logs

    with contextlib.ExitStack() as stack:
        if args.log_level is None:
            # A command reports a connection that fails in its one error line; the
            # connection's own warnings (nats disconnected, ...) would only repeat it.
            stack.enter_context(quiet_logs())
        try:
            transport = await NatsTransport.connect(args.nats_url, _nats_options(args, "clstr-cli"))
        except ConnectionFailedError as exc:
            raise CliError(
                f"{exc} (start a local cluster with 'clstr dev up', "
                "or set --nats-url / CLSTR_NATS_URL)"
            ) from None
        try:
            yield transport
        finally:
            await transport.close()


def _nats_options(args: argparse.Namespace, name: str) -> Any:
    """The connection settings of the command line (credentials, TLS, deadline)."""
    from ..transports.nats import NatsOptions

    tls = None
    if args.tls_ca or args.tls_cert:
        import ssl

        try:
            tls = ssl.create_default_context(cafile=args.tls_ca)
            if args.tls_cert:
                tls.load_cert_chain(args.tls_cert, args.tls_key)
        except (OSError, ssl.SSLError) as exc:
            raise CliError(f"cannot load the TLS files: {exc}") from None
    for path, option in ((args.creds, "--creds"), (args.nkey_seed, "--nkey-seed")):
        if path and not os.path.isfile(path):
            raise CliError(f"{option} {path!r} is not a file")
    return NatsOptions(
        name=name,
        user=args.user,
        password=args.password,
        token=args.token,
        credentials=args.creds,
        nkeys_seed=args.nkey_seed,
        tls=tls,
        connect_deadline=args.connect_timeout,
    )


def _read_payload(text: str | None) -> bytes:
    from ._common import json_to_msgpack

    if text == "-":
        text = sys.stdin.read()
    return json_to_msgpack(text)


def _check_key(key: str) -> None:
    """Refuse a key no request could carry: empty, or over the key size limit."""
    from ..codec import DEFAULT_LIMITS, check_limits
    from ..envelope import Envelope
    from ..errors import LimitExceededError

    if not key:
        raise CliError("the key is empty: every request is routed by its key; pass a non-empty KEY")
    try:
        check_limits(Envelope(type="", key=key), DEFAULT_LIMITS)
    except LimitExceededError as exc:
        raise CliError(str(exc)) from None


def _request_error(exc: Exception, args: argparse.Namespace, shard: int | None) -> CliError:
    """The one-line error of a failed request, with the exit code it deserves."""
    from .. import errors

    where = f"shard {shard} of key {args.key!r}" if shard is not None else f"key {args.key!r}"
    if isinstance(exc, errors.NoShardOwnerError):
        return CliError(
            f"no node serves {where} (prefix {args.prefix!r}, {args.shards} shards): start "
            "nodes ('clstr dev up'), or make --shards/--prefix/--seed match the nodes' "
            "('clstr status' shows them)"
        )
    if isinstance(exc, errors.NoHandlerError):
        return CliError(f"unknown message type {args.type!r}: {exc}")
    if isinstance(exc, errors.BadRequestError):
        return CliError(f"the node refused the message: {exc}; check TYPE and the JSON payload")
    if isinstance(
        exc,
        errors.MissingKeyError
        | errors.LimitExceededError
        | errors.ReservedHeaderError
        | errors.ConfigurationError
        | errors.PayloadError,
    ):
        return CliError(str(exc))
    if isinstance(exc, errors.DeadlineExceededError):
        return CliError(
            f"no reply from {where} within the deadline: {exc}; raise --timeout",
            code=EXIT_FAILED,
        )
    if isinstance(exc, errors.RemoteHandlerError):
        return CliError(f"the handler failed: {exc}", code=EXIT_FAILED)
    return CliError(f"{type(exc).__name__}: {exc}", code=EXIT_FAILED)


def _options(args: argparse.Namespace) -> list[Any]:
    from ..envelope import with_header
    from ..errors import ReservedHeaderError

    try:
        return [with_header(name, value) for name, value in args.header]
    except ReservedHeaderError as exc:
        raise CliError(str(exc)) from None


async def _owner(client: Any, shard: int, args: argparse.Namespace) -> NodeInfo | None:
    """What the node that answers ``shard`` now says about itself; ``None`` when it
    does not answer in time (the message itself will tell more).

    Raises :class:`CliError` when nobody serves the shard.
    """
    from ..errors import ClstrError, NoShardOwnerError

    # No longer than the request itself may take.
    timeout = min(2.0, getattr(args, "timeout", 2.0))
    try:
        info: NodeInfo = await client.shard(shard).node_info(timeout=timeout)
    except NoShardOwnerError as exc:
        raise _request_error(exc, args, shard) from None
    except ClstrError:
        return None
    return info


def _check_type(args: argparse.Namespace, info: NodeInfo, shard: int) -> None:
    """Refuse a message type the owner's handler does not list (when it lists its types)."""
    known = info.message_types
    if known is not None and args.type not in known:
        raise CliError(
            f"unknown message type {args.type!r}: {info.node_id}, the owner of shard {shard}, "
            f"handles {known}; nothing was sent"
        )


async def _warn_shard_count(
    transport: Any, args: argparse.Namespace, info: NodeInfo, shard: int
) -> None:
    """Warn when the owner uses another shard count than ``--shards``: the key then
    maps to another shard there, and the message may reach the wrong node.

    The count comes from the owner's service discovery metadata (one request
    to that node alone; nothing to wait for when it runs no discovery), else
    the owner's shard list shows a count larger than ``--shards`` (a smaller
    one cannot be seen from there).
    """
    from ..observe import announced_shards

    count = await announced_shards(transport, args.service_name, info.node_id)
    if count is not None and count != args.shards:
        right = shard_for_key(args.key, count, args.seed)
        problem = (
            f"{info.node_id} uses {count} shards but --shards is {args.shards}: key "
            f"{args.key!r} is in shard {right} there, not {shard}, so its owner may be "
            f"another node; pass --shards {count} (or set CLSTR_SHARDS={count})"
        )
    elif count is None and info.shards and max(info.shards) >= args.shards:
        problem = (
            f"{info.node_id} serves shard {max(info.shards)}, so it uses more shards than "
            f"--shards {args.shards}: key {args.key!r} is in another shard there, and its "
            "owner may be another node; pass the nodes' count ('clstr status' shows it)"
        )
    else:
        return
    print(f"clstr: warning: {problem}", file=sys.stderr)


async def _addressed(
    transport: Transport, args: argparse.Namespace
) -> tuple[Client, int, NodeInfo | None]:
    """The client, the key's shard and its owner's info, with the message type
    and the shard count checked against that owner (one place for request and
    notify)."""
    from ..client import Client

    client = Client(transport, num_shards=args.shards, seed=args.seed, prefix=args.prefix)
    shard = client.shard_for(args.key)
    info = await _owner(client, shard, args)
    if info is not None:
        _check_type(args, info, shard)
        await _warn_shard_count(transport, args, info, shard)
    return client, shard, info


def _run_request(args: argparse.Namespace) -> int:
    return asyncio.run(_request(args))


async def _request(args: argparse.Namespace) -> int:
    import json

    from ..errors import ClstrError
    from ._common import msgpack_to_json

    _check_key(args.key)
    data = _read_payload(args.payload)
    options = _options(args)
    async with _transport(args) as transport:
        client, shard, info = await _addressed(transport, args)
        started = time.perf_counter()
        try:
            reply = await client.request_key(
                args.key, args.type, data, timeout=args.timeout, options=options
            )
        except ClstrError as exc:
            raise _request_error(exc, args, shard) from None
        elapsed_ms = (time.perf_counter() - started) * 1000
    node = info.node_id if info is not None else None
    rendered = msgpack_to_json(reply)
    if args.json:
        print(
            json.dumps(
                {
                    "key": args.key,
                    "shard": shard,
                    "node": node,
                    "ms": round(elapsed_ms, 3),
                    "reply": json.loads(rendered),
                },
                ensure_ascii=False,
            )
        )
    else:
        print(rendered)
        print(
            f"shard {shard} -> {node or '(owner unknown)'} ({elapsed_ms:.1f} ms)",
            file=sys.stderr,
        )
    return EXIT_OK


def _run_notify(args: argparse.Namespace) -> int:
    return asyncio.run(_notify(args))


async def _notify(args: argparse.Namespace) -> int:
    from ..errors import ClstrError

    _check_key(args.key)
    data = _read_payload(args.payload)
    options = _options(args)
    async with _transport(args) as transport:
        # A notification to nobody, or of a type nobody handles, vanishes
        # without a trace: _addressed checks first.
        client, shard, info = await _addressed(transport, args)
        try:
            await client.notify_key(args.key, args.type, data, options=options)
        except ClstrError as exc:
            raise _request_error(exc, args, shard) from None
    node = info.node_id if info is not None else "(owner unknown)"
    print(f"notified shard {shard} -> {node}", file=sys.stderr)
    return EXIT_OK


def _run_control(args: argparse.Namespace) -> int:
    return asyncio.run(_control(args))


async def _control(args: argparse.Namespace) -> int:
    import json

    from ..errors import NoShardOwnerError, RequestTimeoutError
    from ..membership import control_subject

    async with _transport(args) as transport:
        subject = control_subject(args.prefix, args.node_id)
        try:
            reply = await transport.request(
                subject, json.dumps({"op": args.op}).encode(), args.timeout
            )
        except NoShardOwnerError:
            raise CliError(
                f"no node {args.node_id!r} with dynamic membership answers on {subject}; "
                "check the id (clstr status) and that it runs with --membership kv"
            ) from None
        except RequestTimeoutError:
            raise CliError(
                f"node {args.node_id!r} did not finish {args.op} within "
                f"{args.timeout}s; retry with a longer --timeout"
            ) from None
    answer = json.loads(reply)
    if not answer.get("ok"):
        raise CliError(f"{args.node_id}: {answer.get('error', 'refused')}")
    print(f"{args.node_id}: {args.op} done")
    return EXIT_OK


def _run_status(args: argparse.Namespace) -> int:
    return asyncio.run(_status(args))


async def _status(args: argparse.Namespace) -> int:
    import json

    from ..observe import gather_view, render_table

    loop = asyncio.get_running_loop()
    async with _transport(args) as transport:
        deadline = loop.time() + args.wait if args.wait is not None else None
        while True:
            view = await gather_view(
                transport,
                num_shards=args.shards,
                prefix=args.prefix,
                seed=args.seed,
                service_name=args.service_name,
                probe_timeout=args.timeout,
                shards_given=args.shards_explicit,
            )
            if view.complete or deadline is None or loop.time() >= deadline:
                break
            # No event announces a node's arrival to a bystander: poll until the deadline.
            await asyncio.sleep(0.25)
    if args.json:
        print(json.dumps(view.to_json(), indent=2))
    else:
        print(render_table(view))
    return EXIT_OK if view.complete else EXIT_FAILED


if __name__ == "__main__":
    raise SystemExit(main())
