"""The send_sms task end to end: a real worker subprocess, a private redis-server, the
simulator over HTTP. Producers use ``send_sms.delay`` and ``send_task`` by name."""

from __future__ import annotations

import concurrent.futures
from collections import Counter
from typing import Any

import pytest
import redis
from celery import Celery
from helpers import receipts_for, wait_for

from polyv_sms import send_sms
from polyv_sms.errors import InvalidRequest
from polyv_sms.ledger import Keys
from polyv_sms.polyv.simulator import PolyvSimulator

TIMEOUT = 60


def numbers(count: int, start: int = 0) -> list[str]:
    return [f"139{i:08d}" for i in range(start, start + count)]


@pytest.fixture
def ledger_redis(redis_server) -> redis.Redis:
    client = redis_server.client(2)
    yield client
    client.close()


@pytest.fixture
def by_name(redis_server):
    """A producer that does not import polyv_sms: enqueues by task name."""
    app = Celery("producer", broker=redis_server.url(0), backend=redis_server.url(1))
    app.conf.update(
        task_serializer="json", accept_content=["json"], broker_connection_retry_on_startup=True
    )
    yield app
    app.close()


def quota(ledger_redis: redis.Redis, app_id: str) -> dict[str, int]:
    keys = list(ledger_redis.scan_iter(Keys(app_id).base + "quota:*"))
    total: Counter[str] = Counter()
    for key in keys:
        total.update({k: int(v) for k, v in ledger_redis.hgetall(key).items()})
    return dict(total)


def outcomes(result: dict[str, Any]) -> dict[str, str]:
    return {r["phone_number"]: r["outcome"] for r in result["results"]}


def test_mixed_message(start_worker, sim: PolyvSimulator, ledger_redis, account) -> None:
    start_worker(SMS_MAX_ATTEMPTS=3)
    ok, flaky, broken = "13900000001", "13900000002", "13900000003"
    sim.set_faults(fail_numbers={flaky: 2, broken: 1000})
    result = send_sms.delay([ok, "1768909", flaky, broken, "not-a-number"], ["code"], ["9802"]).get(
        timeout=TIMEOUT
    )

    assert [r["phone_number"] for r in result["results"]] == [
        ok,
        "1768909",
        flaky,
        broken,
        "not-a-number",
    ]
    by_number = {r["phone_number"]: r for r in result["results"]}
    assert by_number[ok] | {"serial_no": None} == {
        "phone_number": ok,
        "outcome": "accepted",
        "status": 12,
        "serial_no": None,
        "attempts": 1,
        "error": None,
    }
    assert by_number[ok]["serial_no"].endswith("^0")
    assert by_number[flaky]["outcome"] == "accepted"
    assert by_number[flaky]["attempts"] == 3
    assert by_number[broken]["outcome"] == "failed"
    assert by_number[broken]["status"] == 11
    assert by_number[broken]["attempts"] == 3
    assert "gave up after 3 attempts" in by_number[broken]["error"]
    for bad in ("1768909", "not-a-number"):
        assert by_number[bad]["outcome"] == "invalid"
        assert by_number[bad]["status"] is None
        assert by_number[bad]["error"]
    assert result["counts"] == {
        "accepted": 2,
        "invalid": 2,
        "quota_exceeded": 0,
        "account_quota_exceeded": 0,
        "failed": 1,
    }
    # What reached "Polyv": the good number once, the flaky one 3 times, the broken one
    # SMS_MAX_ATTEMPTS times, the invalid ones never.
    assert sim.received(ok) == 1
    assert sim.received(flaky) == 3
    assert sim.received(broken) == 3
    assert sim.received("1768909") == 0
    assert sim.received() == 7
    # Units: kept for the accepted numbers, refunded for the failed one.
    assert quota(ledger_redis, account[0]) == {ok: 1, flaky: 1, broken: 0, "_total": 2}


