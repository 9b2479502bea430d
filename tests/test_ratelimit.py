"""The shared rate guard's script (lua/ratelimit.lua) and the dispatcher's use of it, on a real
redis-server: the burst, a slot too far off, the shared pause; and a run that waits for its
slot has reserved nothing (no unit held, no attempt burned)."""

from __future__ import annotations

import random
import re
import uuid
from pathlib import Path

import pytest
import redis
from helpers import RedisServer

import polyv_sms.ledger
from polyv_sms.dispatch import Dispatcher
from polyv_sms.ledger import Keys, Ledger, Reservation, Settlement, Slot
from polyv_sms.ledger.ratelimit import RATE_LIMIT_PAUSE_S, RateGuard
from polyv_sms.ledger.reconcile import Reconciler
from polyv_sms.polyv.client import PolyvClient
from polyv_sms.polyv.simulator import PolyvSimulator
from polyv_sms.validation import SmsRequest, validate_request


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
        # No number reserved, no unit, no lease: only the task's request, for the reconciler.
        assert ledger.peek("m-wait", ["13700000901"]) == {}
        assert ledger.lease_holder("m-wait") is None
        assert set(client.hkeys(keys.message("m-wait"))) == {"content", "req:t"}
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


# --- the guard folded into reserve: one round trip for both --------------------------------


def _settle_retry(ledger: Ledger, reservation: Reservation, token: str) -> None:
    """Settle every number granted an attempt as a plain status 11 (stays reserved)."""
    items = [Settlement(s.number, "retry", 11, attempt=s.attempts) for s in reservation.states]
    days = {s.number: s.day for s in reservation.states}
    ledger.settle("m-fold", items, days=days, token=token, retry_at=0)


def test_a_reserve_the_guard_refuses_takes_no_unit_and_counts_no_attempt(
    ledger: Ledger, client: redis.Redis
) -> None:
    guard = RateGuard(ledger, 10, max_wait_s=0.05)
    old, new = "13700000911", "13700000912"
    first = ledger.reserve("m-fold", [old], token="t1")
    _settle_retry(ledger, first, "t1")  # `old` holds a unit, 1 attempt used, no lease
    keys = Keys(ledger.app_id)
    record_before = client.hgetall(keys.message("m-fold"))
    quota_before = client.hgetall(keys.quota(ledger.day()))
    pending_before = client.zrange(keys.pending, 0, -1, withscores=True)

    guard.try_acquire()
    guard.try_acquire()  # the burst is used up: the next slot is 100 ms off
    tat = client.get(guard.rate_key)
    meta = {"task_id": "t2", "phone_numbers": [old, new], "template_param_names": ["code"],
            "template_param_values": ["1"]}  # fmt: skip
    stored = {"req:t2", "content"}
    refused = ledger.reserve("m-fold", [old, new], token="t2", meta=meta, rate=guard.limit())
    assert refused.slot is not None
    assert (refused.slot.granted, refused.slot.paused) == (False, False)
    assert 0.05 < refused.slot.wait_s <= 0.1
    assert (refused.states, refused.busy_for_s, refused.conflict) == ((), None, False)
    # No unit for `new`, no second attempt for `old`, no lease, no slot booked: only the
    # task's request, and the message kept in `pending` (due after the retry, a lease and the
    # grace), for the reconciler should the put-off run's retry be lost.
    record = client.hgetall(keys.message("m-fold"))
    assert {k: v for k, v in record.items() if k not in stored} == record_before
    assert set(record) - set(record_before) == stored
    assert client.hgetall(keys.quota(ledger.day())) == quota_before
    due = client.zscore(keys.pending, "m-fold")
    assert due is not None
    assert due >= ledger.clock() * 1000 + (ledger.lease_s + ledger.reconcile_grace_s) * 1000
    assert [m for m, _ in pending_before] == ["m-fold"]
    assert client.get(guard.rate_key) == tat
    # Polling again for the slot writes nothing: the entry is far enough off.
    written = client.info("persistence")["rdb_changes_since_last_save"]
    again = ledger.reserve("m-fold", [old, new], token="t2b", meta=meta, rate=guard.limit())
    assert again.slot is not None
    assert not again.slot.granted
    assert client.info("persistence")["rdb_changes_since_last_save"] == written
    assert client.zscore(keys.pending, "m-fold") == due

    guard.pause(60)
    paused = ledger.reserve("m-fold", [old, new], token="t3", meta=meta, rate=guard.limit())
    assert paused.slot is not None
    assert (paused.slot.granted, paused.slot.paused) == (False, True)
    assert 55 < paused.slot.wait_s <= 60
    assert client.hgetall(keys.message("m-fold")) == record
    assert client.hgetall(keys.quota(ledger.day())) == quota_before
    assert client.get(guard.rate_key) == tat
    # Its retry comes after the pause (60 s): the reconciler's entry moves past that.
    assert client.zscore(keys.pending, "m-fold") >= due + 55_000

    guard.clear()
    client.delete(guard.rate_key)
    granted = ledger.reserve("m-fold", [old, new], token="t4", meta=meta, rate=guard.limit())
    assert granted.slot == Slot(True, 0.0)
    assert [(s.state, s.attempts) for s in granted.states] == [("send", 2), ("send", 1)]
    assert client.hget(keys.quota(ledger.day()), "_total") == "2"
    assert client.exists(guard.rate_key)


