"""When and how long the client waits before trying a call again.

Only calls that cannot do anything twice are retried: reads, and writes
that carry a `request_id` (the service answers a repeated request id with
the first call's result). The client fills a missing request id with a
uuid4 before the first attempt, so every attempt of one call sends the same
one.

A failure is retried when it says it may be: UNAVAILABLE (the service
restarting, a cut connection) or RESOURCE_EXHAUSTED with a retry delay (a
tenant's rate limit, whose delay is honoured), unless the service's
`retryable` metadata says otherwise. Waits grow exponentially with full
jitter (so clients cut off together do not come back together), bounded
by `max_attempts` and by `deadline_s` for all attempts of one call.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from turnlog_client.errors import TurnlogError


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    """How often and how long to retry one call.

    Attributes:
        max_attempts: attempts in all (1: never retry).
        initial_backoff_s: the first wait's upper bound.
        max_backoff_s: no wait's upper bound grows past this.
        multiplier: each wait's bound is this times the previous one's.
        deadline_s: no retry starts later than this after the first attempt.
    """

    max_attempts: int = 6
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 5.0
    multiplier: float = 2.0
    deadline_s: float = 60.0

    def backoff_s(self, retry: int, error: TurnlogError | None = None) -> float:
        """The wait before retry number `retry` (1 for the first retry).

        Full jitter below the exponential bound; at least the delay the
        service asked for (`error.retry_after_s`), when it asked for one.
        """
        bound = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** (retry - 1))
        wait = random.uniform(0, bound)
        if error is not None and error.retry_after_s is not None:
            wait = max(wait, error.retry_after_s)
        return wait

    def should_retry(self, error: TurnlogError, attempt: int, elapsed_s: float) -> bool:
        """Whether to try again after `attempt` attempts failed, the last with `error`."""
        return (
            error.retryable
            and attempt < self.max_attempts
            and elapsed_s + self.backoff_floor(error) < self.deadline_s
        )

    @staticmethod
    def backoff_floor(error: TurnlogError) -> float:
        return error.retry_after_s or 0.0


#: Never retry.
NO_RETRY = RetryPolicy(max_attempts=1)

__all__ = ["NO_RETRY", "RetryPolicy"]
