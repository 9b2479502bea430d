"""Scenario 4 - Polyv faults: every message ends final, attempts stay bounded, and the retry
delays measured on Polyv's side grow as configured.

The simulator answers 30 % of numbers with status 11, 10 % of requests with HTTP 500, 5 % with
an HTML page, drops 5 % of connections, and answers 10 % of requests only after 0.8 s while the
worker's HTTP timeout is 0.5 s (Polyv processed those: the answer is late, not lost - the
ambiguous case).
"""

from __future__ import annotations

import statistics
import time
import urllib.request
from collections import Counter, defaultdict
from itertools import pairwise

import pytest
from helpers import free_port
from prometheus_client.parser import text_string_to_metric_families

from polyv_sms import send_sms
from polyv_sms.backoff import JITTER

from .tools import (
    TAG,
    elapsed,
    ledger_quota,
    pending_messages,
    phone,
    seen_by_message,
)

pytestmark = pytest.mark.slow

MAX_ATTEMPTS = 4
BACKOFF_S = 0.25
BACKOFF_MAX_S = 2.0
HTTP_TIMEOUT_S = 0.5
FAULTS = {
    "status11_rate": 0.3,
    "http500_rate": 0.1,
    "garbage_rate": 0.05,
    "drop_rate": 0.05,
    "slow_rate": 0.1,
    "slow_latency_s": 0.8,
    "seed": 5,
}
#: One number per message: how many draws a request takes from the simulator's seeded
#: generator then depends only on the draws themselves, not on which message it carries, so
#: the faults of the k-th request do not depend on the order requests arrive in and every kind
#: of fault shows up in every run.
MESSAGES = 80
WORKERS, THREADS = 2, 16
#: Slack on top of a retry's countdown: publishing, waiting in the queue behind first attempts,
#: the worker's ETA timer, the next reserve (OVERHEAD_S for every retry, QUEUE_S for the lower
#: quartile); and how much earlier than its countdown a retry may arrive (clock rounding).
OVERHEAD_S = 0.5
QUEUE_S = 0.1
EARLY_S = 0.01


