"""Retry delays: exponential, capped, with jitter. A pure function, so the policy is testable."""

from __future__ import annotations

import random

__all__ = ["JITTER", "backoff_delay"]

#: Each delay is spread over ``[delay * (1 - JITTER), delay * (1 + JITTER)]`` (then capped),
#: so that numbers that failed together do not retry in lockstep.
JITTER = 0.2


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random | None = None) -> float:
    """The delay before the retry that follows attempt number ``attempt``.

    ``base * 2 ** (attempt - 1)``, capped at ``cap``, with ±20 % jitter (never above ``cap``).

    Args:
        attempt: attempts made so far (1 after the first).
        base: seconds before the first retry (``SMS_RETRY_BACKOFF``).
        cap: the longest delay (``SMS_RETRY_BACKOFF_MAX``).
        rng: source of jitter; ``random`` when omitted.

    Returns:
        Seconds to wait.
    """
    exponent = min(max(attempt, 1) - 1, 62)
    delay = min(cap, base * 2.0**exponent)
    spread = (rng or random).uniform(1 - JITTER, 1 + JITTER)
    return max(0.0, min(cap, delay * spread))
