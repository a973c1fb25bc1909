"""Token buckets per key: the rate limiter behind a grant's ``rate``."""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable

from keyd.config import GrantConfig

MAX_BUCKETS = 4096


class RateLimiter:
    """Token buckets per (caller identity, grant): ``rate`` requests per second, bursts of up to one
    second's worth (at least 1).

    The identity is the caller's uid (per grant), never its pid or unit: a
    user that forks a process per request shares one bucket. Memory is bounded: beyond
    ``max_buckets`` the buckets that have refilled completely are dropped (forgetting them changes
    nothing), then the oldest ones.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic, max_buckets: int = MAX_BUCKETS) -> None:
        self._clock = clock
        self._max = max_buckets
        # (identity, grant index) -> [tokens left, time of the last request]
        self._buckets: dict[tuple[Hashable, int], list[float]] = {}

    def __len__(self) -> int:
        return len(self._buckets)

    def allow(self, identity: Hashable, grant: GrantConfig) -> bool:
        """Take one token from this caller's bucket; False when it is empty."""
        rate = grant.rate
        if rate is None:
            return True
        now = self._clock()
        key = (identity, grant.index)
        burst = max(1.0, rate)
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self._max:
                self._evict(now)
            self._buckets[key] = [burst - 1.0, now]
            return True
        tokens = min(burst, bucket[0] + (now - bucket[1]) * rate)
        bucket[1] = now
        if tokens < 1.0:
            bucket[0] = tokens
            return False
        bucket[0] = tokens - 1.0
        return True

    def _evict(self, now: float) -> None:
        # A bucket idle for over a second (bursts are one second's worth) is full again: drop it.
        full = [key for key, (_, last) in self._buckets.items() if now - last >= 1.0]
        for key in full:
            del self._buckets[key]
        excess = len(self._buckets) - self._max + 1
        if excess > 0:
            for key in list(self._buckets)[: max(excess, self._max // 8)]:
                del self._buckets[key]
