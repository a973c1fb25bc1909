"""The one retry policy: the refresher (key and token jobs), the node failover and the REST proxy."""

from __future__ import annotations

from collections.abc import Callable


def backoff(failures: int, low: float, high: float, rand: Callable[[], float]) -> float:
    """Delay before retry number ``failures`` (1-based): exponential, capped, with jitter.

    The delay is drawn from [cap/2, cap] where cap = min(high, low * 2**(failures-1)), so retries
    spread out but never come back in a tight loop.
    """
    cap = min(high, low * (2 ** max(0, min(failures - 1, 30))))
    return float(cap / 2 + rand() * cap / 2)


def jittered(interval: float, rand: Callable[[], float]) -> float:
    """``interval`` plus or minus 10 %."""
    return interval * (0.9 + 0.2 * rand())
