"""Scenario 3 - Redis restart: one redis-server with AOF (``appendfsync always``) holds the
broker, the results and the ledger, as in a default deployment. It is killed with SIGKILL in the
middle of a run and started again from its AOF.

A restart can also cut a ledger call between Redis running it and the worker reading the
answer; the ledger then runs the call again (redis-py's retry, then the ledger's own bounded
retry loop), so the Lua scripts must be safe to replay. The second test shows they are,
through a proxy that loses exactly one answer. The third kills Redis under the rate guard's
pressure, while most messages wait in a put-off retry.
"""

from __future__ import annotations

import random
import time
from collections import Counter

import pytest
from helpers import wait_for

from polyv_sms.config import Settings
from polyv_sms.ledger import Keys, Ledger, Settlement, build_ledger, connect_redis
from polyv_sms.ledger.receipts import Receipts

from .tools import (
    ReplyDroppingProxy,
    Results,
    check_results_match_simulator,
    elapsed,
    ledger_quota,
    log_lines,
    pending_messages,
    phone,
)

pytestmark = pytest.mark.slow

BEFORE, AFTER = 40, 20


def test_redis_restart_mid_run_loses_nothing(
    make_redis, producer, start_worker, autorestart, sim, account
) -> None:
    started = time.monotonic()
    server = make_redis(appendonly=True)
    settings = {
        "SMS_BROKER_URL": server.url(0),
        "SMS_RESULT_BACKEND": server.url(1),
        "SMS_REDIS_URL": server.url(2),
        "SMS_REDIS_OUTAGE": 15,
        # Retries wait long enough to be caught waiting by the restart; a worker that loses
        # its broker connection drops the retries it holds (they stay unacknowledged in the
        # broker until the visibility timeout), and the reconciler brings them back.
        "SMS_RETRY_BACKOFF": 0.4,
        "SMS_RETRY_BACKOFF_MAX": 1.6,
        "SMS_RECONCILE_INTERVAL": 0.5,
        "SMS_RECONCILE_GRACE": 2,
    }
    workers = [autorestart.watch(start_worker(concurrency=8, **settings)) for _ in range(2)]
    app = producer(server.url(0))
    results = Results(server.client(1))
    ledger = server.client(2)
    keys = Keys(account[0])
    numbers = [phone(300 + i) for i in range(40)]
    sim.set_faults(latency_s=0.1, fail_numbers=dict.fromkeys(numbers[::4], 2))
    rng = random.Random(3)

    def enqueue(count: int, first: int) -> dict[str, str]:
        sent = {}
        for i in range(first, first + count):
            tag = f"r{i}"
            sent[app.send(rng.sample(numbers, rng.randint(1, 2)), tag=tag, message_id=tag)] = tag
        return sent

    tasks = enqueue(BEFORE, 0)

    # Mid-run: every message has started (the ledger knows it), some are done, others are
    # in flight or waiting for a retry.
    def mid_run() -> bool:
        started = all(ledger.exists(keys.message(tag)) for tag in tasks.values())
        done = sum(results.state(t) == "SUCCESS" for t in tasks)
        return started and done >= BEFORE // 4 and bool(pending_messages(ledger, account[0]))

    wait_for(mid_run, 30, what="every message started, a quarter done, retries waiting")
    done_before = sum(results.state(t) == "SUCCESS" for t in tasks)
    waiting_before = len(pending_messages(ledger, account[0]))
    requests_before = len(sim.requests())
    server.restart(kill=True, down_for=1.0)
    restarted = time.monotonic()
    # Workers reconnect: messages enqueued after the restart are sent too.
    tasks |= enqueue(AFTER, BEFORE)
    by_tag = {tasks[t]: r for t, r in results.successes(tasks, timeout=60).items()}
    recovered_in = elapsed(restarted)

    # Nothing enqueued was lost, and what the results report is exactly what reached Polyv:
    # no number was sent twice across the restart.
    counts = check_results_match_simulator(by_tag, sim)
    assert counts["accepted"] == sum(len(r["results"]) for r in by_tag.values())
    assert pending_messages(ledger, account[0]) == []
    # Quotas survived: one unit per accepted number, before and after the restart.
    accepted = Counter(
        e["phone_number"]
        for r in by_tag.values()
        for e in r["results"]
        if e["outcome"] == "accepted"
    )
    quota = ledger_quota(ledger, account[0])
    assert quota["_total"] == sum(accepted.values())
    assert {n: quota[n] for n in accepted} == dict(accepted)
    # Receipts survived: every serialNo can be looked up, by serialNo and by phone.
    config = Settings.from_env({"POLYV_APP_ID": account[0], "SMS_REDIS_URL": server.url(2)})
    receipts = Receipts(build_ledger(config, connect_redis(config.redis_url)))
    for tag, result in by_tag.items():
        for entry in result["results"]:
            receipt = receipts.receipt(entry["serial_no"])
            assert receipt is not None, (tag, entry)
            assert (receipt["phone_number"], receipt["message_id"]) == (entry["phone_number"], tag)
    for number, count in accepted.items():
        assert len(receipts.phone(number)["receipts"]) == count
    assert all(w.alive() for w in workers)
    reconciled = sum(len(log_lines(w, "enqueued again")) for w in workers)
    print(
        f"\nredis restart: at the kill {done_before}/{BEFORE} messages done, {waiting_before}"
        f" waiting for a retry, {requests_before} Polyv requests made; {len(tasks)} messages,"
        f" {sum(accepted.values())} numbers accepted; {reconciled} re-enqueued by the"
        f" reconciler; workers restarted after a Celery crash: {autorestart.restarts};"
        f" all done {recovered_in}s after the restart; {elapsed(started)}s"
    )