def request_counts(port: int) -> Counter[str]:
    """The worker's ``polyv_sms_polyv_request_seconds_count`` by result."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        text = answer.read().decode()
    counts: Counter[str] = Counter()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "polyv_sms_polyv_request_seconds_count":
                counts[sample.labels["result"]] += int(sample.value)
    return counts


@pytest.mark.parametrize("retry_ambiguous", [True, False], ids=["at-least-once", "at-most-once"])
def test_every_message_ends_final_under_polyv_faults(
    start_worker, sim, account, redis_server, retry_ambiguous: bool
) -> None:
    started = time.monotonic()
    ports = [free_port() for _ in range(WORKERS)]
    for port in ports:
        start_worker(
            concurrency=THREADS,
            POLYV_HTTP_TIMEOUT=HTTP_TIMEOUT_S,
            SMS_MAX_ATTEMPTS=MAX_ATTEMPTS,
            SMS_RETRY_BACKOFF=BACKOFF_S,
            SMS_RETRY_BACKOFF_MAX=BACKOFF_MAX_S,
            SMS_RETRY_AMBIGUOUS=str(retry_ambiguous).lower(),
            SMS_METRICS_PORT=port,
            # The retry gaps below are the backoff's; the shared rate guard (100 requests/s by
            # default) would add its own queueing to them with 80 messages released at once.
            # tests/test_accounts_lanes.py and tests/test_ratelimit.py test the guard.
            SMS_POLYV_RATE=10_000,
        )
    sim.set_faults(**FAULTS)
    numbers = [phone(100 + i) for i in range(MESSAGES)]
    pending = {}
    for i, number in enumerate(numbers):
        tag = f"f{i}"
        pending[tag] = send_sms.delay([number], [TAG], [tag])
    results = {tag: p.get(timeout=120) for tag, p in pending.items()}

    # Every number of every message has its final outcome; nothing is left reserved.
    outcomes = Counter(e["outcome"] for r in results.values() for e in r["results"])
    assert set(outcomes) <= {"accepted", "failed"}
    assert outcomes["accepted"] > 0
    assert outcomes["failed"] > 0
    ledger = redis_server.client(2)
    assert pending_messages(ledger, account[0]) == []

    seen = seen_by_message(sim)
    worker_counts = sum((request_counts(port) for port in ports), Counter())
    # What the worker saw of its requests agrees with what the simulator did (a slow answer,
    # a 500 or an HTML page included, reaches the worker after its timeout: ambiguous).
    stats = sim.stats()
    faults = stats["by_outcome"]
    assert set(worker_counts) <= {"answered", "transient", "unexpected", "ambiguous"}
    assert sum(worker_counts.values()) == stats["requests"]
    assert 0 < worker_counts["transient"] <= faults["http500"]
    assert 0 < worker_counts["unexpected"] <= faults["garbage"]
    late_answers = worker_counts["ambiguous"] - faults["drop"]
    assert late_answers > 0  # the scenario did exercise late answers

    duplicates = 0
    lost_answers: set[str] = set()  # requests Polyv processed whose answer the worker missed
    kept_units: Counter[str] = Counter()
    gaps: dict[int, list[float]] = defaultdict(list)
    for tag, result in results.items():
        for entry in result["results"]:
            number = entry["phone_number"]
            got = seen[(tag, number)]
            # No number is ever carried by more than SMS_MAX_ATTEMPTS requests.
            assert len(got.requests) <= MAX_ATTEMPTS, (tag, number, got)
            assert entry["attempts"] == len(got.requests)
            if entry["outcome"] == "accepted":
                assert got.accepted[-1] == entry["serial_no"]
                kept_units[number] += 1
            elif "may have sent" in (entry["error"] or ""):
                kept_units[number] += 1  # ambiguous: the unit is kept, it may have gone out
            # A number accepted twice: the first answer never reached the worker.
            duplicates += max(0, len(got.accepted) - 1)
            lost_answers.update(got.accepting_requests[:-1])
            times = [r["received_at"] for r in got.requests]
            for attempt, (before, after) in enumerate(pairwise(times), 1):
                gaps[attempt].append(after - before)

    if retry_ambiguous:
        assert duplicates == len(lost_answers) <= late_answers
    else:
        # At most once: a late answer is never followed by another request for the number.
        assert duplicates == 0
        assert all(len(s.accepted) <= 1 for s in seen.values())
    # Units are kept for what may have been sent and refunded for the rest.
    quota = ledger_quota(ledger, account[0])
    assert quota["_total"] == sum(kept_units.values())
    assert {n: quota[n] for n in numbers if quota[n]} == dict(kept_units)
    assert min(quota.values()) >= 0

    # Retry delays, measured between consecutive requests at the simulator, follow
    # SMS_RETRY_BACKOFF * 2**(attempt-1) with +-20 % jitter: never sooner; later only by the
    # time the request took (up to the HTTP timeout) and the queue's scheduling; and the
    # lower quartile - retries that did not wait behind a timeout or a queue - inside the
    # jitter window.
    measured = {}
    for attempt, values in sorted(gaps.items()):
        configured = min(BACKOFF_MAX_S, BACKOFF_S * 2 ** (attempt - 1))
        low = configured * (1 - JITTER) - EARLY_S
        high = configured * (1 + JITTER) + HTTP_TIMEOUT_S + OVERHEAD_S
        assert min(values) >= low, (attempt, configured, sorted(values)[:5])
        assert max(values) <= high, (attempt, configured, sorted(values)[-5:])
        quartile = statistics.quantiles(values, n=4)[0] if len(values) >= 2 else values[0]
        measured[attempt] = (configured, round(min(values), 3), round(quartile, 3), len(values))
    typical = [(m[0], m[2]) for m in measured.values() if m[3] >= 3]
    assert len(typical) >= 2, measured
    for configured, quartile in typical:
        assert quartile <= configured * (1 + JITTER) + QUEUE_S, (configured, quartile)
    assert [q for _, q in typical] == sorted(q for _, q in typical)
    print(
        f"\nfaults ({'at-least-once' if retry_ambiguous else 'at-most-once'}): {dict(outcomes)};"
        f" requests {stats['requests']} {dict(worker_counts)}; sim faults {faults};"
        f" late answers {late_answers}, lost answers {len(lost_answers)}, duplicate"
        f" acceptances {duplicates};"
        f" retry gaps (configured, min, lower quartile, n) {measured}; {elapsed(started)}s"
    )
