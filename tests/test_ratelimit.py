"""The shared rate guard's script (lua/ratelimit.lua) and the dispatcher's use of it, on a real
redis-server: the burst, a slot too far off, the shared pause; and a run that waits for its
slot has reserved nothing (no unit held, no attempt burned)."""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterator

import pytest
import redis

from polyv_sms.dispatch import Dispatcher
from polyv_sms.ledger import Keys, Ledger
from polyv_sms.ledger.ratelimit import RATE_LIMIT_PAUSE_S, RateGuard
from polyv_sms.polyv.client import PolyvClient
from polyv_sms.polyv.simulator import PolyvSimulator
from polyv_sms.validation import validate_request


@pytest.fixture
def client(redis_server) -> Iterator[redis.Redis]:
    real = redis.Redis.from_url(redis_server.url(2), decode_responses=True)
    yield real
    real.close()


def ledger_for(client: redis.Redis, app_id: str) -> Ledger:
    return Ledger(
        client,
        app_id,
        phone_daily_limit=10,
        account_daily_limit=2000,
        max_attempts=3,
        receipt_ttl_days=30,
        timezone="Asia/Shanghai",
        lease_s=30.0,
        reconcile_grace_s=60.0,
    )


@pytest.fixture
def ledger(client: redis.Redis) -> Ledger:
    return ledger_for(client, f"app{uuid.uuid4().hex[:10]}")


def test_a_burst_then_the_steady_pace(ledger: Ledger) -> None:
    guard = RateGuard(ledger, 10)  # one slot per 100 ms, a burst of 100 ms: 2 at once
    assert guard.burst == 2
    first, second, third = (guard.try_acquire() for _ in range(3))
    assert (first.granted, first.wait_s) == (True, 0)
    assert (second.granted, second.wait_s) == (True, 0)
    assert third.granted
    assert 0.05 < third.wait_s <= 0.1  # booked for the next slot, 100 ms on


def test_a_slot_too_far_off_is_not_booked(ledger: Ledger) -> None:
    guard = RateGuard(ledger, 10, max_wait_s=0.05)
    assert guard.try_acquire().granted
    assert guard.try_acquire().granted
    refused = [guard.try_acquire() for _ in range(3)]
    # Nothing was booked: each is told the same wait, not a growing one.
    assert [r.granted for r in refused] == [False, False, False]
    assert all(0.05 < r.wait_s <= 0.1 for r in refused)
    assert not any(r.paused for r in refused)


def test_acquire_sleeps_until_its_slot(ledger: Ledger) -> None:
    slept: list[float] = []
    guard = RateGuard(ledger, 10, sleep=slept.append)
    for _ in range(4):
        assert guard.acquire().granted
    assert slept[0] > 0.05
    assert slept[1] > slept[0]


def test_the_pause_stops_every_guard_of_the_account(client: redis.Redis, ledger: Ledger) -> None:
    mine, theirs = RateGuard(ledger, 100), RateGuard(ledger_for(client, ledger.app_id), 100)
    other_account = RateGuard(ledger_for(client, f"app{uuid.uuid4().hex[:10]}"), 100)
    mine.pause()
    slot = theirs.try_acquire()
    assert (slot.granted, slot.paused) == (False, True)
    assert RATE_LIMIT_PAUSE_S - 5 < slot.wait_s <= RATE_LIMIT_PAUSE_S
    assert other_account.try_acquire().granted
    theirs.pause(5)  # a shorter pause never cuts a longer one
    assert mine.paused_for() > RATE_LIMIT_PAUSE_S - 5
    assert theirs.clear()
    assert mine.try_acquire().granted
    assert mine.paused_for() == 0