def test_ledger_calls_replayed_after_a_lost_answer_count_once(redis_server) -> None:
    proxy = ReplyDroppingProxy(redis_server.port)
    client = connect_redis(proxy.url(2))
    now = time.time()
    ledger = Ledger(
        client,
        f"app-replay-{now}",
        phone_daily_limit=10,
        account_daily_limit=100,
        max_attempts=3,
        receipt_ttl_days=1,
        timezone="Asia/Shanghai",
        lease_s=30,
        reconcile_grace_s=60,
        outage_s=5,
        clock=lambda: now,
    )
    a, b = phone(1), phone(2)
    try:
        ledger.reserve("warm-up", [a], token="w")  # loads the script, opens the connection
        proxy.drop_next_reply()
        reservation = ledger.reserve("m", [a, b], token="t")
        assert proxy.dropped == 1  # Redis ran it, the answer was lost, the call ran again
        assert [(s.state, s.attempts) for s in reservation.states] == [("send", 1), ("send", 1)]
        assert reservation.pending == 2
        quota = ledger_quota(redis_server.client(2), ledger.app_id)
        assert quota == {a: 2, b: 1, "_total": 3}

        days = {s.number: s.day for s in reservation.states}
        proxy.drop_next_reply()
        pending, states = ledger.settle(
            "m",
            [Settlement(a, "accepted", 12, "1^0"), Settlement(b, "retry", 11, error="11")],
            days=days,
            token="t",
            retry_at=now,
        )
        assert proxy.dropped == 2
        assert pending == 1
        assert [(s.state, s.attempts) for s in states] == [("accepted", 1), ("reserved", 1)]
        # The retry of b is its second attempt, not its third.
        again = ledger.reserve("m", [a, b], token="t2")
        assert [(s.state, s.attempts) for s in again.states] == [("accepted", 1), ("send", 2)]
        assert ledger_quota(redis_server.client(2), ledger.app_id) == quota
    finally:
        client.close()
        proxy.close()


def test_messages_the_rate_guard_put_off_come_back_after_a_restart(
    make_redis, producer, start_worker, autorestart, sim, account
) -> None:
    """Under the rate guard's pressure most messages wait in a put-off retry (a broker message
    a worker holds) when Redis dies; the workers drop those retries with their broker
    connection. The put-off runs reserved nothing: only the pending entry each put-off leaves
    (``reserve.lua``) lets the reconciler bring them back, within their wait, a lease and the
    grace - not after the broker's visibility timeout (1 h). Without it this test timed out
    with put-off messages still waiting 45 s after the restart."""
    server = make_redis(appendonly=True)
    settings = {
        "SMS_BROKER_URL": server.url(0),
        "SMS_RESULT_BACKEND": server.url(1),
        "SMS_REDIS_URL": server.url(2),
        "SMS_REDIS_OUTAGE": 5,  # (a lease of 16 s: the reconciler's due time)
        "SMS_RETRY_BACKOFF": 0.4,
        "SMS_RETRY_BACKOFF_MAX": 1.6,
        "SMS_RECONCILE_INTERVAL": 0.5,
        "SMS_RECONCILE_GRACE": 2,
        "SMS_POLYV_RATE": 8,
    }
    for _ in range(2):
        autorestart.watch(start_worker(concurrency=8, **settings))
    app = producer(server.url(0))
    results = Results(server.client(1))
    broker = server.client(0)
    tasks = {
        app.send([phone(700 + i)], tag=f"g{i}", message_id=f"g{i}"): f"g{i}" for i in range(60)
    }
    big = [phone(2000 + i) for i in range(450)]  # three requests, each with its own slot
    tasks[app.send(big, tag="g-big", message_id="g-big")] = "g-big"

    # Every message taken by a worker (none left in the queue for the kill to catch half
    # taken), a dozen sent, the rest waiting for their slot in a countdown retry.
    wait_for(
        lambda: len(sim.requests()) >= 12 and broker.llen("sms") == 0,
        60,
        what="the workers to hold every message, a dozen sent",
    )
    server.restart(kill=True, down_for=1.0)
    restarted = time.monotonic()
    by_tag = {tasks[t]: r for t, r in results.successes(tasks, timeout=45).items()}
    recovered_in = elapsed(restarted)

    counts = check_results_match_simulator(by_tag, sim)
    assert counts["accepted"] == 60 + len(big)
    # Waiting for the guard, across the restart, burned no attempt.
    assert {e["attempts"] for r in by_tag.values() for e in r["results"]} == {1}
    print(f"\nput off across a restart: all 61 messages done {recovered_in}s after it")
