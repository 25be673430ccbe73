"""Conformance kit: the cases of docs/protocol.md, run against a live node of any implementation.

:func:`run_cases` sends hand-built msgpack bodies (never clstr's encoder, so a
bug there cannot hide one in the node) to the shard subjects of a cluster and
checks each answer; every case names the section of docs/protocol.md it
checks. ``clstr conformance`` prints the table.

Cases that need an application run when the node serves the conformance app's
raw message types, which any implementation can add in a few lines (and a
clstr node gets with ``clstr node --app clstr.testing.conformance:app``):

====================================  ================================================
type                                  behaviour
====================================  ================================================
``clstr.conformance.echo``            reply ``d`` unchanged
``clstr.conformance.count``           add 1 to the key's counter; reply it as decimal ASCII
``clstr.conformance.fail``            raise (``handler_error``)
``clstr.conformance.sleep``           sleep ``d`` (decimal ASCII) milliseconds; reply empty
``clstr.conformance.big``             reply ``d`` (decimal ASCII) bytes of ``x``
====================================  ================================================
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final

import msgpack

from ..envelope import Envelope
from ..errors import NoShardOwnerError, RequestError, RequestTimeoutError
from ..handlers import Router
from ..hashing import shard_for_key
from ..protocol import NODE_INFO_TYPE, shard_subject
from ..transports.base import Transport

__all__ = ["APP_TYPES", "CaseResult", "app", "run_cases"]

_PREFIX: Final = "clstr.conformance."
#: The message types of the conformance app.
APP_TYPES: Final = tuple(_PREFIX + t for t in ("echo", "count", "fail", "sleep", "big"))


# -- the app -------------------------------------------------------------------------


def app(node_id: str = "") -> Router:
    """The conformance app: the raw handlers of the table in the module docstring."""
    counters: dict[str | None, int] = {}
    router = Router()

    async def echo(env: Envelope) -> bytes:
        return env.data

    async def count(env: Envelope) -> bytes:
        counters[env.key] = counters.get(env.key, 0) + 1
        return str(counters[env.key]).encode()

    async def fail(env: Envelope) -> bytes:
        raise ValueError(f"conformance failure on {node_id or 'this node'}")

    async def sleep(env: Envelope) -> bytes:
        await asyncio.sleep(int(env.data or b"0") / 1000)
        return b""

    async def big(env: Envelope) -> bytes:
        return b"x" * int(env.data or b"0")

    for name, handler in zip(APP_TYPES, (echo, count, fail, sleep, big), strict=True):
        router.mount(name, handler)
    return router


# -- the runner ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CaseResult:
    """One case: its name, the protocol.md section it checks, and how it went."""

    name: str
    section: str
    outcome: str  # "pass", "fail" or "skip"
    detail: str = ""


class _Skip(Exception):
    """The case does not apply to this node (it lacks the conformance app)."""


@dataclass
class _Cluster:
    transport: Transport
    prefix: str
    num_shards: int
    seed: str
    timeout: float
    message_types: list[str] | None = None
    max_payload: int = 1 << 20

    def subject(self, shard: int) -> str:
        return shard_subject(self.prefix, shard)

    def shard(self, key: str) -> int:
        return shard_for_key(key, self.num_shards, self.seed)

    async def send(self, shard: int, body: dict[str, Any] | bytes) -> dict[str, Any]:
        """Send ``body`` (a map to pack, or raw bytes) and return the decoded reply map."""
        data = body if isinstance(body, bytes) else msgpack.packb(body, use_bin_type=True)
        raw = await self.transport.request(self.subject(shard), data, self.timeout)
        reply = msgpack.unpackb(raw, raw=False)
        if not isinstance(reply, dict) or reply.get("v") != 1 or "ok" not in reply:
            raise AssertionError(f"reply is not a v1 reply map: {reply!r}")
        return reply

    def needs_app(self) -> None:
        if self.message_types is None or not set(APP_TYPES) <= set(self.message_types):
            raise _Skip("the node does not serve the conformance app's types")


def _request(t: str, **fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"v": 1, "t": t, "ts": int(time.time() * 1000)}
    body.update(fields)
    return body


def _code(reply: dict[str, Any]) -> str:
    if reply.get("ok") is True:
        return "ok"
    error = reply.get("e")
    if not isinstance(error, dict):
        raise AssertionError(f"error reply without an 'e' map: {reply!r}")
    missing = {"code", "type", "msg"} - set(error)
    if missing:
        raise AssertionError(f"error map lacks {sorted(missing)}: {error!r}")
    return str(error["code"])


def _expect(reply: dict[str, Any], code: str) -> None:
    got = _code(reply)
    if got != code:
        raise AssertionError(f"expected {code}, got {got}: {reply.get('e') or reply.get('d')!r}")


Case = Callable[[_Cluster], Awaitable[None]]
_CASES: list[tuple[str, str, Case]] = []


def _case(name: str, section: str) -> Callable[[Case], Case]:
    def register(fn: Case) -> Case:
        _CASES.append((name, section, fn))
        return fn

    return register


@_case("node info answers on every shard", "Built-in messages")
async def _node_info(c: _Cluster) -> None:
    owners: dict[int, str] = {}
    for shard in range(c.num_shards):
        reply = await c.send(shard, _request(NODE_INFO_TYPE))
        _expect(reply, "ok")
        info = msgpack.unpackb(reply["d"], raw=False)
        if not isinstance(info.get("node_id"), str) or not isinstance(info.get("shards"), list):
            raise AssertionError(f"node info lacks node_id/shards: {info!r}")
        if shard not in info["shards"]:
            raise AssertionError(f"{info['node_id']} answered shard {shard} but does not list it")
        types = info.get("message_types")
        if types is not None and not all(isinstance(t, str) for t in types):
            raise AssertionError(f"message_types must be a list of str or nil: {types!r}")
        if c.message_types is None and types is not None:
            c.message_types = list(types)
        owners[shard] = info["node_id"]


@_case("bytes that are not msgpack", "Request body")
async def _not_msgpack(c: _Cluster) -> None:
    _expect(await c.send(0, b"\xc1 not msgpack"), "bad_request")


@_case("a body that is not a map", "Request body")
async def _not_a_map(c: _Cluster) -> None:
    _expect(await c.send(0, msgpack.packb([1, "x"])), "bad_request")


@_case("an unknown wire version", "Request body")
async def _version(c: _Cluster) -> None:
    _expect(await c.send(0, _request("x", v=2)), "bad_request")


@_case("no message type", "Request body")
async def _no_type(c: _Cluster) -> None:
    _expect(await c.send(0, {"v": 1, "d": b""}), "bad_request")


@_case("a payload that is str, not bin", "Request body")
async def _d_str(c: _Cluster) -> None:
    _expect(await c.send(0, _request("x", d="text")), "bad_request")


@_case("a negative ttl", "Request body")
async def _negative_ttl(c: _Cluster) -> None:
    _expect(await c.send(0, _request("x", ttl=-1)), "bad_request")


@_case("unknown keys are ignored", "Request body")
async def _unknown_keys(c: _Cluster) -> None:
    reply = await c.send(0, _request(NODE_INFO_TYPE, future_field={"a": 1}))
    _expect(reply, "ok")


@_case("a reserved header, in any case", "Headers")
async def _reserved(c: _Cluster) -> None:
    _expect(await c.send(0, _request("x", h={"X-Clstr-Trace": "1"})), "bad_request")


@_case("clstr's trace headers are accepted", "Trace context")
async def _trace_headers(c: _Cluster) -> None:
    headers = {
        "x-clstr-traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "x-clstr-tracestate": "congo=t61rcWkgMzE",
        "x-clstr-attempt": "2",
    }
    _expect(await c.send(0, _request(NODE_INFO_TYPE, h=headers)), "ok")


@_case("a malformed traceparent is ignored, not refused", "Trace context")
async def _bad_traceparent(c: _Cluster) -> None:
    c.needs_app()
    headers = {"x-clstr-traceparent": "not-a-traceparent", "x-clstr-attempt": "two"}
    reply = await c.send(0, _request(APP_TYPES[0], d=b"ok", h=headers))
    _expect(reply, "ok")


@_case("a trace header not in lower case", "Trace context")
async def _trace_case(c: _Cluster) -> None:
    bad = {"X-Clstr-Traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
    _expect(await c.send(0, _request("x", h=bad)), "bad_request")


@_case("trace headers count in the headers' limits", "Trace context")
async def _trace_limits(c: _Cluster) -> None:
    headers = {f"h{i}": "v" for i in range(63)}
    headers["x-clstr-traceparent"] = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    headers["x-clstr-tracestate"] = "congo=t61rcWkgMzE"
    _expect(await c.send(0, _request("x", h=headers)), "bad_request")


@_case("65 headers", "Headers")
async def _many_headers(c: _Cluster) -> None:
    headers = {f"h{i}": "v" for i in range(65)}
    _expect(await c.send(0, _request("x", h=headers)), "bad_request")


@_case("16385 bytes of headers", "Headers")
async def _big_headers(c: _Cluster) -> None:
    _expect(await c.send(0, _request("x", h={"n": "é" * 8191 + "ab"})), "bad_request")


@_case("a type of 257 bytes", "Limits")
async def _long_type(c: _Cluster) -> None:
    _expect(await c.send(0, _request("t" * 257)), "bad_request")


@_case("a key of 1025 bytes", "Limits")
async def _long_key(c: _Cluster) -> None:
    key = "k" * 1025
    _expect(await c.send(c.shard(key), _request("x", k=key)), "bad_request")


@_case("a request id of 129 bytes", "Limits")
async def _long_id(c: _Cluster) -> None:
    _expect(await c.send(0, _request("x", id="i" * 129)), "bad_request")


@_case("a key sent to another shard", "Keys and shards")
async def _wrong_shard(c: _Cluster) -> None:
    if c.num_shards < 2:
        raise _Skip("one shard: every key belongs to it")
    shard = (c.shard("conformance-key") + 1) % c.num_shards
    _expect(await c.send(shard, _request("x", k="conformance-key")), "wrong_shard")


@_case("stale beyond ttl + clock skew", "Deadlines and clocks")
async def _stale(c: _Cluster) -> None:
    _expect(await c.send(0, _request("x", ttl=1000, ts=1000)), "expired")


@_case("no ttl (absent or 0) is never stale", "Deadlines and clocks")
async def _never_stale(c: _Cluster) -> None:
    c.needs_app()
    for ttl in ({}, {"ttl": 0}):
        _expect(await c.send(0, _request(APP_TYPES[0], ts=1000, **ttl)), "ok")


@_case("an unknown message type", "Error codes")
async def _no_handler(c: _Cluster) -> None:
    if c.message_types is None:
        raise _Skip("the node does not list its message types")
    unknown = f"clstr.conformance.unknown.{os.urandom(4).hex()}"
    _expect(await c.send(0, _request(unknown)), "no_handler")


@_case("echo round trip with key and headers", "Request body")
async def _echo(c: _Cluster) -> None:
    c.needs_app()
    key = "echo-key"
    reply = await c.send(c.shard(key), _request(APP_TYPES[0], k=key, d=b"\x00\xff", h={"a": "b"}))
    _expect(reply, "ok")
    if reply["d"] != b"\x00\xff":
        raise AssertionError(f"echo returned {reply['d']!r}")


@_case("a handler that raises", "Error codes")
async def _fail(c: _Cluster) -> None:
    c.needs_app()
    _expect(await c.send(0, _request(APP_TYPES[2])), "handler_error")


@_case("a handler past its deadline", "Deadlines and clocks")
async def _timeout(c: _Cluster) -> None:
    c.needs_app()
    _expect(await c.send(0, _request(APP_TYPES[3], d=b"3000", ttl=200)), "timeout")


@_case("a reply over max_payload", "Error codes")
async def _too_large(c: _Cluster) -> None:
    c.needs_app()
    size = str(c.max_payload + 1).encode()
    _expect(await c.send(0, _request(APP_TYPES[4], d=size)), "reply_too_large")


@_case("expired while queued, answered at the deadline", "Deadlines and clocks")
async def _queued(c: _Cluster) -> None:
    c.needs_app()
    key = f"queue-{os.urandom(4).hex()}"
    shard = c.shard(key)
    hold = asyncio.ensure_future(c.send(shard, _request(APP_TYPES[3], k=key, d=b"2000", ttl=5000)))
    try:
        await asyncio.sleep(0.2)  # let the holder start (the node gives no event to wait on)
        started = time.monotonic()
        _expect(await c.send(shard, _request(APP_TYPES[0], k=key, ttl=300)), "expired")
        took = time.monotonic() - started
        if took > 1.5:
            raise AssertionError(f"answered after {took:.2f} s, not at its 0.3 s deadline")
    finally:
        await hold


@_case("a retried id gets the first reply", "Idempotency (request ids)")
async def _retry(c: _Cluster) -> None:
    c.needs_app()
    key, rid = f"idem-{os.urandom(4).hex()}", os.urandom(8).hex()
    shard = c.shard(key)
    first = await c.send(shard, _request(APP_TYPES[1], k=key, id=rid))
    again = await c.send(shard, _request(APP_TYPES[1], k=key, id=rid))
    _expect(first, "ok")
    if again != first:
        raise AssertionError(f"retry answered {again!r}, first was {first!r}")


@_case("an id reused for another request", "Idempotency (request ids)")
async def _reused(c: _Cluster) -> None:
    c.needs_app()
    key, rid = f"idem-{os.urandom(4).hex()}", os.urandom(8).hex()
    shard = c.shard(key)
    _expect(await c.send(shard, _request(APP_TYPES[1], k=key, id=rid)), "ok")
    _expect(await c.send(shard, _request(APP_TYPES[1], k=key, id=rid, d=b"x")), "id_reused")


@_case("a refusal is not kept for its id", "Idempotency (request ids)")
async def _refusal(c: _Cluster) -> None:
    c.needs_app()
    rid = os.urandom(8).hex()
    _expect(await c.send(0, _request("clstr.conformance.nope", id=rid)), "no_handler")
    _expect(await c.send(0, _request(APP_TYPES[0], id=rid)), "ok")


@_case("a notification runs and nothing comes back", "Requests and notifications")
async def _notify(c: _Cluster) -> None:
    c.needs_app()
    key = f"notify-{os.urandom(4).hex()}"
    shard = c.shard(key)
    body = msgpack.packb(_request(APP_TYPES[1], k=key), use_bin_type=True)
    await c.transport.publish(c.subject(shard), body)
    reply = await c.send(shard, _request(APP_TYPES[1], k=key))  # same key: after it
    _expect(reply, "ok")
    if reply["d"] != b"2":
        raise AssertionError(f"the notification did not run first: count is {reply['d']!r}")


@_case("an interrupt cancels a running handler", "Interrupts")
async def _interrupt(c: _Cluster) -> None:
    c.needs_app()
    key, rid = f"int-{os.urandom(4).hex()}", os.urandom(8).hex()
    shard = c.shard(key)
    sleeping = asyncio.ensure_future(
        c.send(shard, _request(APP_TYPES[3], k=key, d=b"5000", id=rid, ttl=8000))
    )
    try:
        for _ in range(50):  # until the sleep has reached the node
            reply = await c.send(shard, _request("clstr.interrupt", k=key, d=_pack({"id": rid})))
            _expect(reply, "ok")
            if msgpack.unpackb(reply["d"]) == 1:
                break
            await asyncio.sleep(0.02)
        else:
            raise AssertionError("the interrupt never found the running request")
        _expect(await sleeping, "interrupted")
    finally:
        await asyncio.gather(sleeping, return_exceptions=True)


def _pack(value: Any) -> bytes:
    packed: bytes = msgpack.packb(value, use_bin_type=True)
    return packed


async def run_cases(
    transport: Transport,
    *,
    prefix: str = "clstr",
    num_shards: int,
    seed: str = "",
    timeout: float = 5.0,
) -> list[CaseResult]:
    """Run every case against the cluster that ``transport`` reaches; return the
    results in protocol.md order. A case that cannot reach a node fails."""
    cluster = _Cluster(transport, prefix, num_shards, seed, timeout)
    cluster.max_payload = transport.max_payload
    results: list[CaseResult] = []
    for name, section, case in _CASES:
        try:
            await case(cluster)
        except _Skip as skip:
            results.append(CaseResult(name, section, "skip", str(skip)))
        except (AssertionError, RequestError, ValueError, TypeError) as exc:
            detail = str(exc)
            if isinstance(exc, NoShardOwnerError):
                detail = "no node serves the shard (no responders)"
            elif isinstance(exc, RequestTimeoutError | TimeoutError):
                detail = "no reply before the timeout"
            results.append(CaseResult(name, section, "fail", detail or type(exc).__name__))
        else:
            results.append(CaseResult(name, section, "pass"))
    return results
