"""Prometheus metrics of the worker (served when ``SMS_METRICS_PORT`` is set).

The metric objects live in the default registry; updating them is cheap (a lock and an add),
so the dispatcher updates them whether or not anything scrapes them.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from prometheus_client import Counter, Gauge, Histogram, start_http_server

__all__ = [
    "count_outcomes",
    "count_quota_refusal",
    "count_rate_wait",
    "count_retries",
    "observe_request",
    "serve",
]

log = logging.getLogger("polyv_sms.metrics")

OUTCOMES = Counter(
    "polyv_sms_outcomes_total",
    "Numbers that reached a final outcome, by outcome, account and lane (counted when their "
    "message completes).",
    ["outcome", "account", "lane"],
)
REQUEST_SECONDS = Histogram(
    "polyv_sms_polyv_request_seconds",
    "Latency of Polyv send requests, by result (answered, refused, transient, ambiguous, "
    "unexpected).",
    ["result"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
NUMBERS_PER_REQUEST = Histogram(
    "polyv_sms_numbers_per_request",
    "Numbers carried by one Polyv request.",
    buckets=(1, 2, 5, 10, 20, 50, 100, 150, 200),
)
RETRIES = Counter(
    "polyv_sms_retries_total",
    "Numbers scheduled for another attempt, by reason (status_11, transport).",
    ["reason"],
)
QUOTA_REFUSALS = Counter(
    "polyv_sms_quota_refusals_total",
    "Numbers refused by our own daily limits before reaching Polyv, by kind, account and lane.",
    ["kind", "account", "lane"],
)
TASK_RETRIES = Counter(
    "polyv_sms_task_retries_total",
    "Task retries scheduled through the broker, by reason (pending, busy, publish_failed).",
    ["reason"],
)
RATE_WAITS = Counter(
    "polyv_sms_rate_waits_total",
    "Runs put off by the shared rate guard, nothing sent and no attempt counted, by account "
    "and reason (rate: no slot soon enough; paused: Polyv blocked us).",
    ["account", "reason"],
)
RECONCILED = Counter(
    "polyv_sms_reconciled_total",
    "Messages the reconciler re-enqueued because their retry never ran.",
)
JOURNAL_REPLAYED = Counter(
    "polyv_sms_journal_replayed_total",
    "Polyv answers that reached the ledger from this host's journal (after an outage or a crash).",
)
JOURNAL_PENDING = Gauge(
    "polyv_sms_journal_entries",
    "Polyv answers in this worker's journal of an account that the ledger has not taken (looked "
    "at every second by the account's journal thread); above 0 for long: the ledger is "
    "unreachable from this host, or an entry cannot be settled.",
    ["account"],
)


def observe_request(seconds: float, result: str, numbers: int) -> None:
    """Record one Polyv request."""
    REQUEST_SECONDS.labels(result).observe(seconds)
    NUMBERS_PER_REQUEST.observe(numbers)


def count_outcomes(
    counts: Mapping[str, int], account: str = "default", lane: str = "standard"
) -> None:
    """Record the outcomes of a completed message."""
    for outcome, count in counts.items():
        if count:
            OUTCOMES.labels(outcome, account, lane).inc(count)


def count_retries(reason: str, numbers: int) -> None:
    """Record numbers that will be attempted again."""
    RETRIES.labels(reason).inc(numbers)


def count_quota_refusal(kind: str, account: str = "default", lane: str = "standard") -> None:
    """Record a number refused by our own quota."""
    QUOTA_REFUSALS.labels(kind, account, lane).inc()


def count_rate_wait(account: str, reason: str) -> None:
    """Record a run put off by the shared rate guard."""
    RATE_WAITS.labels(account, reason).inc()


def serve(port: int, addr: str = "0.0.0.0") -> None:  # noqa: S104 - scraped from outside
    """Serve ``/metrics`` on ``port`` in a background thread."""
    start_http_server(port, addr=addr)
    log.info("metrics on http://%s:%d/metrics", addr, port)
