"""Per-tenant request rate limits: one token bucket per tenant, in this process.

Each tenant may make `rate` requests a second on average, `burst` at once.
A call over the limit is refused RESOURCE_EXHAUSTED (`TENANT_LIMIT_EXCEEDED`,
with `RetryInfo` saying when a token is due) before its handler runs, so a
tenant's burst costs the others nothing but the refusal itself. Limits are
per replica: N replicas admit N times the rate (docs/security.md).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from turnlog import errors


@dataclass(frozen=True, slots=True, kw_only=True)
class RateLimit:
    """Requests a second per tenant (`rate`, 0: unlimited) and the burst allowed."""

    rate: float = 500.0
    burst: int = 1000


class TenantRateLimiter:
    """Token buckets by tenant (one event loop; no locking needed)."""

    def __init__(self, limit: RateLimit, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self._clock = clock
        #: tenant -> (tokens left, when they were counted)
        self._buckets: dict[str, tuple[float, float]] = {}

    def admit(self, tenant: str) -> None:
        """Takes one token of `tenant`'s bucket.

        Raises:
            TenantLimitExceededError: the bucket is empty (metadata `retryAfterMs`).
        """
        rate = self.limit.rate
        if rate <= 0:
            return
        now = self._clock()
        tokens, at = self._buckets.get(tenant, (float(self.limit.burst), now))
        tokens = min(float(self.limit.burst), tokens + (now - at) * rate)
        if tokens < 1.0:
            wait_ms = math.ceil((1.0 - tokens) / rate * 1000)
            self._buckets[tenant] = (tokens, now)
            raise errors.TenantLimitExceededError(
                "the tenant's request rate is over its limit",
                metadata={"limit": "requests_per_second", "retryAfterMs": str(wait_ms)},
            )
        self._buckets[tenant] = (tokens - 1.0, now)


__all__ = ["RateLimit", "TenantRateLimiter"]