def test_a_run_waiting_for_its_slot_reserves_nothing(ledger: Ledger, client: redis.Redis) -> None:
    secret = "s" * 16
    with PolyvSimulator(ledger.app_id, secret) as sim:
        guard = RateGuard(ledger, 10, max_wait_s=0.01)
        polyv = PolyvClient(ledger.app_id, secret, sim.url, timeout=2.0)
        dispatcher = Dispatcher(
            ledger,
            polyv,
            max_attempts=3,
            retry_backoff_s=1.0,
            retry_backoff_max_s=10.0,
            rng=random.Random(1),
            guard=guard,
        )
        request = validate_request((), {
            "phone_numbers": ["13700000901"],
            "template_param_names": ["code"],
            "template_param_values": ["1"],
        }, account_daily_limit=2000)  # fmt: skip
        guard.try_acquire()
        guard.try_acquire()  # the burst is used up: the next slot is 100 ms off
        waiting = dispatcher.run(request, message_id="m-wait", task_id="t")
        assert (waiting.result, waiting.reason) == (None, "rate")
        assert 0.05 < waiting.retry_in <= 10.0
        keys = Keys(ledger.app_id)
        assert not client.exists(keys.message("m-wait"))
        assert client.hget(keys.quota(ledger.day()), "_total") is None
        assert sim.received() == 0

        guard.pause()
        paused = dispatcher.run(request, message_id="m-wait", task_id="t")
        assert paused.reason == "paused"
        # Looked at again within the retry cap, not after the whole pause.
        assert paused.retry_in <= 10.0 + 0.5
        guard.clear()
        client.delete(guard.rate_key)
        done = dispatcher.run(request, message_id="m-wait", task_id="t")
        assert done.result is not None
        assert done.result["results"][0]["attempts"] == 1
        polyv.close()


def test_bulk_books_only_near_slots_so_urgent_work_finds_the_next_ones(ledger: Ledger) -> None:
    secret = "s" * 16
    slept: list[float] = []
    with PolyvSimulator(ledger.app_id, secret) as sim:
        guard = RateGuard(ledger, 10, sleep=slept.append)
        polyv = PolyvClient(ledger.app_id, secret, sim.url, timeout=2.0)
        dispatcher = Dispatcher(
            ledger,
            polyv,
            max_attempts=3,
            retry_backoff_s=1.0,
            retry_backoff_max_s=10.0,
            guard=guard,
        )

        def request(lane: str):
            return validate_request((), {
                "phone_numbers": ["13700000902"],
                "template_param_names": ["code"],
                "template_param_values": ["1"],
                "lane": lane,
            }, account_daily_limit=2000)  # fmt: skip

        for _ in range(10):  # the burst, then slots booked up to 800 ms ahead
            assert guard.try_acquire().granted
        bulk = dispatcher.run(request("bulk"), message_id="m-bulk", task_id="t1")
        assert bulk.reason == "rate"
        urgent = dispatcher.run(request("urgent"), message_id="m-urgent", task_id="t2")
        assert urgent.result is not None
        assert urgent.result["counts"]["accepted"] == 1
        assert 0 < slept[-1] <= 1.0  # it slept until its slot, in-process
        polyv.close()


def test_a_request_that_waited_for_its_slot_still_respects_a_pause_set_meanwhile(
    ledger: Ledger,
) -> None:
    guard = RateGuard(ledger, 10)
    guard.sleep = lambda _seconds: guard.pause(60)  # Polyv said "rate exceeded" meanwhile
    for _ in range(2):
        assert guard.acquire().granted  # the burst: no wait
    slot = guard.acquire()
    assert (slot.granted, slot.paused) == (False, True)
    assert 55 < slot.wait_s <= 60


def test_a_pause_that_cannot_be_set_never_keeps_the_answer_from_the_ledger(
    ledger: Ledger, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "s" * 16
    with PolyvSimulator(ledger.app_id, secret) as sim:
        sim.set_faults(rate_limit_rate=1.0)
        guard = RateGuard(ledger, 100)

        def broken_pause(*_args: object, **_kwargs: object) -> None:
            raise redis.ResponseError("no pause today")

        guard.pause = broken_pause  # type: ignore[method-assign]
        polyv = PolyvClient(ledger.app_id, secret, sim.url, timeout=2.0)
        dispatcher = Dispatcher(
            ledger, polyv, max_attempts=3, retry_backoff_s=1.0, retry_backoff_max_s=10.0,
            guard=guard,
        )  # fmt: skip
        request = validate_request((), {
            "phone_numbers": ["13700000903"],
            "template_param_names": ["code"],
            "template_param_values": ["1"],
        }, account_daily_limit=2000)  # fmt: skip
        outcome = dispatcher.run(request, message_id="m-block", task_id="t")
        assert (outcome.result, outcome.reason) == (None, "pending")
        state = ledger.peek("m-block", ["13700000903"])["13700000903"]
        # Settled: still reserved for a retry, the rate-limited attempt given back.
        assert (state.state, state.attempts) == ("reserved", 0)
        assert "could not set the shared pause" in caplog.text
        polyv.close()
