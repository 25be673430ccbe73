"""``clstr ledger ...``: the credit ledger (docs/ledger.md) from the shell.

::

    clstr ledger serve --id ID [--store-url URL]     one ledger node (production)
    clstr ledger up [--nodes 3]                      nats-server + N ledger nodes
    clstr ledger event BUCKET ACCOUNT AMOUNT         a credit (> 0) or debit (< 0)
    clstr ledger balance BUCKET                      every account (all shards)
    clstr ledger account BUCKET ACCOUNT              one account, collapsed
    clstr ledger events BUCKET ACCOUNT               its events
    clstr ledger reserve BUCKET ACCOUNT AMOUNT --ttl S
    clstr ledger settle BUCKET ACCOUNT RESERVATION [--amount N]
    clstr ledger release BUCKET ACCOUNT RESERVATION
    clstr ledger edges                               the endpoints, probed

The client commands go through an edge client: ``--endpoint URLS`` (repeat it
for each cluster) or, without it, ``--nats-url`` as the one endpoint.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

from ._common import EXIT_FAILED, EXIT_OK, CliError
from ._parser import Parser, Subcommands, add_command, port_number, positive_int, seconds, urls

if TYPE_CHECKING:
    from ..ledger import LedgerClient

__all__ = ["add_parser", "run"]


# -- the parsers -----------------------------------------------------------------------------


def add_parser(sub: Subcommands, env: Mapping[str, str]) -> None:
    """Add ``ledger`` and its actions."""
    ledger = add_command(sub, env, "ledger", "the credit ledger: serve it, or use it")
    actions = ledger.add_subparsers(
        dest="ledger_command", metavar="ACTION", required=True, parser_class=Parser
    )
    _add_serve(actions, env)
    _add_up(actions, env)
    event = _client_command(actions, env, "event", "append a credit (AMOUNT > 0) or a debit (< 0)")
    _account_args(event)
    event.add_argument("amount", metavar="AMOUNT", type=int, help="in the smallest unit")
    _write_options(event)
    event.add_argument(
        "--min-balance",
        type=int,
        default=None,
        metavar="N",
        help="refuse a debit that leaves less than N available (0: no overdraft)",
    )
    event.add_argument("--reservation", default=None, help="capture this reservation")
    balance = _client_command(actions, env, "balance", "every account of BUCKET (all shards)")
    balance.add_argument("bucket", metavar="BUCKET")
    account = _client_command(actions, env, "account", "one account, collapsed")
    _account_args(account)
    events = _client_command(actions, env, "events", "an account's events, oldest first")
    _account_args(events)
    events.add_argument("--after", type=int, default=0, help="journal position to start after")
    events.add_argument("--limit", type=positive_int, default=100, help="at most (<= 1000)")
    reserve = _client_command(actions, env, "reserve", "hold AMOUNT until settled or released")
    _account_args(reserve)
    reserve.add_argument("amount", metavar="AMOUNT", type=positive_int)
    reserve.add_argument("--ttl", type=seconds, required=True, help="seconds until it expires")
    _write_options(reserve)
    settle = _client_command(actions, env, "settle", "capture a reservation (once)")
    _account_args(settle)
    settle.add_argument("reservation", metavar="RESERVATION")
    settle.add_argument("--amount", type=positive_int, default=None, help="default: all of it")
    _write_options(settle)
    release = _client_command(actions, env, "release", "give a reservation back")
    _account_args(release)
    release.add_argument("reservation", metavar="RESERVATION")
    _write_options(release)
    _client_command(actions, env, "edges", "probe the endpoints; show latency and health")


def _add_serve(actions: Subcommands, env: Mapping[str, str]) -> None:
    serve = add_command(
        actions, env, "serve", "run one ledger node (the way production runs it)", run=run
    )
    serve.set_defaults(default_log_level="info")
    serve.add_argument(
        "--id",
        dest="node_id",
        default=env.get("CLSTR_NODE_ID"),
        required=not env.get("CLSTR_NODE_ID"),
        help="this node's id, unique across every cluster of the ledger [CLSTR_NODE_ID]",
    )
    serve.add_argument(
        "--store-url",
        type=urls,
        default=None,
        metavar="URL[,URL...]",
        help="the JetStream that keeps the ledger, when not the cluster's own (regions "
        "sharing one store)",
    )
    serve.add_argument(
        "--static-nodes",
        type=lambda text: [p.strip() for p in text.split(",") if p.strip()],
        default=[],
        metavar="A,B,C",
        help="a fixed member list (default: dynamic membership on JetStream KV)",
    )
    serve.add_argument(
        "--heartbeat-ttl",
        type=seconds,
        default=3.0,
        help="seconds before a silent node's shards move (default 3; >= 1)",
    )
    serve.add_argument("--store-prefix", default="clstr", help="names of the ledger's streams")
    serve.add_argument("--replicas", type=positive_int, default=1, help="JetStream replicas")
    serve.add_argument(
        "--sweep-interval",
        type=seconds,
        default=1.0,
        help="seconds between sweeps for expired reservations (default 1)",
    )
    serve.add_argument(
        "--snapshot-every",
        type=positive_int,
        default=1,
        metavar="N",
        help="write an account's snapshot after every N events (default 1: write-through)",
    )
    serve.add_argument(
        "--metrics-port",
        type=port_number,
        default=None,
        help="serve Prometheus metrics over HTTP on this port (0: any free port)",
    )
    serve.add_argument("--metrics-host", default="0.0.0.0", help="(default 0.0.0.0)")
    serve.add_argument("--no-discovery", dest="discovery", action="store_false")
    serve.add_argument("--stop-timeout", type=seconds, default=10.0)
    serve.add_argument("--watch-stdin", action="store_true", help="stop when stdin closes")


def _add_up(actions: Subcommands, env: Mapping[str, str]) -> None:
    up = add_command(
        actions,
        env,
        "up",
        "start nats-server and N ledger nodes; Ctrl-C stops all",
        run=run,
        log_level="info",
    )
    up.add_argument("--nodes", type=positive_int, default=3, help="ledger nodes (default 3)")
    up.add_argument(
        "--port",
        type=port_number,
        default=None,
        help="client port of the embedded nats-server (default 4222 when free; 0: any)",
    )
    up.add_argument("--heartbeat-ttl", type=seconds, default=3.0)


def _client_command(actions: Subcommands, env: Mapping[str, str], name: str, text: str) -> Parser:
    cmd = add_command(actions, env, name, text, run=run)
    cmd.intermixed = True  # `event credits alice -5 --min-balance 0`, options anywhere
    cmd.add_argument(
        "--endpoint",
        type=urls,
        action="append",
        default=[],
        metavar="URL[,URL...]",
        help="a cluster of the ledger (repeat for each); default: --nats-url",
    )
    cmd.add_argument("--timeout", type=seconds, default=5.0, help="seconds (default 5)")
    cmd.add_argument("--json", action="store_true", help="print JSON")
    return cmd


def _account_args(cmd: Parser) -> None:
    cmd.add_argument("bucket", metavar="BUCKET")
    cmd.add_argument("account", metavar="ACCOUNT")


def _write_options(cmd: Parser) -> None:
    cmd.add_argument("--nonce", default=None, help="idempotency nonce (default: a new one)")
    cmd.add_argument("--note", default="", help="a note kept with the event")


# -- the commands ------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    """Run the ledger action ``args`` name."""
    action: str = args.ledger_command
    if action == "serve":
        from ._ledger_serve import serve

        return serve(args)
    if action == "up":
        from ._ledger_serve import ledger_up

        return ledger_up(args)
    return asyncio.run(_client(args))


async def _client(args: argparse.Namespace) -> int:
    from ..errors import ClstrError
    from ..ledger import LedgerClient, LedgerError
    from ._common import quiet_logs

    endpoints = [",".join(e) for e in args.endpoint] or [",".join(args.nats_url)]
    with quiet_logs():
        try:
            client = await LedgerClient.connect(
                endpoints,
                num_shards=args.shards,
                seed=args.seed,
                prefix=args.prefix,
                timeout=args.timeout,
            )
        except ClstrError as exc:
            raise CliError(f"cannot reach the ledger: {exc}", code=EXIT_FAILED) from None
    async with client:
        try:
            shown = await _ACTIONS[args.ledger_command](client, args)
        except LedgerError as exc:
            raise CliError(f"refused: {type(exc).__name__}: {exc}", code=EXIT_FAILED) from None
        except ClstrError as exc:
            raise CliError(
                f"{type(exc).__name__}: {exc} (the outcome is unknown: retry with the same --nonce)"
                if args.ledger_command in {"event", "reserve", "settle", "release"}
                else f"{type(exc).__name__}: {exc}",
                code=EXIT_FAILED,
            ) from None
    if args.json:
        print(json.dumps(_plain(shown), indent=2))
    else:
        print(_human(args.ledger_command, shown))
    return EXIT_OK


async def _event(client: LedgerClient, args: argparse.Namespace) -> Any:
    from ..ledger import EventOptions

    options = EventOptions(
        nonce=args.nonce,
        note=args.note,
        min_balance=args.min_balance,
        reservation=args.reservation,
    )
    return await client.create_event(args.bucket, args.account, args.amount, options)


async def _balance(client: LedgerClient, args: argparse.Namespace) -> Any:
    return await client.get_balances(args.bucket, timeout=args.timeout)


async def _account(client: LedgerClient, args: argparse.Namespace) -> Any:
    return await client.get_account(args.bucket, args.account)


async def _events(client: LedgerClient, args: argparse.Namespace) -> Any:
    return await client.events(args.bucket, args.account, after=args.after, limit=args.limit)


async def _reserve(client: LedgerClient, args: argparse.Namespace) -> Any:
    return await client.reserve(
        args.bucket, args.account, args.amount, ttl=args.ttl, nonce=args.nonce, note=args.note
    )


async def _settle(client: LedgerClient, args: argparse.Namespace) -> Any:
    return await client.settle(
        args.bucket, args.account, args.reservation, amount=args.amount, nonce=args.nonce
    )


async def _release(client: LedgerClient, args: argparse.Namespace) -> Any:
    return await client.release(args.bucket, args.account, args.reservation, nonce=args.nonce)


async def _edges(client: LedgerClient, args: argparse.Namespace) -> Any:
    return client.health()


_ACTIONS: dict[str, Callable[[LedgerClient, argparse.Namespace], Awaitable[Any]]] = {
    "event": _event,
    "balance": _balance,
    "account": _account,
    "events": _events,
    "reserve": _reserve,
    "settle": _settle,
    "release": _release,
    "edges": _edges,
}


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _human(action: str, value: Any) -> str:
    """One line per event or account; a table for balances and edges."""
    if action in {"event", "settle", "release"}:
        return _event_line(value)
    if action == "reserve":
        return (
            f"reservation {value.id}: {value.amount} held until {value.expires_at_ms} ms "
            f"({_event_line(value.event)})"
        )
    if action == "events":
        return "\n".join(_event_line(e) for e in value) or "(no events)"
    if action == "account":
        lines = [
            f"{value.bucket}/{value.account}: balance {value.balance}, held {value.held}, "
            f"available {value.available}, {value.events} events "
            f"(credits {value.credits}, debits {value.debits})"
        ]
        lines += [
            f"  reservation {r.id}: {r.amount} until {r.expires_at_ms} ms"
            for r in value.reservations
        ]
        return "\n".join(lines)
    if action == "balance":
        rows = [
            f"  {r.account:<24} {r.balance:>12} {r.held:>10} {r.available:>12}"
            for r in value.accounts
        ]
        head = f"  {'account':<24} {'balance':>12} {'held':>10} {'available':>12}"
        tail = f"{len(value.accounts)} accounts, total {value.total}"
        if value.partial:
            tail += f"; PARTIAL: shards {value.missing_shards} did not answer"
        return "\n".join([head, *rows, tail])
    rows = [
        f"  {'*' if e.active else ' '} {e.name:<22} {'healthy' if e.healthy else 'down':<8} "
        f"{'-' if e.latency_ms is None else f'{e.latency_ms:.2f} ms':>10}  {e.error}"
        for e in value.edges
    ]
    return "\n".join([f"active: {value.active}", *rows])


def _event_line(e: Any) -> str:
    what = {"entry": f"{e.amount:+d}", "hold": f"hold {e.reserved}", "release": "release"}
    extra = f" reservation {e.reservation}" if e.reservation else ""
    note = f" ({e.note})" if e.note else ""
    return (
        f"#{e.sequence} {what.get(e.kind, e.kind)}{extra}{note}: balance {e.balance}, "
        f"available {e.balance - e.held} [event {e.bucket}:{e.origin}:{e.epoch}:{e.origin_seq}, "
        f"nonce {e.nonce}]"
    )
