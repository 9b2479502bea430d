"""Lanes: urgent work (login codes) never waits behind a bulk backlog, and bulk never uses
the units kept for it.

Each lane has its queue; a worker started as documented consumes all three, urgent first::

    urgent   -> sms.urgent
    standard -> sms          (the default queue, unchanged)
    bulk     -> sms.bulk

Bulk numbers stop at ``account_daily_limit - bulk_headroom`` units of the account's day
(whatever lane took the units); urgent and standard may use the whole limit. The ledger's
``reserve`` script applies it atomically with the other quotas (see :func:`lane_account_limit`).
"""

from __future__ import annotations

__all__ = [
    "DEFAULT_LANE",
    "LANES",
    "LANE_QUEUES",
    "WORKER_QUEUES",
    "lane_account_limit",
    "queue_for",
]

LANES = ("urgent", "standard", "bulk")
DEFAULT_LANE = "standard"
LANE_QUEUES = {"urgent": "sms.urgent", "standard": "sms", "bulk": "sms.bulk"}
#: What the documented worker consumes, in the order it takes work: urgent first.
WORKER_QUEUES = ("sms.urgent", "sms", "sms.bulk")


def queue_for(lane: str) -> str:
    """The queue of a lane (validated before: an unknown lane raises ``KeyError``)."""
    return LANE_QUEUES[lane]


def lane_account_limit(lane: str, account_daily_limit: int, bulk_headroom: int) -> int:
    """The account's daily count a number of this lane may take the account up to.

    Args:
        lane: ``urgent``, ``standard`` or ``bulk``.
        account_daily_limit: the account's daily limit.
        bulk_headroom: units kept from bulk messages.

    Returns:
        The whole limit for urgent and standard; the limit less the headroom (never below 0)
        for bulk.
    """
    if lane == "bulk":
        return max(0, account_daily_limit - bulk_headroom)
    return account_daily_limit
