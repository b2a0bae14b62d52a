"""The one retry schedule: exponential backoff, capped, with optional jitter. GPU stage resubmissions, webhook
deliveries, the events bridge's polling and the local stack's start-up all wait by it."""

from __future__ import annotations

import random


def backoff_s(attempt: int, base_s: float, cap_s: float = 600.0) -> float:
    """The wait after the ``attempt``-th failure (1-based) before the next try: ``base_s * 2**(attempt-1)``, at most
    ``cap_s`` (seconds); nothing before the first failure."""
    if attempt < 1:
        return 0.0
    return min(cap_s, base_s * 2 ** min(attempt - 1, 60))


def jittered(delay_s: float, draw: float | None = None) -> float:
    """``delay_s`` scaled into [½, 1) at random, so many waiters do not retry in step."""
    return delay_s * (0.5 + (random.random() if draw is None else draw) / 2)
