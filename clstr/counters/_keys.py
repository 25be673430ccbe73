"""Namespaces, keys and amounts of counters: what is allowed, checked once, in one place.

A counter set is a *namespace*; its counters live in the entity type
``counter-<namespace>`` (one KV bucket per namespace), each key an entity id,
so the routing key of counter ``home`` of ``pageviews`` is
``counter-pageviews/home``. Values are signed 64-bit integers, as in Redis.
"""

from __future__ import annotations

import re
from typing import Final

from ..errors import CounterRangeError, InvalidCounterKeyError
from ..protocol import entity_key

__all__ = [
    "MAX_KEY_BYTES",
    "TYPE_PREFIX",
    "VALUE_MAX",
    "VALUE_MIN",
    "check_amount",
    "check_key",
    "check_namespace",
    "counter_key",
    "counter_type",
]

#: Entity types of counters: ``counter-<namespace>``.
TYPE_PREFIX: Final = "counter-"
#: Longest key, in UTF-8 bytes (the routing key adds the type and stays within
#: the protocol's 1024).
MAX_KEY_BYTES: Final = 512
VALUE_MIN: Final = -(2**63)
VALUE_MAX: Final = 2**63 - 1

_NAMESPACE: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")
# Control characters (C0, DEL, C1): never in keys, which show up in logs and shells.
_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def check_namespace(namespace: object) -> str:
    """``namespace`` if it is 1 to 64 of ``A-Z a-z 0-9 _ -`` (it names a KV
    bucket); raises :class:`InvalidCounterKeyError` otherwise."""
    if not isinstance(namespace, str) or not _NAMESPACE.fullmatch(namespace):
        raise InvalidCounterKeyError(
            f"a counter namespace is 1 to 64 characters of A-Z, a-z, 0-9, _ and -; "
            f"got {namespace!r}"
        )
    return namespace


def check_key(key: object) -> str:
    """``key`` if it is a non-empty str of at most 512 UTF-8 bytes without
    control characters; raises :class:`InvalidCounterKeyError` otherwise."""
    if not isinstance(key, str) or not key:
        raise InvalidCounterKeyError(f"a counter key is a non-empty str, got {key!r}")
    if len(key) * 4 > MAX_KEY_BYTES and len(key.encode()) > MAX_KEY_BYTES:
        raise InvalidCounterKeyError(
            f"counter key {key[:32]!r}... is {len(key.encode())} bytes; at most {MAX_KEY_BYTES}"
        )
    if _CONTROL.search(key):
        raise InvalidCounterKeyError(f"counter key {key!r} holds a control character")
    return key


def check_amount(value: object, what: str = "amount") -> int:
    """``value`` if it is an int (not a bool) in the signed 64-bit range; raises
    :class:`CounterRangeError` otherwise."""
    if type(value) is not int or not VALUE_MIN <= value <= VALUE_MAX:
        raise CounterRangeError(
            f"a counter {what} is an int in the signed 64-bit range, got {value!r}"
        )
    return value


def counter_type(namespace: str) -> str:
    """The entity type of ``namespace``'s counters."""
    return TYPE_PREFIX + namespace


def counter_key(namespace: str, key: str) -> str:
    """The routing key of counter ``key`` of ``namespace``."""
    return entity_key(TYPE_PREFIX + namespace, key)
