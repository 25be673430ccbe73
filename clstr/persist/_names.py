"""What persisted messages are called in JetStream, and their settings.

The names are part of the protocol (docs/protocol.md, "Persisted messages"):
another implementation publishes to the same stream and subjects, and reads
and writes the same reply bucket.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Final

from ..errors import ClstrError, ConfigurationError
from ..transports.jetstream import bucket_name

__all__ = [
    "MSG_ID_HEADER",
    "PersistSettings",
    "consumer_name",
    "ensure_stream",
    "persist_subject",
    "reply_bucket",
    "stream_name",
    "stream_subjects",
]

#: JetStream's de-duplication header: a publish whose id the stream has seen
#: within its duplicate window is stored once.
MSG_ID_HEADER: Final = "Nats-Msg-Id"


def stream_name(prefix: str) -> str:
    """The JetStream stream of the cluster's persisted messages: ``<prefix>_persist``."""
    return bucket_name(prefix, "persist")


def persist_subject(prefix: str, shard: int) -> str:
    """The subject persisted messages of ``shard`` are published on."""
    return f"{prefix}.persist.{shard}"


def stream_subjects(prefix: str) -> str:
    """The subjects the stream takes: every shard's."""
    return f"{prefix}.persist.*"


def consumer_name(prefix: str, shard: int) -> str:
    """The durable consumer of ``shard``'s persisted messages: one per shard, used
    by whichever node serves the shard (it moves with the shard)."""
    return bucket_name(prefix, f"persist_{shard}")


def reply_bucket(prefix: str) -> str:
    """The KV bucket of stored replies: ``<prefix>_replies``."""
    return bucket_name(prefix, "replies")


@dataclass(frozen=True, slots=True, kw_only=True)
class PersistSettings:
    """How persisted messages are kept and consumed.

    Kept: ``reply_max_age`` seconds a stored reply is kept (the reply bucket's
    max age); ``message_max_age`` seconds an unconsumed message waits in the
    stream (``None``: until it is consumed); ``duplicate_window`` seconds in
    which a publish of an id already published is stored once; ``replicas``
    of the stream and the bucket. These are set when the stream and the
    bucket are created (by the first sender or node); change them on the
    server afterwards.

    Consumed: each shard's consumer holds up to ``batch`` messages not
    acknowledged yet, and fetches more as each one is acknowledged; one key's
    messages are handled one after the other, in stream order, other keys' at
    once (a long job holds back only its own key's later messages); it waits
    ``request_timeout`` seconds for the node's reply before asking again (under
    the same request id, so the handler does not run twice); a retryable
    refusal (``not_owner``, ``overloaded``, no owner) is retried after
    ``retry_pause`` seconds. The consumer sends an in-progress ack for each
    message it holds every ``ack_wait / 3`` seconds, so a job may run longer
    than ``ack_wait``; a message delivered and then neither acknowledged nor
    kept in progress within ``ack_wait`` seconds (its consumer stalled) is
    delivered again (a new owner does not wait for it: it starts from the
    shard's unacknowledged messages). ``fetch_wait`` bounds one long poll;
    ``grace`` is the consumer task's grace when its shard moves (see
    :meth:`clstr.Node.bind`).
    """

    reply_max_age: float = 24 * 3600.0
    message_max_age: float | None = None
    duplicate_window: float = 120.0
    replicas: int = 1
    batch: int = 64
    request_timeout: float = 30.0
    retry_pause: float = 0.5
    ack_wait: float = 60.0
    fetch_wait: float = 5.0
    grace: float = 5.0

    def __post_init__(self) -> None:
        positive = {
            "reply_max_age": self.reply_max_age,
            "duplicate_window": self.duplicate_window,
            "request_timeout": self.request_timeout,
            "retry_pause": self.retry_pause,
            "ack_wait": self.ack_wait,
            "fetch_wait": self.fetch_wait,
        }
        if self.message_max_age is not None:
            positive["message_max_age"] = self.message_max_age
        for name, value in positive.items():
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ConfigurationError(f"{name} must be a number of seconds > 0, got {value!r}")
        if self.message_max_age is not None and self.duplicate_window > self.message_max_age:
            raise ConfigurationError(
                "duplicate_window must not be longer than message_max_age "
                f"(got {self.duplicate_window} and {self.message_max_age}): JetStream refuses it"
            )
        if not isinstance(self.batch, int) or self.batch < 1:
            raise ConfigurationError(f"batch must be an int >= 1, got {self.batch!r}")
        if not isinstance(self.replicas, int) or not 1 <= self.replicas <= 5:
            raise ConfigurationError(f"replicas must be 1..5, got {self.replicas!r}")
        if not self.grace >= 0:
            raise ConfigurationError(f"grace must be >= 0 seconds, got {self.grace!r}")


async def ensure_stream(js: Any, prefix: str, settings: PersistSettings) -> None:
    """Create the stream of persisted messages when it does not exist yet.

    Work-queue retention: a message leaves the stream when it is acknowledged,
    so the stream holds exactly the messages not answered yet, and a consumer
    created anew starts from them.
    """
    import nats.js.api as api
    import nats.js.errors

    name = stream_name(prefix)
    try:
        await js.stream_info(name)
        return
    except nats.js.errors.NotFoundError:
        pass
    config = api.StreamConfig(
        name=name,
        subjects=[stream_subjects(prefix)],
        retention=api.RetentionPolicy.WORK_QUEUE,
        storage=api.StorageType.FILE,
        num_replicas=settings.replicas,
        duplicate_window=settings.duplicate_window,
        max_age=settings.message_max_age or 0,
    )
    try:
        await js.add_stream(config)
    except nats.js.errors.BadRequestError as exc:
        # Created by another node at the same moment, or with other settings
        # (then what is there stands: see PersistSettings).
        try:
            await js.stream_info(name)
        except nats.js.errors.NotFoundError:
            raise ClstrError(f"cannot create the stream {name}: {exc}") from exc