def test_a_reserve_that_grants_nothing_books_no_slot_and_is_never_put_off(
    ledger: Ledger, client: redis.Redis
) -> None:
    guard = RateGuard(ledger, 10, max_wait_s=0.05)
    done, exhausted = "13700000913", "13700000914"
    first = ledger.reserve("m-fold", [done, exhausted], token="t1")
    days = {s.number: s.day for s in first.states}
    ledger.settle(
        "m-fold",
        [Settlement(done, "accepted", 12, "s-913^0", attempt=1),
         Settlement(exhausted, "retry_keep", attempt=1)],
        days=days, token="t1", retry_at=0,
    )  # fmt: skip
    # (`exhausted` keeps its unit with attempts left: a ledger of 1 attempt makes it exhausted)
    one_attempt = ledger_for(client, ledger.app_id)
    one_attempt.max_attempts = 1
    client.delete(guard.rate_key)
    for pause in (False, True):
        if pause:
            guard.pause(60)
        nothing = one_attempt.reserve(
            "m-fold", [done, exhausted], token=f"t-{pause}", rate=guard.limit()
        )
        assert nothing.slot is None
        assert [s.state for s in nothing.states] == ["accepted", "exhausted"]
        assert not client.exists(guard.rate_key)  # no slot booked
    guard.clear()

    # Over the daily limit: refused by the ledger, not sent, so no slot either.
    full = ledger_for(client, ledger.app_id)
    full.phone_daily_limit = 1
    again = full.reserve("m-fold-2", [done], token="t", rate=guard.limit())
    assert (again.slot, again.states[0].state) == (None, "quota_exceeded")
    assert not client.exists(guard.rate_key)


def test_a_replayed_reserve_is_never_refused_and_counts_nothing_twice(
    client: redis.Redis,
) -> None:
    """The ledger replays a reserve whose reply was lost (same token, same time): the first
    call granted the attempt, so the guard must not put the replay off (the attempt would stay
    counted under a lease nobody settles). It books a second slot when one is near enough
    (conservative), else waits the longest wait: the first call's slot is no further."""
    now = [1_800_000_000.0]
    ledger = Ledger(
        client, f"app{uuid.uuid4().hex[:10]}", phone_daily_limit=10, account_daily_limit=2000,
        max_attempts=3, receipt_ttl_days=30, timezone="Asia/Shanghai", lease_s=30.0,
        reconcile_grace_s=60.0, clock=lambda: now[0],
    )  # fmt: skip
    guard = RateGuard(ledger, 10, max_wait_s=0.05)  # a burst of 2, then one slot per 100 ms
    number = "13700000915"
    quota = Keys(ledger.app_id).quota(ledger.day())
    first = ledger.reserve("m-replay", [number], token="t", rate=guard.limit())
    assert first.slot == Slot(True, 0.0)
    tat = float(client.get(guard.rate_key) or 0)

    replay = ledger.reserve("m-replay", [number], token="t", rate=guard.limit())
    assert replay.slot == Slot(True, 0.0)  # the burst's second slot: booked
    assert float(client.get(guard.rate_key) or 0) == pytest.approx(tat + 100, abs=0.01)
    assert [(s.state, s.attempts) for s in replay.states] == [("send", 1)]

    guard.pause(60)  # and the next slot is 100 ms off, past the longest wait
    tat = float(client.get(guard.rate_key) or 0)
    again = ledger.reserve("m-replay", [number], token="t", rate=guard.limit())
    assert again.slot == Slot(True, 0.05)  # neither paused nor refused; nothing booked
    assert float(client.get(guard.rate_key) or 0) == tat
    assert [(s.state, s.attempts) for s in again.states] == [("send", 1)]
    assert client.hget(quota, "_total") == "1"