def test_receipts_can_be_looked_up(start_worker, sim, account, redis_server) -> None:
    start_worker()
    sim.set_faults(fail_numbers={"13900000013": 1000})
    result = send_sms.delay(
        ["13900000011", "13900000013"], ["code"], ["1"], message_id="order-42"
    ).get(timeout=TIMEOUT)
    serial = result["results"][0]["serial_no"]
    receipts = receipts_for(account[0], redis_server)

    receipt = receipts.receipt(serial)
    assert receipt is not None
    assert receipt["phone_number"] == "13900000011"
    assert receipt["message_id"] == "order-42"
    assert receipt["attempt"] == 1
    assert receipt["accepted_at"]

    message = receipts.message("order-42")
    assert message is not None
    assert [(n["phone_number"], n["state"]) for n in message["numbers"]] == [
        ("13900000011", "accepted"),
        ("13900000013", "failed"),
    ]
    assert message["pending"] == 0

    phone = receipts.phone("13900000011")
    assert [r["serial_no"] for r in phone["receipts"]] == [serial]
    assert phone["today"]["count"] == 1
    assert phone["today"]["limit"] == 10

    dead = receipts.dead()
    assert [d["message_id"] for d in dead] == ["order-42"]
    assert dead[0]["failed"][0]["phone_number"] == "13900000013"
    assert receipts.receipt("nope^0") is None
    assert receipts.message("nope") is None


def test_twelve_messages_to_one_number(start_worker, sim, ledger_redis, account) -> None:
    start_worker(concurrency=4)
    number = "13900000021"
    pending = [send_sms.delay([number], ["code"], [str(i)]) for i in range(12)]
    results = [p.get(timeout=TIMEOUT) for p in pending]
    kinds = Counter(r["results"][0]["outcome"] for r in results)
    assert kinds == {"accepted": 10, "quota_exceeded": 2}
    assert sim.accepted(number) == 10
    assert sim.received(number) == 10
    refused = [r["results"][0] for r in results if r["results"][0]["outcome"] != "accepted"]
    assert all(r["status"] is None and "daily limit" in r["error"] for r in refused)
    assert quota(ledger_redis, account[0]) == {number: 10, "_total": 10}


def test_account_limit_is_exact_under_concurrency(start_worker, sim, ledger_redis, account) -> None:
    start_worker(concurrency=8, SMS_ACCOUNT_DAILY_LIMIT=30)
    start_worker(concurrency=8, SMS_ACCOUNT_DAILY_LIMIT=30)
    targets = numbers(20, start=100)
    pending = [send_sms.delay([targets[i % 20]], ["code"], ["1"]) for i in range(90)]
    results = [p.get(timeout=TIMEOUT) for p in pending]
    kinds = Counter(r["results"][0]["outcome"] for r in results)
    assert kinds == {"accepted": 30, "account_quota_exceeded": 60}
    assert sim.accepted() == 30
    assert sim.received() == 30
    counts = quota(ledger_redis, account[0])
    assert counts["_total"] == 30
    assert max(v for k, v in counts.items() if k != "_total") <= 10


def test_more_than_200_numbers_go_in_requests_of_at_most_200(start_worker, sim) -> None:
    start_worker()
    targets = numbers(450, start=1000)
    result = send_sms.delay(targets, ["code"], ["1"]).get(timeout=TIMEOUT)
    assert result["counts"]["accepted"] == 450
    assert [len(r["numbers"]) for r in sim.requests()] == [200, 200, 50]
    assert sorted(n for r in sim.requests() for n in r["numbers"]) == sorted(targets)


def test_duplicate_numbers_are_sent_once(start_worker, sim) -> None:
    start_worker()
    result = send_sms.delay(
        ["17680476163", 17680476163, "+86 176-8047-6163", "13900000031"], ["code"], ["1"]
    ).get(timeout=TIMEOUT)
    assert [r["phone_number"] for r in result["results"]] == ["17680476163", "13900000031"]
    assert sim.received("17680476163") == 1


def test_same_message_id_twice_sends_nothing_again(start_worker, sim) -> None:
    start_worker()
    first = send_sms.delay(
        ["13900000041", "13900000042"], ["code"], ["1"], message_id="welcome-7"
    ).get(timeout=TIMEOUT)
    second = send_sms.delay(
        ["13900000041", "13900000042"], ["code"], ["1"], message_id="welcome-7"
    ).get(timeout=TIMEOUT)
    assert second["results"] == first["results"]
    assert second["message_id"] == "welcome-7"
    assert sim.received() == 2


def test_same_message_id_enqueued_concurrently_is_sent_once(start_worker, sim) -> None:
    start_worker(concurrency=8)
    sim.set_faults(latency_s=0.3)
    pending = [
        send_sms.delay(["13900000051"], ["code"], ["1"], message_id="race-1") for _ in range(6)
    ]
    results = [p.get(timeout=TIMEOUT) for p in pending]
    assert {r["results"][0]["outcome"] for r in results} == {"accepted"}
    assert len({r["results"][0]["serial_no"] for r in results}) == 1
    assert sim.received("13900000051") == 1


