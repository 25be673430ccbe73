"""The exceptions clstr raises, all under one root.

::

    ClstrError
    ├── ConfigurationError (ValueError)      a setting is out of range or inconsistent
    ├── ShardOutOfRangeError (ValueError)    a shard id outside 0..num_shards-1
    ├── ReservedHeaderError (ValueError)     a user header uses the x-clstr- prefix
    ├── MissingKeyError (ValueError)         a key-routed call got an empty key
    ├── LimitExceededError (ValueError)      a key, type, header or payload is too large
    ├── PayloadError (ValueError)            a typed payload cannot be encoded/decoded
    ├── LifecycleError (RuntimeError)        used before start / after close
    ├── InvalidIdError (ValueError)          not a snowflake id (negative, over 63 bits)
    ├── IdUnavailableError (RuntimeError)    no snowflake id can be issued right now
    │   └── MachineIdUnavailableError        no machine id is held (lease lost, all taken)
    ├── InvalidCounterKeyError (ValueError)  a counter namespace or key that is not allowed
    ├── CounterRangeError (ValueError)       a counter amount or total outside signed 64 bits
    ├── CounterFullError (RuntimeError)      a lax counter holds its maximum of unflushed keys
    ├── CounterFlushError (RuntimeError)     a lax counter closed with deltas it could not flush
    ├── CounterSessionLostError (RuntimeError) a counter forgot whether it applied a late retry
    ├── TransportError                       the messaging layer failed
    │   ├── TransportClosedError             the transport (or client) is closed
    │   └── ConnectionFailedError            no NATS server could be reached
    └── RequestError                         a request did not produce a reply value
        ├── NoShardOwnerError                nobody serves the shard (retryable)
        │   └── NotOwnerError                the node that got it no longer owns it
        ├── EnvelopeExpiredError             the TTL ran out before the handler ran
        ├── DeadlineExceededError (TimeoutError)
        │   ├── HandlerTimeoutError          the handler ran past the deadline
        │   └── RequestTimeoutError          no reply arrived before the deadline
        ├── OverloadedError                  the node's queue is full (retryable)
        ├── BadRequestError                  the node could not decode the message
        │   └── WrongShardError              the key belongs to another shard
        ├── IdempotencyKeyReusedError        the request id was used for another request
        ├── ReplyTooLargeError               the handler's reply is over max_payload
        ├── RequestInterruptedError          the caller interrupted the request
        ├── KeyRequiredError                 the handler needs a key, none was sent
        ├── NoHandlerError                   no handler for the message type
        └── RemoteHandlerError               the handler raised; carries its type/message

Every :class:`RequestError` subclass has a wire ``code`` (see docs/protocol.md);
:func:`error_for_code` maps a reply's code back to the class.
"""

from __future__ import annotations

from typing import ClassVar

__all__ = [
    "ClstrError",
    "ConfigurationError",
    "ShardOutOfRangeError",
    "ReservedHeaderError",
    "MissingKeyError",
    "LimitExceededError",
    "PayloadError",
    "LifecycleError",
    "InvalidIdError",
    "IdUnavailableError",
    "MachineIdUnavailableError",
    "InvalidCounterKeyError",
    "CounterRangeError",
    "CounterFullError",
    "CounterFlushError",
    "CounterSessionLostError",
    "TransportError",
    "TransportClosedError",
    "ConnectionFailedError",
    "RequestError",
    "NoShardOwnerError",
    "NotOwnerError",
    "EnvelopeExpiredError",
    "DeadlineExceededError",
    "HandlerTimeoutError",
    "RequestTimeoutError",
    "OverloadedError",
    "BadRequestError",
    "WrongShardError",
    "IdempotencyKeyReusedError",
    "ReplyTooLargeError",
    "RequestInterruptedError",
    "KeyRequiredError",
    "NoHandlerError",
    "RemoteHandlerError",
    "error_for_code",
]


class ClstrError(Exception):
    """Root of every exception clstr raises on purpose."""


class ConfigurationError(ClstrError, ValueError):
    """A setting is out of its documented range or inconsistent with another."""


class ShardOutOfRangeError(ClstrError, ValueError):
    """A shard id is outside ``0..num_shards-1``."""


class ReservedHeaderError(ClstrError, ValueError):
    """A user header name starts with the reserved ``x-clstr-`` prefix."""


class MissingKeyError(ClstrError, ValueError):
    """A key-routed call was given an empty key."""


class LimitExceededError(ClstrError, ValueError):
    """A key, message type, header set or payload is over its limit.

    Raised before anything is sent, so nothing is lost.
    """


class PayloadError(ClstrError, ValueError):
    """A typed payload could not be encoded to, or decoded from, msgpack."""


class LifecycleError(ClstrError, RuntimeError):
    """An object was used in a state that does not allow it (not started, closed)."""


class InvalidIdError(ClstrError, ValueError):
    """A value given as a snowflake id is not one (not an int, negative, or over 63 bits)."""


class IdUnavailableError(ClstrError, RuntimeError):
    """A snowflake generator cannot issue an id right now without risking a
    duplicate (see docs/ids.md); the message says why and when to try again."""


class MachineIdUnavailableError(IdUnavailableError):
    """No machine id is held: its lease lapsed or was lost (the lease takes a new
    one by itself), or all 1024 are leased by live nodes."""


