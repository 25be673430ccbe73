"""``clstr counter``: distributed counters from the shell, and nodes that serve them.

``clstr counter inc|get|set|del KEY [N]`` and ``clstr counter clear`` act on
the counters of ``--namespace`` through their owners (StrictCounter, or
LaxCounter with ``--lax``: the increment is flushed before the command ends);
``clstr counter serve`` runs a node that serves every namespace's counters
(KV membership, state in JetStream KV) until SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING

from ._common import EXIT_FAILED, EXIT_OK, CliError
from ._connection import connect
from ._parser import Subcommands, add_command, seconds

if TYPE_CHECKING:
    from ..counters import Counter
    from ..transports.nats import NatsTransport

__all__ = ["add_parser", "run"]

_OPERATIONS = ("inc", "get", "set", "del", "clear", "serve")


def add_parser(sub: Subcommands, env: Mapping[str, str]) -> None:
    """Add ``counter``."""
    cmd = add_command(
        sub,
        env,
        "counter",
        "distributed counters: inc|get|set|del KEY [N], clear, or serve them from a node",
        run=run,
    )
    cmd.intermixed = True  # `counter inc KEY --namespace pv 5` works too
    cmd.add_argument("operation", choices=_OPERATIONS, help="what to do")
    cmd.add_argument("key", metavar="KEY", nargs="?", help="the counter key (inc, get, set, del)")
    cmd.add_argument(
        "value",
        metavar="N",
        nargs="?",
        help="inc: the amount (default 1); set: the value",
    )
    cmd.add_argument(
        "--namespace",
        "-n",
        default="default",
        help="the counter set (default 'default')",
    )
    cmd.add_argument(
        "--lax",
        action="store_true",
        help="use a LaxCounter (inc adds locally; it is flushed before the command ends)",
    )
    cmd.add_argument(
        "--timeout", type=seconds, default=5.0, help="deadline of each operation (default 5)"
    )
    cmd.add_argument(
        "--json", action="store_true", help="print one JSON object: namespace, key, value, ms"
    )
    cmd.add_argument("--id", dest="node_id", default=None, help="serve: this node's id")


def run(args: argparse.Namespace) -> int:
    """Run the counter operation ``args`` names."""
    from ..counters import check_key, check_namespace
    from ..errors import ClstrError

    op = args.operation
    try:
        check_namespace(args.namespace)
        if op in ("inc", "get", "set", "del"):
            if args.key is None:
                raise CliError(f"counter {op} needs a KEY")
            check_key(args.key)
        elif args.key is not None:
            raise CliError(f"counter {op} takes no KEY")
    except ClstrError as exc:
        raise CliError(str(exc)) from None
    if op == "serve":
        return asyncio.run(_serve(args))
    amount = _amount(args)
    return asyncio.run(_operate(args, amount))


def _amount(args: argparse.Namespace) -> int | None:
    op, text = args.operation, args.value
    if op == "set" and text is None:
        raise CliError("counter set needs a value: clstr counter set KEY N")
    if op not in ("inc", "set"):
        if text is not None:
            raise CliError(f"counter {op} takes no N")
        return None
    if text is None:
        return 1
    try:
        return int(text)
    except ValueError:
        raise CliError(f"N must be a whole number, got {text!r}") from None


async def _operate(args: argparse.Namespace, amount: int | None) -> int:
    from ..client import Client
    from ..counters import LaxCounter, StrictCounter
    from ..errors import ClstrError

    async with connect(args) as transport:
        client = Client(transport, num_shards=args.shards, seed=args.seed, prefix=args.prefix)
        counter: Counter = (
            LaxCounter(client, args.namespace, timeout=args.timeout)
            if args.lax
            else StrictCounter(client, args.namespace, timeout=args.timeout)
        )
        started = time.perf_counter()
        try:
            async with counter:
                value = await _apply(counter, args, amount)
        except ClstrError as exc:
            raise _counter_error(exc, args) from None
        elapsed_ms = (time.perf_counter() - started) * 1000
    if args.json:
        print(
            json.dumps(
                {
                    "namespace": args.namespace,
                    "key": args.key,
                    "operation": args.operation,
                    "value": value,
                    "ms": round(elapsed_ms, 3),
                }
            )
        )
    elif value is not None:
        print(value)
    return EXIT_OK


async def _apply(counter: Counter, args: argparse.Namespace, amount: int | None) -> int | None:
    """Do the operation; the value to print (inc: the new total, get: the value,
    set: the value set, del: the value before, clear: none)."""
    op, key = args.operation, args.key
    if op == "inc":
        assert amount is not None
        total = await counter.inc(key, amount)
        if args.lax:
            return await counter.get(key)  # flushes it first
        return total
    if op == "get":
        return await counter.get(key)
    if op == "set":
        assert amount is not None
        await counter.set(key, amount)
        return amount
    if op == "del":
        return await counter.delete(key)
    await counter.clear()
    return None


def _counter_error(exc: Exception, args: argparse.Namespace) -> CliError:
    """The one-line error of a failed counter operation."""
    from .. import errors

    if isinstance(exc, errors.NoShardOwnerError):
        return CliError(
            f"no node serves the counters of {args.namespace!r} (prefix {args.prefix!r}, "
            f"{args.shards} shards): start nodes with 'clstr counter serve', or make "
            "--shards/--prefix/--seed match the nodes'"
        )
    if isinstance(exc, errors.NoHandlerError):
        return CliError(
            "the nodes do not serve counters: run them with clstr.counters.serve_counters "
            f"or 'clstr counter serve' ({exc})"
        )
    if isinstance(exc, errors.CounterRangeError | errors.InvalidCounterKeyError):
        return CliError(str(exc))
    if isinstance(exc, errors.DeadlineExceededError | errors.CounterFlushError):
        return CliError(f"{exc}; raise --timeout", code=EXIT_FAILED)
    return CliError(f"{type(exc).__name__}: {exc}", code=EXIT_FAILED)


async def _serve(args: argparse.Namespace) -> int:
    """A node serving counters until SIGTERM or SIGINT."""
    async with connect(args) as transport:
        await _serve_on(transport, args)
    return EXIT_OK


async def _serve_on(transport: NatsTransport, args: argparse.Namespace) -> None:
    from ..counters import serve_counters
    from ..entities import KvStateStore, Sharding
    from ..membership import KvMembership

    runner = Sharding(
        transport,
        num_shards=args.shards,
        node_id=args.node_id,
        seed=args.seed,
        prefix=args.prefix,
        membership=lambda group: KvMembership(),
        store=KvStateStore(transport),
    )
    serve_counters(runner)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        async with runner:
            print(f"serving counters as {runner.node_id}; Ctrl-C stops", file=sys.stderr)
            await stop.wait()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
