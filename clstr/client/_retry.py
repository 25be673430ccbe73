"""Retry policy: when and how often a request is sent again."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Final

from ..errors import ConfigurationError, RequestError

__all__ = ["RetryPolicy", "DEFAULT_RETRY", "MIN_ATTEMPT"]

#: A retry needs at least this long (seconds) to have a chance.
MIN_ATTEMPT: Final = 0.005


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    """When and how often a request is retried (see :class:`Client`).

    Waits between attempts grow from ``initial_backoff`` by ``multiplier`` up
    to ``max_backoff``, each drawn uniformly from zero to that bound ("full
    jitter", so that clients retrying together spread out). Retries stop at
    the request's deadline, or after ``max_attempts`` attempts when given.

    ``attempt_timeout`` bounds each attempt: an attempt without a reply by
    then (its node died with the request, say) is sent again, under the same
    request id. Without it an attempt may use the whole deadline.
    """

    initial_backoff: float = 0.01
    max_backoff: float = 0.5
    multiplier: float = 2.0
    max_attempts: int | None = None
    attempt_timeout: float | None = None

    def __post_init__(self) -> None:
        if not 0 < self.initial_backoff <= self.max_backoff or self.multiplier < 1:
            raise ConfigurationError(
                "RetryPolicy needs 0 < initial_backoff <= max_backoff and multiplier >= 1"
            )
        if self.max_attempts is not None and self.max_attempts < 1:
            raise ConfigurationError(f"max_attempts must be >= 1, got {self.max_attempts}")
        if self.attempt_timeout is not None and not self.attempt_timeout > 0:
            raise ConfigurationError(f"attempt_timeout must be > 0, got {self.attempt_timeout}")

    def backoff(self, attempt: int) -> float:
        """The pause before retry number ``attempt + 1``."""
        bound = min(self.max_backoff, self.initial_backoff * self.multiplier**attempt)
        return random.uniform(0, bound)

    def pause_after(
        self, exc: RequestError, attempts: int, left: float, *, lost: bool = False
    ) -> float | None:
        """The pause before sending again after attempt number ``attempts`` met
        ``exc`` with ``left`` seconds to the deadline (``lost``: the attempt's own
        wait ran out, not the request's), or ``None``: give up, ``exc`` stands."""
        if not (exc.retryable or lost):
            return None
        if self.max_attempts is not None and attempts >= self.max_attempts:
            return None
        pause = self.backoff(attempts - 1)
        return None if pause + MIN_ATTEMPT >= left else pause


#: A sensible retry policy for clusters whose shards move (dynamic membership).
DEFAULT_RETRY: Final = RetryPolicy()