def _dispatcher(ledger: Ledger, polyv: PolyvClient, guard: RateGuard, **options: object):
    return Dispatcher(
        ledger, polyv, max_attempts=3, retry_backoff_s=1.0, retry_backoff_max_s=10.0,
        rng=random.Random(1), guard=guard, **options,  # type: ignore[arg-type]
    )  # fmt: skip


def _request(number: str) -> SmsRequest:
    return validate_request((), {
        "phone_numbers": [number],
        "template_param_names": ["code"],
        "template_param_values": ["1"],
    }, account_daily_limit=2000)  # fmt: skip


@pytest.mark.parametrize("retry_ambiguous", [True, False], ids=["at-least-once", "at-most-once"])
def test_a_pause_seen_after_the_wait_gives_the_attempt_back_and_sends_nothing(
    ledger: Ledger, client: redis.Redis, retry_ambiguous: bool
) -> None:
    secret = "s" * 16
    number = "13700000916"
    with PolyvSimulator(ledger.app_id, secret) as sim:
        guard = RateGuard(ledger, 10)
        slept: list[float] = []

        def sleep(seconds: float) -> None:
            slept.append(seconds)
            guard.pause(60)  # Polyv said "rate exceeded" to another worker meanwhile

        guard.sleep = sleep
        polyv = PolyvClient(ledger.app_id, secret, sim.url, timeout=2.0)
        dispatcher = _dispatcher(ledger, polyv, guard, retry_ambiguous=retry_ambiguous)
        guard.try_acquire()
        guard.try_acquire()  # the burst is used up: reserve books the slot 100 ms off
        outcome = dispatcher.run(_request(number), message_id="m-held", task_id="t")
        assert (outcome.result, outcome.reason) == (None, "paused")
        assert 0.05 < slept[0] <= 0.1
        assert outcome.retry_in is not None
        assert outcome.retry_in <= 10.0 + 0.5
        assert sim.received() == 0
        state = ledger.peek("m-held", [number])[number]
        # Still reserved (its unit held for the retry), the attempt given back, the lease
        # released: the next run is neither "busy" nor (at most once) "unsettled".
        assert (state.state, state.attempts) == ("reserved", 0)
        assert ledger.lease_holder("m-held") is None

        guard.sleep = slept.append
        guard.clear()
        client.delete(guard.rate_key)
        done = dispatcher.run(_request(number), message_id="m-held", task_id="t")
        assert done.result is not None
        assert done.result["results"][0]["outcome"] == "accepted"
        assert done.result["results"][0]["attempts"] == 1
        assert sim.received() == 1
        assert client.hget(Keys(ledger.app_id).quota(ledger.day()), "_total") == "1"
        polyv.close()


