"""StrictCounter: every operation a request to the key's owner, durable before its reply."""

from __future__ import annotations

import time
from types import TracebackType
from typing import Any, Final, Self

import msgpack

from ..client import DEFAULT_TIMEOUT, BatchItem, Client, RetryPolicy
from ..codec import encode_payload, message_type
from ..entities import DEFAULT_GROUP, KvStateStore, Sharding, StateStore
from ..errors import (
    ClstrError,
    ConfigurationError,
    CounterRangeError,
    CounterSessionLostError,
    RemoteHandlerError,
)
from ._entity import Add, Put, Read, Take
from ._keys import check_amount, check_key, check_namespace, counter_key, counter_type
from ._routing import Courier, Delivery
from ._session import Session, shared_session

__all__ = [
    "ADD",
    "DEFAULT_COUNTER_RETRY",
    "StrictCounter",
    "counter_client",
    "counter_error",
    "now_ms",
]

#: Retries of counter operations: an attempt without an answer within a second
#: (its node died with it, say) is sent again, under the same number.
DEFAULT_COUNTER_RETRY: Final = RetryPolicy(attempt_timeout=1.0, max_backoff=0.2)

ADD: Final = message_type(Add)
_READ: Final = message_type(Read)
_EMPTY: Final = encode_payload({})
_PUT: Final = message_type(Put)
_TAKE: Final = message_type(Take)
# Keys deleted per round of clear(): one batch per owner each.
_CLEAR_CHUNK: Final = 4096


def counter_client(source: Client | Sharding, timeout: float, retry: RetryPolicy | None) -> Client:
    """A client like ``source``'s (same transport, shards, seed, prefix) with the
    counters' deadline and retries. It shares the transport and never closes it."""
    base = source.clients[DEFAULT_GROUP] if isinstance(source, Sharding) else source
    return Client(
        base.transport,
        num_shards=base.num_shards,
        seed=base.seed,
        prefix=base.prefix,
        timeout=timeout,
        retry=retry,
        limits=base.limits,
        metrics=base.metrics,
    )


def _store_of(source: Client | Sharding, store: StateStore | None) -> StateStore | None:
    if store is not None:
        return store
    if isinstance(source, Sharding):
        return source.hosts[DEFAULT_GROUP].store
    if getattr(source.transport, "nc", None) is not None:
        return KvStateStore(source.transport)
    return None


def _int(payload: bytes) -> int:
    value = msgpack.unpackb(payload)
    if type(value) is not int:
        raise ConfigurationError(f"a counter answered {value!r}, not an int: is it a counter?")
    return value


