"""JetStream helpers for everything that keeps durable state (membership, ids,
entity state, persisted messages): bucket creation, compare-and-set failures,
retries while a stream settles, and watchers that stop cleanly.

nats-py is imported where used: importing this module does not import it.
"""

from __future__ import annotations

import asyncio
import base64
import re
from collections.abc import Awaitable, Callable
from typing import Any, Final, TypeVar

import structlog

from .._tasks import cancel_and_wait
from ..errors import ClstrError

__all__ = [
    "bucket_name",
    "bucket_names",
    "create_with_ttl",
    "is_cas_failure",
    "jetstream_of",
    "kv_key",
    "kv_key_text",
    "open_bucket",
    "put_with_ttl",
    "settling",
    "stop_watcher",
]

_log = structlog.get_logger("clstr.jetstream")

T = TypeVar("T")

# JetStream's "wrong last sequence" error codes: a compare-and-set lost.
_CAS_CODES: Final = (10071, 10164)

_SAFE_KEY: Final = re.compile(r"[-_=a-zA-Z0-9]{1,200}")


def jetstream_of(transport: object, what: str) -> Any:
    """The JetStream context of a NATS transport (nats-py ``JetStreamContext``).

    Raises :class:`~clstr.ClstrError` naming ``what`` needs it when the transport
    has no NATS connection (the memory transport)."""
    nc = getattr(transport, "nc", None)
    if nc is None:
        raise ClstrError(
            f"{what} needs a NatsTransport with JetStream (got {type(transport).__name__}); "
            "start the nats-server with -js (clstr.testing.NatsServer(jetstream=True))"
        )
    return nc.jetstream()


def kv_key(text: str) -> str:
    """A KV key for ``text``: itself when it is a valid key of at most 200 safe
    characters, else ``b64.`` and its base64url (without padding)."""
    if _SAFE_KEY.fullmatch(text):
        return text
    return "b64." + base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def kv_key_text(key: str) -> str:
    """The text a :func:`kv_key` was made from (its inverse)."""
    if not key.startswith("b64."):
        return key
    encoded = key[4:]
    return base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).decode()


def is_cas_failure(exc: BaseException) -> bool:
    """Whether ``exc`` says that a compare-and-set (expected revision) lost."""
    import nats.js.errors

    if isinstance(exc, nats.js.errors.KeyWrongLastSequenceError):
        return True
    return isinstance(exc, nats.js.errors.APIError) and exc.err_code in _CAS_CODES


def bucket_name(prefix: str, what: str) -> str:
    """The name of the cluster's bucket (or stream) ``what`` under ``prefix``:
    ``<prefix>_<what>``, with characters JetStream does not allow replaced by ``_``."""
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in prefix)
    return f"{safe}_{what}"


def bucket_names(prefix: str) -> tuple[str, str, str]:
    """The members, shards and handoff buckets of the cluster under ``prefix``."""
    return (
        bucket_name(prefix, "members"),
        bucket_name(prefix, "shards"),
        bucket_name(prefix, "handoff"),
    )


async def open_bucket(
    js: Any,
    name: str,
    *,
    replicas: int,
    marker_ttl: float | None = None,
    max_age: float | None = None,
    direct: bool = False,
) -> Any:
    """The KV bucket ``name``, created (history 1) when it does not exist yet.

    ``marker_ttl`` makes expired keys leave a marker for that long (so that
    watchers see a per-key TTL run out); ``max_age`` bounds every entry's life;
    ``direct`` serves reads through JetStream's direct get (cheaper for the
    server than a stream API request).
    """
    import nats.js.errors

    try:
        return await js.key_value(name)
    except nats.js.errors.BucketNotFoundError:
        pass
    kwargs: dict[str, Any] = {"bucket": name, "history": 1, "replicas": replicas}
    if marker_ttl is not None:
        kwargs["limit_marker_ttl"] = marker_ttl
    if max_age is not None:
        kwargs["ttl"] = max_age
    if direct:
        kwargs["direct"] = True
    try:
        return await js.create_key_value(**kwargs)
    except nats.js.errors.BadRequestError:
        # Created by another node at the same moment.
        return await js.key_value(name)


async def create_with_ttl(js: Any, kv: Any, bucket: str, key: str, value: bytes, ttl: float) -> int:
    """Create ``key`` of ``bucket`` (opened as ``kv``) with a per-key TTL unless it
    holds a value; return its revision.

    nats-py's ``KeyValue.create`` writes over a delete or purge marker, but
    not over the marker the server leaves when a key's TTL runs out (it reads
    that as a value): that case is handled here. Raises JetStream's error
    (:func:`is_cas_failure`) when the key holds a value.
    """
    try:
        return int(await kv.create(key, value, msg_ttl=ttl))
    except Exception as exc:
        if not is_cas_failure(exc):
            raise
        failure = exc
    import nats.js.errors

    try:
        last = await js.get_msg(f"KV_{bucket}", subject=f"$KV.{bucket}.{key}")
    except nats.js.errors.NotFoundError:
        raise failure from None  # gone again since: let the caller try anew
    headers = last.headers or {}
    if "Nats-Marker-Reason" not in headers and headers.get("KV-Operation") not in ("DEL", "PURGE"):
        raise failure
    return await put_with_ttl(js, bucket, key, value, revision=int(last.seq), ttl=ttl)


async def put_with_ttl(
    js: Any,
    bucket: str,
    key: str,
    value: bytes,
    *,
    revision: int,
    ttl: float,
    timeout: float | None = None,
) -> int:
    """Write ``key`` of ``bucket`` with a per-key TTL if its revision is still
    ``revision`` (nobody wrote or expired it since); return the new revision.

    nats-py's ``KeyValue.update`` takes no per-message TTL, so this publishes
    to the bucket's subject with the expected-revision header ``update`` uses.
    Raises JetStream's error when the revision moved (:func:`is_cas_failure`).
    """
    ack = await js.publish(
        f"$KV.{bucket}.{key}",
        value,
        headers={"Nats-Expected-Last-Subject-Sequence": str(revision)},
        msg_ttl=ttl,
        timeout=timeout,
    )
    return int(ack.seq)


async def settling(op: Callable[[], Awaitable[T]], within: float = 10.0) -> T:
    """Run ``op``, retrying while JetStream settles (a fresh replicated stream
    may have no leader yet and answer "no responders" for a moment)."""
    import nats.errors
    import nats.js.errors

    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    pause = 0.05
    while True:
        try:
            return await op()
        except (
            nats.errors.NoRespondersError,
            nats.errors.TimeoutError,
            nats.js.errors.NoStreamResponseError,
        ):
            if loop.time() + pause >= deadline:
                raise
            await asyncio.sleep(pause)
            pause = min(pause * 2, 1.0)


async def stop_watcher(watcher: Any) -> None:
    """Stop a KV watcher, also when its connection is already closed.

    nats-py cancels the ordered consumer's heartbeat and flow-control tasks
    only when unsubscribing succeeds; on a closed connection it raises first
    and the tasks live on, so they are cancelled here.
    """
    try:
        await watcher.stop()
    except Exception as exc:
        _log.debug("watcher stop failed", error=repr(exc))
    push = getattr(watcher, "_sub", None)  # the JetStream push subscription
    jsi = getattr(getattr(push, "_sub", None), "_jsi", None)  # on its core subscription
    leftovers = [
        task
        for task in (getattr(jsi, "_hbtask", None), getattr(jsi, "_fctask", None))
        if isinstance(task, asyncio.Task)
    ]
    await cancel_and_wait(leftovers, insist=True)
