"""The parts every ``clstr`` subcommand's parser is built from: the top-level
parser, the cluster options each command takes (with their environment
variables), the argument types, and :class:`Parser`, whose arguments may be
added on first use and which may take options between positionals.

A command module calls :func:`add_command` for each of its commands; see
:mod:`clstr.cli` for how a command group is registered.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final, TypeAlias

from ._common import DEFAULT_NATS_URL, DEFAULT_SERVICE_NAME, DEFAULT_SHARDS, CliError

__all__ = [
    "ENV_VARS",
    "Parser",
    "Runner",
    "Subcommands",
    "add_command",
    "top_parser",
    "env_flag",
    "non_negative_int",
    "port_number",
    "positive_int",
    "seconds",
    "urls",
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

#: What a command runs with its parsed arguments; returns the exit code.
Runner: TypeAlias = Callable[[argparse.Namespace], int]

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"", "0", "false", "no", "off"}


# -- argument types ----------------------------------------------------------------


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {value}")
    return value


def port_number(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 0..65535, got {value}")
    return value


def seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0 seconds, got {value}")
    return value


def urls(text: str) -> list[str]:
    found = [part.strip() for part in text.split(",") if part.strip()]
    if not found:
        raise argparse.ArgumentTypeError("expected at least one NATS URL")
    return found


def env_flag(environ: Mapping[str, str], name: str) -> bool:
    """The yes/no value of the variable ``name`` (unset: no)."""
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


# -- the parsers -------------------------------------------------------------------


class Parser(argparse.ArgumentParser):
    """A subcommand parser whose arguments may be added on first use (``bench``:
    its options come from ``clstr.bench``, imported only when asked for), and
    which may take options between its positionals (``intermixed``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy: Callable[[Parser], None] | None = None
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


#: Where commands are added: what ``add_subparsers`` returns.
Subcommands: TypeAlias = "argparse._SubParsersAction[Parser]"


def top_parser(env: Mapping[str, str]) -> tuple[argparse.ArgumentParser, Subcommands]:
    """The ``clstr`` parser with the cluster options, and where its commands go."""
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
        default_log_level="warning",
    )
    sub = parser.add_subparsers(
        dest="command", metavar="COMMAND", required=True, parser_class=Parser
    )
    return parser, sub


def add_command(
    sub: Subcommands,
    env: Mapping[str, str],
    name: str,
    help_text: str,
    *,
    run: Runner | None = None,
    log_level: str = "warning",
) -> Parser:
    """Add the command ``name``, with the cluster options, that calls ``run``.

    ``log_level`` is its level when neither ``--log-level`` nor
    ``CLSTR_LOG_LEVEL`` says (a long-running process tells more).
    """
    parser = sub.add_parser(name, help=help_text, description=help_text)
    _add_common(parser, env, top=False)
    parser.set_defaults(default_log_level=log_level)
    if run is not None:
        parser.set_defaults(handler=run)
    return parser


# -- the options of every command ----------------------------------------------------
# Added in this order, which is the order of the usage line.


def _add_common(parser: argparse.ArgumentParser, env: Mapping[str, str], *, top: bool) -> None:
    """The options every command takes. On subcommands they default to SUPPRESS,
    so ``clstr --shards 8 status`` and ``clstr status --shards 8`` both work."""

    def default(value: Any) -> Any:
        return value if top else argparse.SUPPRESS

    group = _add_cluster_options(parser, env, default)
    _add_credentials(parser, env, default)
    _add_logging(group, env, default)


def _add_cluster_options(
    parser: argparse.ArgumentParser, env: Mapping[str, str], default: Callable[[Any], Any]
) -> argparse._ArgumentGroup:
    """Where the cluster is and how it routes; returns the group, which the log
    options join."""
    group = parser.add_argument_group("cluster options (any command, env in brackets)")
    group.add_argument(
        "--nats-url",
        metavar="URL[,URL...]",
        type=urls,
        action=_Explicit,
        default=default(env.get("CLSTR_NATS_URL", DEFAULT_NATS_URL)),
        help=f"NATS server(s) to connect to [CLSTR_NATS_URL] (default {DEFAULT_NATS_URL})",
    )
    group.add_argument(
        "--shards",
        metavar="N",
        type=positive_int,
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
        type=seconds,
        default=default(3.0),
        help="give up connecting to NATS after this long (default 3)",
    )
    return group


def _add_credentials(
    parser: argparse.ArgumentParser, env: Mapping[str, str], default: Callable[[Any], Any]
) -> None:
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


def _add_logging(
    group: argparse._ArgumentGroup, env: Mapping[str, str], default: Callable[[Any], Any]
) -> None:
    group.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        default=default(env.get("CLSTR_LOG_LEVEL") or None),
        help="log level [CLSTR_LOG_LEVEL] (default info for node and dev, else warning)",
    )
    group.add_argument(
        "--log-json",
        action="store_true",
        default=default(env_flag(env, "CLSTR_LOG_JSON")),
        help="log one JSON object per line [CLSTR_LOG_JSON=1]",
    )
