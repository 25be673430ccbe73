"""``clstr request`` and ``clstr notify``: a message to the owner of a key, from
the shell. Both first find the key's owner, refuse a type it does not handle,
and refuse (or warn) when it counts shards differently (:func:`_addressed`)."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..hashing import shard_for_key
from ._common import EXIT_FAILED, EXIT_OK, CliError, check_key
from ._connection import connect
from ._parser import Parser, Subcommands, add_command, seconds

if TYPE_CHECKING:
    from ..client import Client
    from ..protocol import NodeInfo
    from ..transports.nats import NatsTransport

__all__ = ["add_parser", "run"]


# -- the parsers -------------------------------------------------------------------


def add_parser(sub: Subcommands, env: Mapping[str, str]) -> None:
    """Add ``request`` and ``notify``."""
    request = _add_message_command(
        sub, env, "request", "send a request to the owner of KEY; print the reply and who answered"
    )
    request.add_argument(
        "--timeout",
        type=seconds,
        default=5.0,
        help="deadline in seconds (default 5)",
    )
    request.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object: key, shard, node, ms, reply",
    )
    _add_message_command(sub, env, "notify", "send a notification to the owner of KEY (no reply)")


def _add_message_command(
    sub: Subcommands, env: Mapping[str, str], name: str, help_text: str
) -> Parser:
    """A command that sends one message: KEY TYPE [JSON] and headers."""
    cmd = add_command(sub, env, name, help_text, run=run)
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
    return cmd


def _header(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"a header is NAME=VALUE, got {text!r}")
    return name, value


def run(args: argparse.Namespace) -> int:
    """Send the request or the notification ``args`` describe."""
    send = _request if args.command == "request" else _notify
    return asyncio.run(send(args))


# -- the commands -----------------------------------------------------------------


async def _request(args: argparse.Namespace) -> int:
    from ..errors import ClstrError
    from ._common import msgpack_to_json

    check_key(args.key)
    data = _read_payload(args.payload)
    options = _options(args)
    async with connect(args) as transport:
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
    _print_reply(args, msgpack_to_json(reply), shard, node, elapsed_ms)
    return EXIT_OK


def _print_reply(
    args: argparse.Namespace, rendered: str, shard: int, node: str | None, elapsed_ms: float
) -> None:
    """The reply on stdout and who answered on stderr, or all of it as one JSON object."""
    import json

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


async def _notify(args: argparse.Namespace) -> int:
    from ..errors import ClstrError

    check_key(args.key)
    data = _read_payload(args.payload)
    options = _options(args)
    async with connect(args) as transport:
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


# -- what both share -----------------------------------------------------------------


def _read_payload(text: str | None) -> bytes:
    from ._common import json_to_msgpack

    if text == "-":
        text = sys.stdin.read()
    return json_to_msgpack(text)


def _options(args: argparse.Namespace) -> list[Any]:
    from ..envelope import with_header
    from ..errors import ReservedHeaderError

    try:
        return [with_header(name, value) for name, value in args.header]
    except ReservedHeaderError as exc:
        raise CliError(str(exc)) from None


async def _addressed(
    transport: NatsTransport, args: argparse.Namespace
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
        await _check_shard_count(transport, args, info, shard)
    return client, shard, info


async def _owner(client: Client, shard: int, args: argparse.Namespace) -> NodeInfo | None:
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


async def _check_shard_count(
    transport: NatsTransport, args: argparse.Namespace, info: NodeInfo, shard: int
) -> None:
    """Refuse to send when the owner uses another shard count than ``--shards`` and
    the key is in another shard there: the node would refuse it (``wrong_shard``),
    and a notification would vanish. Warn when the counts differ and this key is
    by chance in the same shard under both (other keys are not), or when the
    owner's count cannot be told exactly.

    The count comes from the owner's service discovery metadata (one request
    to that node alone; nothing to wait for when it runs no discovery), else
    the owner's shard list shows a count larger than ``--shards`` (a smaller
    one cannot be seen from there).
    """
    from ..observe import announced_shards

    count = await announced_shards(transport, args.service_name, info.node_id)
    fix = f"pass --shards {count} (or set CLSTR_SHARDS={count})"
    if count is not None and count != args.shards:
        right = shard_for_key(args.key, count, args.seed)
        uses = f"{info.node_id} uses {count} shards but --shards is {args.shards}"
        if right != shard:
            raise CliError(
                f"{uses}: key {args.key!r} is in shard {right} there, not {shard}, and a "
                f"node refuses a key sent to another shard (wrong_shard); {fix}; "
                "nothing was sent"
            )
        problem = (
            f"{uses}: key {args.key!r} is in shard {shard} under both, but other keys "
            f"are not, and a node refuses a key sent to another shard; {fix}"
        )
    elif count is None and info.shards and max(info.shards) >= args.shards:
        problem = (
            f"{info.node_id} serves shard {max(info.shards)}, so it uses more shards than "
            f"--shards {args.shards}: key {args.key!r} is likely in another shard there, "
            "which a node refuses (wrong_shard); pass the nodes' count ('clstr status' "
            "shows it)"
        )
    else:
        return
    print(f"clstr: warning: {problem}", file=sys.stderr)


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
    if isinstance(exc, errors.WrongShardError):
        return CliError(
            f"the node refused the message: {exc}; pass --shards N / --seed S matching "
            "the cluster ('clstr status' shows the shard count)"
        )
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
