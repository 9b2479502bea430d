"""design.md's five invariants, one test each, through real worker subprocesses, a private
redis-server and the simulator over HTTP."""

from __future__ import annotations

from collections import Counter

import pytest
import redis
from celery import Celery
from helpers import wait_for

from polyv_sms import send_sms
from polyv_sms.dispatch import OUTCOMES
from polyv_sms.errors import InvalidRequest
from polyv_sms.ledger import Keys
from polyv_sms.polyv.simulator import PolyvSimulator

TIMEOUT = 90


@pytest.fixture
def ledger_redis(redis_server):
    client = redis_server.client(2)
    yield client
    client.close()


def quota_fields(ledger_redis: redis.Redis, app_id: str) -> dict[str, int]:
    total: Counter[str] = Counter()
    for key in ledger_redis.scan_iter(Keys(app_id).base + "quota:*"):
        total.update({k: int(v) for k, v in ledger_redis.hgetall(key).items()})
    return dict(total)


def test_invariant_1_daily_limits_hold_under_concurrent_workers(
    start_worker, sim: PolyvSimulator, ledger_redis, account
) -> None:
    for _ in range(2):
        start_worker(concurrency=8, SMS_ACCOUNT_DAILY_LIMIT=25, SMS_PHONE_DAILY_LIMIT=4)
    targets = [f"1390000{i:04d}" for i in range(8)]
    pending = [
        send_sms.delay([targets[i % 8], targets[(i + 3) % 8]], ["code"], ["1"]) for i in range(40)
    ]
    results = [p.get(timeout=TIMEOUT) for p in pending]
    accepted = Counter(
        r["phone_number"] for res in results for r in res["results"] if r["outcome"] == "accepted"
    )
    assert sum(accepted.values()) == 25
    assert max(accepted.values()) <= 4
    assert sum(sim.accepted(n) for n in targets) == 25
    assert all(sim.accepted(n) == accepted[n] for n in targets)
    counts = quota_fields(ledger_redis, account[0])
    assert counts["_total"] == 25
    assert all(counts[n] <= 4 for n in targets)


def test_invariant_2_an_accepted_number_is_never_sent_again_for_its_message(
    start_worker, sim: PolyvSimulator, ledger_redis, account
) -> None:
    # On retry and on a second enqueue of the same message id.
    start_worker()
    sim.set_faults(fail_numbers={"13900000102": 2})
    for _ in range(2):
        result = send_sms.delay(
            ["13900000101", "13900000102"], ["code"], ["1"], message_id="inv2"
        ).get(timeout=TIMEOUT)
        assert result["counts"]["accepted"] == 2
    assert sim.received("13900000101") == 1
    assert sim.received("13900000102") == 3


@pytest.mark.slow
def test_invariant_2_holds_when_a_worker_dies_while_a_retry_waits(
    start_worker, sim: PolyvSimulator, ledger_redis, account
) -> None:
    # The worker is SIGKILLed while it holds the retry (countdown ~2 s); a replacement gets
    # the message back after the visibility timeout and sends only what is still pending.
    settings = {"SMS_RETRY_BACKOFF": 2, "SMS_RETRY_BACKOFF_MAX": 2, "SMS_VISIBILITY_TIMEOUT": 8}
    first = start_worker(**settings)
    sim.set_faults(fail_numbers={"13900000112": 1})
    pending = send_sms.delay(["13900000111", "13900000112"], ["code"], ["1"])
    msg = Keys(account[0]).message(pending.id)
    wait_for(
        lambda: (ledger_redis.hget(msg, "n:13900000111") or "").startswith("accepted"),
        20,
        what="the first attempt to be settled",
    )
    first.kill()
    start_worker(**settings)
    result = pending.get(timeout=TIMEOUT)
    assert result["counts"]["accepted"] == 2
    assert sim.received("13900000111") == 1
    assert sim.received("13900000112") == 2


def test_invariant_3_invalid_input_never_reaches_polyv_nor_takes_quota(
    start_worker, sim: PolyvSimulator, ledger_redis, account, redis_server
) -> None:
    start_worker()
    with pytest.raises(InvalidRequest):
        send_sms.delay(["13900000121"], ["code"], [])
    producer = Celery("p", broker=redis_server.url(0), backend=redis_server.url(1))
    producer.conf.update(broker_connection_retry_on_startup=True)
    try:
        bad = producer.send_task(
            "polyv_sms.send_sms", args=[["13900000121"], [1], ["x"]], queue="sms"
        )
        with pytest.raises(Exception, match=r"template_param_names\[0\]"):
            bad.get(timeout=TIMEOUT)
    finally:
        producer.close()
    result = send_sms.delay(["12345", "13900000122", "1390000012x", None], ["code"], ["1"]).get(
        timeout=TIMEOUT
    )
    assert [r["outcome"] for r in result["results"]] == [
        "invalid",
        "accepted",
        "invalid",
        "invalid",
    ]
    assert [n for r in sim.requests() for n in r["numbers"]] == ["13900000122"]
    assert quota_fields(ledger_redis, account[0]) == {"13900000122": 1, "_total": 1}


def test_invariant_4_every_number_ends_in_a_final_outcome(
    start_worker, sim: PolyvSimulator, ledger_redis, account
) -> None:
    start_worker(concurrency=8, SMS_MAX_ATTEMPTS=4, POLYV_HTTP_TIMEOUT=0.5)
    sim.set_faults(
        status11_rate=0.3,
        http500_rate=0.1,
        drop_rate=0.05,
        garbage_rate=0.05,
        slow_rate=0.05,
        slow_latency_s=0.8,
        seed=4,
    )
    messages = [[f"1390001{i:04d}", f"1390002{i:04d}"] for i in range(30)]
    results = [
        p.get(timeout=TIMEOUT) for p in [send_sms.delay(m, ["code"], ["1"]) for m in messages]
    ]
    kinds: Counter[str] = Counter()
    for numbers, result in zip(messages, results, strict=True):
        assert [r["phone_number"] for r in result["results"]] == numbers
        for r in result["results"]:
            assert r["outcome"] in OUTCOMES
            assert 1 <= r["attempts"] <= 4
            kinds[r["outcome"]] += 1
    assert kinds["accepted"] > 0
    keys = Keys(account[0])
    assert ledger_redis.zcard(keys.pending) == 0
    for result in results:
        assert ledger_redis.hget(keys.message(result["message_id"]), "pending") == "0"
    # No number was sent more often than SMS_MAX_ATTEMPTS.
    assert max(sim.received(n) for m in messages for n in m) <= 4


def test_invariant_5_units_are_refunded_for_numbers_not_sent(
    start_worker, sim: PolyvSimulator, ledger_redis, account
) -> None:
    start_worker(SMS_MAX_ATTEMPTS=2)
    sim.set_faults(invalid_numbers=["13900000131"], fail_numbers={"13900000132": 99})
    result = send_sms.delay(
        ["13900000131", "13900000132", "13900000133", "139"], ["code"], ["1"]
    ).get(timeout=TIMEOUT)
    assert [r["outcome"] for r in result["results"]] == ["invalid", "failed", "accepted", "invalid"]
    assert result["results"][0]["status"] == -2  # Polyv said it is invalid
    counts = quota_fields(ledger_redis, account[0])
    assert counts == {"13900000131": 0, "13900000132": 0, "13900000133": 1, "_total": 1}
    assert min(counts.values()) >= 0
