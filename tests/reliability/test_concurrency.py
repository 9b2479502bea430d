"""Scenario 1 - concurrency: the daily limits hold exactly under concurrent workers.

Two worker processes with 8 threads each race 320 messages over 20 numbers (1 to 3 numbers
per message) against an account limit of 150; some numbers answer status 11 a few times
so that retries interleave with first attempts.
"""

from __future__ import annotations

import random
import time
from collections import Counter

import pytest

from polyv_sms import send_sms

from .tools import (
    TAG,
    check_results_match_simulator,
    elapsed,
    ledger_quota,
    ledger_states,
    log_lines,
    pending_messages,
    phone,
)

pytestmark = pytest.mark.slow

MESSAGES = 320
NUMBERS = [phone(i) for i in range(20)]
ACCOUNT_LIMIT = 150
PHONE_LIMIT = 10


def test_limits_are_exact_across_two_workers(start_worker, sim, account, redis_server) -> None:
    started = time.monotonic()
    workers = [
        start_worker(concurrency=8, SMS_ACCOUNT_DAILY_LIMIT=ACCOUNT_LIMIT, SMS_MAX_ATTEMPTS=5)
        for _ in range(2)
    ]
    # Three numbers answer 11 to their first two requests: their retries race the others;
    # a little latency keeps requests of different threads overlapping.
    sim.set_faults(fail_numbers=dict.fromkeys(NUMBERS[:3], 2), latency_s=0.01)
    rng = random.Random(1)
    pending = {}
    for i in range(MESSAGES):
        tag = f"m{i}"
        targets = rng.sample(NUMBERS, rng.randint(1, 3))
        pending[tag] = send_sms.delay(targets, [TAG], [tag], message_id=tag)
    results = {tag: p.get(timeout=120) for tag, p in pending.items()}

    counts = check_results_match_simulator(results, sim)
    assert counts["accepted"] == ACCOUNT_LIMIT
    assert counts["failed"] == counts["invalid"] == 0
    assert sum(counts.values()) == sum(len(r["results"]) for r in results.values())

    accepted_per_number = Counter(
        e["phone_number"]
        for r in results.values()
        for e in r["results"]
        if e["outcome"] == "accepted"
    )
    assert max(accepted_per_number.values()) <= PHONE_LIMIT
    # Polyv's side agrees and never had to refuse a number for its limit (-1).
    assert sim.accepted() == ACCOUNT_LIMIT
    assert all(sim.accepted(n) == accepted_per_number[n] for n in NUMBERS)
    assert "-1" not in sim.stats()["by_status"]
    # The ledger holds exactly one unit per accepted number, and nothing is left reserved.
    ledger = redis_server.client(2)
    quota = ledger_quota(ledger, account[0])
    assert quota["_total"] == ACCOUNT_LIMIT
    assert {n: quota[n] for n in NUMBERS} == {n: accepted_per_number[n] for n in NUMBERS}
    assert pending_messages(ledger, account[0]) == []
    assert all(s.final for s in ledger_states(ledger, account[0]).values())
    # Both workers took part.
    ran = [len(log_lines(w, "succeeded in")) for w in workers]
    assert min(ran) > 0, ran
    print(
        f"\nconcurrency: {MESSAGES} messages, {sum(counts.values())} numbers -> "
        f"{dict(counts)}; {sim.stats()['requests']} Polyv requests; tasks per worker {ran};"
        f" {elapsed(started)}s"
    )
