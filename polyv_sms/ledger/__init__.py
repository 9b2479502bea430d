"""The ledger wing: quotas, message records and receipts in Redis.

``store`` holds :class:`Ledger` and its Lua scripts (``lua/``), ``receipts`` answers "did this
SMS go out?", ``reconcile`` finds messages whose retry never ran. Nothing here imports Celery:
the reconciler is handed the function that enqueues a message again.
"""

from __future__ import annotations

from polyv_sms.ledger.connection import LedgerClient
from polyv_sms.ledger.records import (
    FINAL_STATES,
    REQUEST_PREFIX,
    Keys,
    NumberState,
    RateLimit,
    Reservation,
    Settlement,
    Slot,
    parse_record,
    stored_requests,
)
from polyv_sms.ledger.store import Ledger, build_ledger, connect_redis, load_script

__all__ = [
    "FINAL_STATES",
    "REQUEST_PREFIX",
    "Keys",
    "Ledger",
    "LedgerClient",
    "NumberState",
    "RateLimit",
    "Reservation",
    "Settlement",
    "Slot",
    "build_ledger",
    "connect_redis",
    "load_script",
    "parse_record",
    "stored_requests",
]