class InvalidCounterKeyError(ClstrError, ValueError):
    """A counter namespace or key that is not allowed (docs/counters.md says which are)."""


class CounterRangeError(ClstrError, ValueError):
    """A counter amount or value outside the signed 64-bit range, or an operation
    that would take a counter's total outside it (nothing was applied)."""


class CounterFullError(ClstrError, RuntimeError):
    """A lax counter already holds unflushed deltas for its maximum number of keys
    (its flushes are failing): this increment of a new key was not counted.
    Increments of keys it already holds still are; it takes new keys again once
    a flush gets through."""


class CounterFlushError(ClstrError, RuntimeError):
    """A lax counter was closed with deltas it could not flush in time (the
    message says how many, for how many keys): they were not counted."""


class CounterSessionLostError(ClstrError, RuntimeError):
    """A counter operation was refused, not applied: it was first sent before
    its key dropped a writer session (idle for an hour, or past the key's
    maximum of writers), so the key cannot tell whether it applied it already
    (docs/counters.md, "Exactly once, per writer"). Read the counter to decide."""


class TransportError(ClstrError):
    """The messaging layer failed to move a message."""


class TransportClosedError(TransportError):
    """The transport or client is closed; create a new one to send again."""


class ConnectionFailedError(TransportError):
    """No NATS server could be reached (or it refused the credentials)."""


class RequestError(ClstrError):
    """A request ended without a reply value. ``code`` is its wire error code."""

    code: ClassVar[str] = "error"
    retryable: ClassVar[bool] = False


class NoShardOwnerError(RequestError):
    """No node serves the shard right now (NATS "no responders").

    Raised at once, never after a timeout. Retryable: ownership may be moving.
    """

    code = "no_owner"
    retryable = True


class NotOwnerError(NoShardOwnerError):
    """The node that received the message no longer owns the shard (it is stopping
    or handing the shard over). Retryable."""

    code = "not_owner"


class EnvelopeExpiredError(RequestError):
    """The envelope's TTL ran out before a handler could start on it."""

    code = "expired"


class DeadlineExceededError(RequestError, TimeoutError):
    """The request's deadline passed."""

    code = "deadline"


class HandlerTimeoutError(DeadlineExceededError):
    """The handler was still running when the deadline passed; it was cancelled."""

    code = "timeout"


class RequestTimeoutError(DeadlineExceededError):
    """No reply arrived before the client's deadline."""

    code = "request_timeout"


class OverloadedError(RequestError):
    """The node's queue of pending messages is full. Retryable, after a pause."""

    code = "overloaded"
    retryable = True


class BadRequestError(RequestError):
    """The node could not decode the message, or it broke a protocol limit."""

    code = "bad_request"


class WrongShardError(BadRequestError):
    """The message's key belongs to another shard than the one it was sent to.

    The sender computes shards with another ``num_shards`` or ``seed`` than the
    node (or routes by hand): handled here, one key's state would split across
    two nodes. Fix the sender's settings; retrying the same message cannot help.
    """

    code = "wrong_shard"


class IdempotencyKeyReusedError(RequestError):
    """The request id was already used for a different request (another type,
    key, shard or payload). A request id names exactly one request: give each
    new request a new id, and reuse an id only to retry the very same request."""

    code = "id_reused"


class ReplyTooLargeError(RequestError):
    """The handler ran, but its reply is larger than the messaging system carries
    (NATS ``max_payload``). Return less data per reply (page it, or stream it)."""

    code = "reply_too_large"


class RequestInterruptedError(RequestError):
    """The request was interrupted (``Client.interrupt``, or its caller's task was
    cancelled) before its handler finished; the handler saw ``CancelledError``."""

    code = "interrupted"


class KeyRequiredError(RequestError):
    """The handler needs a key and the message carried none; send it with a key."""

    code = "key_required"


class NoHandlerError(RequestError):
    """The node has no handler for the message type."""

    code = "no_handler"


class RemoteHandlerError(RequestError):
    """The remote handler raised. ``remote_type`` and ``remote_message`` say what."""

    code = "handler_error"

    def __init__(self, message: str, *, remote_type: str = "", remote_message: str = "") -> None:
        super().__init__(message)
        self.remote_type = remote_type
        self.remote_message = remote_message


_BY_CODE: dict[str, type[RequestError]] = {
    cls.code: cls
    for cls in (
        NoShardOwnerError,
        NotOwnerError,
        EnvelopeExpiredError,
        DeadlineExceededError,
        HandlerTimeoutError,
        RequestTimeoutError,
        OverloadedError,
        BadRequestError,
        WrongShardError,
        IdempotencyKeyReusedError,
        ReplyTooLargeError,
        RequestInterruptedError,
        KeyRequiredError,
        NoHandlerError,
        RemoteHandlerError,
    )
}


def error_for_code(code: str, remote_type: str, message: str) -> RequestError:
    """Build the exception a reply with error ``code`` stands for.

    Unknown codes (from a newer peer) become a plain :class:`RequestError`
    whose message names the code.
    """
    cls = _BY_CODE.get(code)
    if cls is RemoteHandlerError:
        return RemoteHandlerError(
            f"remote handler raised {remote_type}: {message}",
            remote_type=remote_type,
            remote_message=message,
        )
    if cls is None:
        return RequestError(f"remote error {code!r} ({remote_type}): {message}")
    return cls(message)