class StrictCounter:
    """Counters whose every operation is a request to the key's owner: applied in
    the key's order, saved before it is acknowledged, applied once however often
    it is retried (docs/counters.md). For billing, inventory, quotas.

    ``source`` is a :class:`~clstr.Client` or a :class:`~clstr.Sharding` runner
    (its default group's client); the nodes serve counters
    (:func:`serve_counters`). ``namespace`` names the counter set. Each call
    has ``timeout`` seconds; attempts are retried by ``retry``. ``store`` is the
    nodes' state store, read by :meth:`clear` alone to list the keys (found by
    itself on NATS, and on a runner). ``session`` is the writer it writes as: by
    default the one every strict counter of the same transport and namespace
    shares, so that counter objects made and dropped by the thousand still
    write each key as one writer (docs/counters.md).
    """

    def __init__(
        self,
        source: Client | Sharding,
        namespace: str,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        retry: RetryPolicy = DEFAULT_COUNTER_RETRY,
        store: StateStore | None = None,
        session: Session | None = None,
    ) -> None:
        self.namespace = check_namespace(namespace)
        self.timeout = timeout
        self.client = counter_client(source, timeout, retry)
        self.session = session or shared_session(self.client.transport, self.namespace)
        # Batches are not retried by the client: the courier sends what is left
        # where it belongs now, and a shard with no owner does not hold the others.
        self.courier = Courier(counter_client(source, timeout, None))
        self._type = counter_type(namespace)
        self._store = _store_of(source, store)

    async def inc(self, key: str, n: int = 1) -> int:
        """Add ``n`` (may be negative) to ``key``; return the new total."""
        check_amount(n)
        return await self._write(key, {"n": n}, ADD)

    async def get(self, key: str) -> int:
        """The value of ``key`` (0 when it was never set), as of the last write."""
        payload = await self.client.request_key(self.routing_key(key), _READ, _EMPTY)
        return _int(payload)

    async def set(self, key: str, value: int) -> None:
        """Set ``key`` to ``value``."""
        check_amount(value, "value")
        await self._write(key, {"value": value}, _PUT)

    async def delete(self, key: str) -> int:
        """Delete ``key`` (it reads 0 again); return its value before."""
        return await self._write(key, {}, _TAKE)

    async def clear(self) -> None:
        """Delete every key of the namespace (each through its owner; keys written
        meanwhile may survive: it is not one atomic step)."""
        if self._store is None:
            raise ConfigurationError(
                "clear() lists the namespace's keys from the nodes' state store: pass "
                "store= (the MemoryStateStore the nodes share) on the memory transport"
            )
        keys = await self._store.ids(self._type)
        for start in range(0, len(keys), _CLEAR_CHUNK):
            chunk = keys[start : start + _CLEAR_CHUNK]
            session = self.session
            seq, sent = session.open(chunk), now_ms()
            deliveries = [
                self.delivery(
                    key,
                    _TAKE,
                    encode_payload(
                        {"w": session.writer, "q": seq, "lo": session.low(key), "t": sent}
                    ),
                )
                for key in chunk
            ]
            try:
                await self.courier.deliver(deliveries, timeout=self.timeout)
            finally:
                for key in chunk:
                    session.close(key, seq)
            failed = [d for d in deliveries if d.result is None]
            if failed:
                assert failed[0].error is not None
                raise failed[0].error

    def routing_key(self, key: str) -> str:
        """The routing key of counter ``key`` (``counter-<namespace>/<key>``)."""
        return counter_key(self.namespace, check_key(key))

    def delivery(self, key: str, msg_type: str, data: bytes) -> Delivery:
        """A message to counter ``key`` for the courier (key already checked)."""
        routing = counter_key(self.namespace, key)
        return Delivery(BatchItem(msg_type, routing, data), self.client.shard_for(routing))

    async def close(self) -> None:
        """Nothing to flush: every operation was acknowledged when it returned.
        The client shares the transport, which stays open."""
        await self.client.close()
        await self.courier.client.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _write(self, key: str, body: dict[str, Any], msg_type: str) -> int:
        routing = self.routing_key(key)
        session = self.session
        seq = session.open((key,))
        try:
            body.update(w=session.writer, q=seq, lo=session.low(key), t=now_ms())
            # Encoded once: the client's retries send these very bytes.
            payload = await self.client.request_key(routing, msg_type, encode_payload(body))
        except RemoteHandlerError as exc:
            mapped = counter_error(exc)
            if mapped is None:
                raise
            raise mapped from None
        finally:
            session.close(key, seq)
        return _int(payload)


_MAPPED: Final[dict[str, type[ClstrError]]] = {
    cls.__name__: cls for cls in (CounterRangeError, CounterSessionLostError)
}


def counter_error(exc: RemoteHandlerError) -> ClstrError | None:
    """The node's :class:`~clstr.CounterRangeError` or
    :class:`~clstr.CounterSessionLostError`, raised here as itself."""
    cls = _MAPPED.get(exc.remote_type)
    return None if cls is None else cls(exc.remote_message)


def now_ms() -> int:
    """The wall clock in ms since the epoch (an operation's ``t``)."""
    return int(time.time() * 1000)