def test_bad_request_fails_in_the_producer_and_enqueues_nothing(redis_server) -> None:
    broker = redis_server.client(0)
    before = broker.llen("sms")
    with pytest.raises(InvalidRequest, match="template_param_values"):
        send_sms.delay(["13900000061"], ["code", "name"], ["1"])
    with pytest.raises(InvalidRequest, match="phone_numbers: is empty"):
        send_sms.delay([], ["code"], ["1"])
    with pytest.raises(InvalidRequest, match="phone_numbers"):
        send_sms.delay(["13900000061"] * 2001, ["code"], ["1"])
    assert broker.llen("sms") == before


def test_bad_request_by_name_fails_in_the_worker_without_sending(
    start_worker, sim, by_name, ledger_redis, account
) -> None:
    worker = start_worker()
    result = by_name.send_task(
        "polyv_sms.send_sms",
        kwargs={
            "phone_numbers": ["13900000071"],
            "template_param_names": ["code"],
            "template_param_values": ["1", "2"],
        },
        queue="sms",
    )
    with pytest.raises(Exception, match="template_param_values: 2 values for 1 names") as caught:
        result.get(timeout=TIMEOUT)
    assert type(caught.value).__name__ == "InvalidRequest"
    assert result.state == "FAILURE"
    assert sim.requests() == []
    assert quota(ledger_redis, account[0]) == {}
    # The worker stays up and sends the next, good request.
    good = by_name.send_task(
        "polyv_sms.send_sms", args=[["13900000071"], ["code"], ["1"]], queue="sms"
    ).get(timeout=TIMEOUT)
    assert good["counts"]["accepted"] == 1
    assert worker.alive()


def test_permanent_polyv_error_fails_pending_numbers_without_a_retry_loop(
    start_worker, sim, ledger_redis, account
) -> None:
    start_worker(POLYV_APP_SECRET="not-the-right-secret", SMS_MAX_ATTEMPTS=5)
    result = send_sms.delay(numbers(3, start=80), ["code"], ["1"]).get(timeout=TIMEOUT)
    assert result["counts"]["failed"] == 3
    assert all("invalid signature" in r["error"] for r in result["results"])
    assert all(r["attempts"] == 1 for r in result["results"])
    assert len(sim.requests()) == 1
    assert quota(ledger_redis, account[0])["_total"] == 0


def test_polyv_minus_one_raises_our_counter_to_the_limit(
    start_worker, ledger_redis, account, redis_server, tmp_path
) -> None:
    app_id, secret = account
    with PolyvSimulator(app_id, secret, phone_daily_limit=2) as strict:
        from conftest import worker_env
        from helpers import WorkerProcess

        worker = WorkerProcess(worker_env(account, strict, redis_server), tmp_path / "w.log")
        worker.start()
        try:
            number = "13900000091"
            results = [
                send_sms.delay([number], ["code"], ["1"]).get(timeout=TIMEOUT) for _ in range(4)
            ]
        finally:
            worker.stop()
        assert [r["results"][0]["outcome"] for r in results] == [
            "accepted",
            "accepted",
            "quota_exceeded",
            "quota_exceeded",
        ]
        assert results[2]["results"][0]["status"] == -1  # Polyv said so
        assert results[3]["results"][0]["status"] is None  # we knew, Polyv was not asked
        assert strict.received(number) == 3
        counts = quota(ledger_redis, app_id)
        assert counts[number] == 10
        assert counts["_total"] == 2


def test_worker_refuses_to_start_without_credentials(start_worker) -> None:
    worker = start_worker(wait=False, POLYV_APP_SECRET="")
    code = wait_for(lambda: worker.process.poll() is not None, 30, what="the worker to exit")
    assert code
    assert worker.process.returncode != 0
    assert "POLYV_APP_SECRET must be set" in worker.log()


def test_concurrent_producers_threads(start_worker, sim) -> None:
    start_worker(concurrency=8)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(send_sms.delay, [n], ["code"], ["1"]) for n in numbers(20, 300)]
        results = [f.result().get(timeout=TIMEOUT) for f in futures]
    assert all(r["counts"]["accepted"] == 1 for r in results)