def test_a_pause_that_cannot_be_read_after_the_wait_does_not_hold_the_numbers(
    ledger: Ledger, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The second look at the pause (after sleeping for the slot, the numbers reserved) is one
    attempt: a Redis that does not answer it is not ridden out under the lease; the request
    goes (the pause is best effort: a request already on the wire cannot be called back)."""
    secret = "s" * 16
    number = "13700000918"
    with PolyvSimulator(ledger.app_id, secret) as sim:
        slept: list[float] = []
        guard = RateGuard(ledger, 10, sleep=slept.append)
        polyv = PolyvClient(ledger.app_id, secret, sim.url, timeout=2.0)
        dispatcher = _dispatcher(ledger, polyv, guard)
        guard.try_acquire()
        guard.try_acquire()  # the burst is used up: the slot is 100 ms off

        def down(*_args: object, **_kwargs: object) -> int:
            raise redis.ConnectionError("gone")

        monkeypatch.setattr(ledger.redis, "pttl", down)
        done = dispatcher.run(_request(number), message_id="m-dark", task_id="t")
        assert done.result is not None
        assert done.result["counts"]["accepted"] == 1
        assert len(slept) == 1
        assert sim.received() == 1
        assert "could not look at the shared pause" in caplog.text
        polyv.close()


def _commandstats(server: redis.Redis) -> dict[str, int]:
    """Calls per command, the scripts' own commands included (INFO and CONFIG left out)."""
    stats = server.info("commandstats")
    return {
        name.removeprefix("cmdstat_"): int(value["calls"])
        for name, value in stats.items()
        if not name.startswith(("cmdstat_info", "cmdstat_config"))
    }


def _commands_in_scripts() -> set[str]:
    lua = Path(polyv_sms.ledger.__file__).parent / "lua"
    found = set()
    for path in lua.glob("*.lua"):
        found |= set(re.findall(r"redis\.call\('(\w+)'", path.read_text("utf-8")))
    return {name.lower() for name in found}


def test_a_message_costs_two_ledger_round_trips_with_the_guard(tmp_path: Path) -> None:
    """One EVALSHA of reserve (the guard's slot included) and one of settle per Polyv request,
    and no other command, counted by a redis-server of the test's own."""
    server = RedisServer(tmp_path).start()
    own = server.client(0)
    try:
        ledger = ledger_for(own, f"app{uuid.uuid4().hex[:10]}")
        secret = "s" * 16
        with PolyvSimulator(ledger.app_id, secret) as sim:
            guard = RateGuard(ledger, 1_000_000)
            polyv = PolyvClient(ledger.app_id, secret, sim.url, timeout=2.0)
            dispatcher = _dispatcher(ledger, polyv, guard)
            warm = dispatcher.run(_request("13700000917"), message_id="m-warm", task_id="t")
            assert warm.result is not None  # (the scripts are loaded now)
            own.config_resetstat()
            for i in range(5):
                number = f"137000009{20 + i}"
                done = dispatcher.run(_request(number), message_id=f"m-{i}", task_id=f"t{i}")
                assert done.result is not None
                assert done.result["counts"]["accepted"] == 1
            assert sim.received() == 6
            calls = _commandstats(own)
            # 2 round trips per message: EVALSHA of reserve and of settle, no ratelimit.lua
            # and no other command from the client (commandstats also counts the commands
            # the scripts run: reserve's guard ran PTTL and TIME once per message).
            assert calls["evalsha"] == 10
            assert (calls["pttl"], calls["time"]) == (5, 5)
            assert set(calls) - {"evalsha"} <= _commands_in_scripts(), calls
            polyv.close()
    finally:
        server.stop()


# --- a put-off run whose retry is lost --------------------------------------------------------


def _clocked_ledger(client: redis.Redis, now: list[float]) -> Ledger:
    return Ledger(
        client, f"app{uuid.uuid4().hex[:10]}", phone_daily_limit=10, account_daily_limit=2000,
        max_attempts=3, receipt_ttl_days=30, timezone="Asia/Shanghai", lease_s=30.0,
        reconcile_grace_s=60.0, clock=lambda: now[0],
    )  # fmt: skip


def _revive_and_finish(
    ledger: Ledger, dispatcher: Dispatcher, now: list[float], wait_s: float, message_id: str
) -> dict[str, object]:
    """Sweep like the reconciler: nothing while the put-off run's own retry may still come,
    the stored request once it is overdue; then run what was enqueued to its end."""
    enqueued: list[tuple[str, str, dict[str, object]]] = []
    reconciler = Reconciler(ledger, lambda *a: enqueued.append(a), interval_s=5)
    now[0] += wait_s + 1
    assert reconciler.sweep() == []  # its own retry is due first
    now[0] += ledger.lease_s + ledger.reconcile_grace_s
    assert reconciler.sweep() == [message_id]
    [(revived_id, task_id, kwargs)] = enqueued
    assert (revived_id, task_id) == (message_id, "t-lost")
    request = validate_request((), kwargs, account_daily_limit=2000)
    done = dispatcher.run(request, message_id=message_id, task_id=task_id)
    assert done.result is not None
    assert reconciler.sweep() == []
    assert not ledger.redis.zscore(ledger.keys.pending, message_id)
    return done.result


@pytest.mark.parametrize("why", ["rate", "paused"])
def test_a_run_put_off_whose_retry_is_lost_is_enqueued_again_by_the_reconciler(
    client: redis.Redis, why: str
) -> None:
    """A run the guard puts off has reserved nothing, and its retry is only a broker message:
    a worker that loses its broker connection, or is killed, drops the countdown retries it
    holds. The reconciler must still bring the message back, as it does a message waiting for a
    status-11 retry; it used to find nothing (the ledger did not know the message), so every
    message put off at a broker drop (all of them during Polyv's 5-minute block) waited for the
    broker's visibility timeout, an hour."""
    now = [1_800_000_000.0]
    ledger = _clocked_ledger(client, now)
    secret = "s" * 16
    number = "13700000931"
    with PolyvSimulator(ledger.app_id, secret) as sim:
        guard = RateGuard(ledger, 10, max_wait_s=0.01)
        polyv = PolyvClient(ledger.app_id, secret, sim.url, timeout=2.0)
        dispatcher = _dispatcher(ledger, polyv, guard)
        if why == "rate":
            guard.try_acquire()
            guard.try_acquire()  # the burst is used up: the next slot is 100 ms off
        else:
            guard.pause(60)
        put_off = dispatcher.run(_request(number), message_id="m-lost", task_id="t-lost")
        assert (put_off.result, put_off.reason) == (None, why)
        # Still nothing reserved: no number record, no unit, no lease.
        assert ledger.peek("m-lost", [number]) == {}
        assert client.hget(Keys(ledger.app_id).quota(ledger.day()), "_total") is None
        assert ledger.lease_holder("m-lost") is None

        # Its retry never runs. The pause ends (or the slot comes); the reconciler steps in.
        guard.clear()
        client.delete(guard.rate_key)
        result = _revive_and_finish(ledger, dispatcher, now, 60 if why == "paused" else 1, "m-lost")
        assert result["results"][0]["outcome"] == "accepted"  # type: ignore[index]
        assert result["results"][0]["attempts"] == 1  # type: ignore[index]
        assert sim.received(number) == 1
        polyv.close()


def test_a_later_chunk_put_off_whose_retry_is_lost_is_enqueued_again(client: redis.Redis) -> None:
    """The first 200 numbers went out and all were accepted (the message left the pending
    set); the guard put the next chunk off. Its numbers were never reserved, so nothing but
    the lost retry knew they were still to be sent."""
    now = [1_800_000_000.0]
    ledger = _clocked_ledger(client, now)
    secret = "s" * 16
    numbers = [f"1370001{i:04d}" for i in range(250)]
    with PolyvSimulator(ledger.app_id, secret) as sim:
        guard = RateGuard(ledger, 10, max_wait_s=0.01)
        polyv = PolyvClient(ledger.app_id, secret, sim.url, timeout=2.0)
        dispatcher = _dispatcher(ledger, polyv, guard)
        guard.try_acquire()  # one slot of the burst left: the first chunk's
        request = validate_request((), {
            "phone_numbers": numbers,
            "template_param_names": ["code"],
            "template_param_values": ["1"],
        }, account_daily_limit=2000)  # fmt: skip
        put_off = dispatcher.run(request, message_id="m-chunks", task_id="t-lost")
        assert (put_off.result, put_off.reason) == (None, "rate")
        assert len(sim.requests()) == 1
        assert len(ledger.peek("m-chunks", numbers)) == 200

        client.delete(guard.rate_key)
        result = _revive_and_finish(ledger, dispatcher, now, 1, "m-chunks")
        assert result["counts"]["accepted"] == 250  # type: ignore[index]
        assert len(sim.requests()) == 2
        assert all(sim.received(n) == 1 for n in numbers)
        polyv.close()
