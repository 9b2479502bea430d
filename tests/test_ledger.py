"""The ledger's Lua scripts: on a real redis-server and, for speed, on fakeredis (with lupa).

Each test runs on both backends; the real one is the session's private redis-server.
"""

from __future__ import annotations

import json
import time
import uuid
import zipfile
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import fakeredis
import pytest
import redis
from redis.crc import key_slot

from polyv_sms.ledger import Ledger, Settlement, load_script
from polyv_sms.ledger.receipts import Receipts

TZ = ZoneInfo("Asia/Shanghai")


class Clock:
    def __init__(self, now: float | None = None) -> None:
        self.now = time.time() if now is None else now

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["redis-server", "fakeredis"])
def client(request: pytest.FixtureRequest, redis_server) -> Iterator[redis.Redis]:
    if request.param == "fakeredis":
        yield fakeredis.FakeRedis(decode_responses=True)
    else:
        real = redis.Redis.from_url(redis_server.url(2), decode_responses=True)
        yield real
        real.close()


@pytest.fixture
def clock() -> Clock:
    return Clock()


def make_ledger(client: redis.Redis, clock: Clock, **overrides: object) -> Ledger:
    options: dict[str, object] = {
        "phone_daily_limit": 3,
        "account_daily_limit": 5,
        "max_attempts": 3,
        "receipt_ttl_days": 30,
        "timezone": "Asia/Shanghai",
        "lease_s": 30.0,
        "reconcile_grace_s": 60.0,
        "outage_s": 1.0,
    }
    options.update(overrides)
    return Ledger(client, f"app{uuid.uuid4().hex[:8]}", clock=clock, **options)  # type: ignore[arg-type]


@pytest.fixture
def ledger(client: redis.Redis, clock: Clock) -> Ledger:
    return make_ledger(client, clock)


def counts(ledger: Ledger, day: str | None = None) -> dict[str, int]:
    raw = ledger.redis.hgetall(ledger.keys.quota(day or ledger.day()))
    return {k: int(v) for k, v in raw.items()}


def days_of(reservation) -> dict[str, str]:
    return {s.number: s.day for s in reservation.states}


A, B, C, D, E, F = (f"1380000000{i}" for i in range(1, 7))


def test_reserve_takes_one_unit_per_new_number(ledger: Ledger) -> None:
    r = ledger.reserve("m1", [A, B], token="t")
    assert [(s.number, s.state, s.attempts) for s in r.states] == [(A, "send", 1), (B, "send", 1)]
    assert r.pending == 2
    assert counts(ledger) == {A: 1, B: 1, "_total": 2}


def test_reserved_number_keeps_its_reservation_and_counts_the_attempt(ledger: Ledger) -> None:
    first = ledger.reserve("m1", [A], token="t")
    ledger.settle(
        "m1",
        [Settlement(A, "retry", 11, error="11")],
        days=days_of(first),
        token="t",
        retry_at=ledger.clock(),
    )
    again = ledger.reserve("m1", [A], token="t2")
    assert again.states[0].state == "send"
    assert again.states[0].attempts == 2
    assert counts(ledger) == {A: 1, "_total": 1}


def test_final_numbers_are_skipped(ledger: Ledger) -> None:
    r = ledger.reserve("m1", [A], token="t")
    ledger.settle(
        "m1", [Settlement(A, "accepted", 12, "s-1^0")], days=days_of(r), token="t", retry_at=0
    )
    again = ledger.reserve("m1", [A], token="t2")
    assert again.states[0].state == "accepted"
    assert again.states[0].serial_no == "s-1^0"
    assert counts(ledger) == {A: 1, "_total": 1}


def test_phone_limit_then_account_limit(ledger: Ledger) -> None:
    for i in range(3):
        ledger.reserve(f"p{i}", [A], token="t")
    r = ledger.reserve("m", [A, B, C, D], token="t")
    assert [s.state for s in r.states] == [
        "quota_exceeded",
        "send",
        "send",
        "account_quota_exceeded",
    ]
    assert "daily limit of 3" in (r.states[0].error or "")
    assert "daily limit of 5" in (r.states[3].error or "")
    assert counts(ledger)["_total"] == 5
    # A refused number is final for the message: asking again does not take a unit.
    assert ledger.reserve("m", [D], token="t").states[0].state == "account_quota_exceeded"


def test_invalid_numbers_are_recorded_without_quota(ledger: Ledger) -> None:
    r = ledger.reserve("m", [A], [("12ab", "contains characters other than digits")], token="t")
    assert [(s.number, s.state) for s in r.states] == [(A, "send"), ("12ab", "invalid")]
    assert counts(ledger) == {A: 1, "_total": 1}


def test_accepted_writes_receipt_and_phone_index(ledger: Ledger) -> None:
    r = ledger.reserve("m", [A], token="t")
    pending, states = ledger.settle(
        "m",
        [Settlement(A, "accepted", 12, "605320356903663783^0")],
        days=days_of(r),
        token="t",
        retry_at=0,
    )
    assert pending == 0
    assert states[0].state == "accepted"
    today = ledger.day()
    receipts = ledger.keys.receipts(today)
    number, message_id, accepted_at, attempt, day = ledger.redis.hget(
        receipts, "605320356903663783^0"
    ).split("|")
    assert (number, message_id, attempt, day) == (A, "m", "1", r.states[0].day)
    assert abs(int(accepted_at) / 1000 - time.time()) < 60
    assert json.loads(ledger.redis.hget(ledger.keys.phones(today), A)) == ["605320356903663783^0"]
    # kept until the end of the acceptance day plus SMS_RECEIPT_TTL_DAYS (30 here)
    for key in (receipts, ledger.keys.phones(today)):
        assert 30 * 86400 < ledger.redis.ttl(key) <= 31 * 86400
    assert ledger.redis.zscore(ledger.keys.pending, "m") is None


@pytest.mark.parametrize("action", ["invalid", "fail"])
def test_refunds(ledger: Ledger, action: str) -> None:
    r = ledger.reserve("m", [A, B], token="t")
    ledger.settle(
        "m",
        [Settlement(A, action, -2 if action == "invalid" else None)],
        days=days_of(r),
        token="t",
        retry_at=0,
    )
    assert counts(ledger) == {A: 0, B: 1, "_total": 1}


def test_polyv_minus_one_refunds_and_raises_counter_to_limit(ledger: Ledger) -> None:
    r = ledger.reserve("m", [A, B], token="t")
    ledger.settle(
        "m",
        [Settlement(A, "quota", -1, error="Polyv: limit")],
        days=days_of(r),
        token="t",
        retry_at=0,
    )
    assert counts(ledger) == {A: 3, B: 1, "_total": 1}
    assert ledger.reserve("m2", [A], token="t").states[0].state == "quota_exceeded"


def test_status_11_until_attempts_run_out_then_failed_refunded_dead(ledger: Ledger) -> None:
    days = {}
    for attempt in (1, 2, 3):
        r = ledger.reserve("m", [A], token=f"t{attempt}")
        assert r.states[0].attempts == attempt
        days = days_of(r)
        pending, states = ledger.settle(
            "m",
            [Settlement(A, "retry", 11, error="status 11")],
            days=days,
            token=f"t{attempt}",
            retry_at=ledger.clock(),
        )
    assert states[0].state == "failed"
    assert "gave up after 3 attempts" in (states[0].error or "")
    assert pending == 0
    assert counts(ledger) == {A: 0, "_total": 0}
    assert ledger.redis.zscore(ledger.keys.dead, "m") is not None
    assert ledger.reserve("m", [A], token="t9").states[0].state == "failed"


def test_ambiguous_failures_keep_the_unit(ledger: Ledger) -> None:
    ledger = make_ledger(ledger.redis, Clock(), max_attempts=1)
    r = ledger.reserve("m", [A, B], token="t")
    _, states = ledger.settle(
        "m",
        [Settlement(A, "retry_keep", error="timeout"), Settlement(B, "fail_keep", 99)],
        days=days_of(r),
        token="t",
        retry_at=0,
    )
    assert [s.state for s in states] == ["failed", "failed"]
    assert counts(ledger) == {A: 1, B: 1, "_total": 2}


def test_settle_twice_changes_nothing(ledger: Ledger) -> None:
    r = ledger.reserve("m", [A], token="t")
    for _ in range(2):
        ledger.settle("m", [Settlement(A, "invalid", -2)], days=days_of(r), token="t", retry_at=0)
    assert counts(ledger) == {A: 0, "_total": 0}


def test_counters_never_go_negative(ledger: Ledger) -> None:
    r = ledger.reserve("m", [A], token="t")
    ledger.redis.hset(ledger.keys.quota(ledger.day()), mapping={A: 0, "_total": 0})
    ledger.settle("m", [Settlement(A, "fail")], days=days_of(r), token="t", retry_at=0)
    assert counts(ledger) == {A: 0, "_total": 0}


def test_refund_goes_to_the_day_the_unit_was_taken_from(client: redis.Redis) -> None:
    now = datetime.now(TZ)
    midnight = datetime(now.year, now.month, now.day, tzinfo=TZ) + timedelta(days=1)
    clock = Clock(midnight.timestamp() - 1)
    ledger = make_ledger(client, clock)
    before = ledger.reserve("m", [A, B], token="t")
    yesterday = ledger.day()
    clock.now = midnight.timestamp() + 1
    today = ledger.day()
    assert today != yesterday
    fresh = ledger.reserve("m2", [C], token="t")  # taken from the new day
    ledger.settle(
        "m",
        [Settlement(A, "fail"), Settlement(B, "retry", 11, error="11")],
        days=days_of(before),
        token="t",
        retry_at=clock.now,
    )
    assert counts(ledger, yesterday) == {A: 0, B: 1, "_total": 1}
    assert counts(ledger, today) == {C: 1, "_total": 1}
    # B keeps its reservation from yesterday: the retry takes no unit from today.
    again = ledger.reserve("m", [B], token="t3")
    assert again.states[0].day == yesterday
    assert counts(ledger, today) == {C: 1, "_total": 1}
    assert fresh.states[0].day == today
    # The day's counters expire at the end of that day plus one day of grace.
    expire_at = (midnight + timedelta(days=1)).timestamp()
    assert abs(client.ttl(ledger.keys.quota(yesterday)) - (expire_at - time.time())) <= 2


def test_lease_keeps_a_second_run_out_until_it_expires(ledger: Ledger, clock: Clock) -> None:
    ledger.reserve("m", [A], token="first")
    busy = ledger.reserve("m", [A], token="second")
    assert busy.busy_for_s == pytest.approx(30.0, abs=0.01)
    assert busy.states == ()
    clock.now += 31
    # Expired: its holder still gets the takeover grace, counted from this first sighting
    # (it may have Polyv's answer in its journal, waiting for the ledger).
    graced = ledger.reserve("m", [A], token="second")
    assert graced.busy_for_s == pytest.approx(ledger.takeover_grace_s, abs=0.01)
    clock.now += ledger.takeover_grace_s - 1
    assert ledger.reserve("m", [A], token="second").busy_for_s == pytest.approx(1.0, abs=0.01)
    clock.now += 1
    taken = ledger.reserve("m", [A], token="second")
    assert taken.busy_for_s is None
    assert taken.states[0].attempts == 2
    assert counts(ledger) == {A: 1, "_total": 1}


def test_settle_releases_the_lease(ledger: Ledger) -> None:
    r = ledger.reserve("m", [A], token="first")
    ledger.settle(
        "m", [Settlement(A, "retry", 11, error="11")], days=days_of(r), token="first", retry_at=0
    )
    assert ledger.reserve("m", [A], token="second").busy_for_s is None


def test_pending_set_tracks_messages_waiting_for_a_retry(ledger: Ledger, clock: Clock) -> None:
    r = ledger.reserve("m", [A, B], token="t")
    assert ledger.redis.zscore(ledger.keys.pending, "m") == pytest.approx(
        (clock.now + 30 + 60) * 1000, abs=2
    )
    ledger.settle(
        "m",
        [Settlement(A, "accepted", 12, "x^0"), Settlement(B, "retry", 11, error="e")],
        days=days_of(r),
        token="t",
        retry_at=clock.now + 5,
    )
    assert ledger.redis.zscore(ledger.keys.pending, "m") == pytest.approx(
        (clock.now + 5 + 60) * 1000, abs=2
    )
    r = ledger.reserve("m", [B], token="t")
    ledger.settle(
        "m", [Settlement(B, "accepted", 12, "y^0")], days=days_of(r), token="t", retry_at=0
    )
    assert ledger.redis.zscore(ledger.keys.pending, "m") is None


def test_requeue_forgets_failed_numbers_only(ledger: Ledger) -> None:
    r = ledger.reserve("m", [A, B], token="t")
    ledger.settle(
        "m",
        [Settlement(A, "accepted", 12, "a^0"), Settlement(B, "fail")],
        days=days_of(r),
        token="t",
        retry_at=0,
    )
    assert ledger.requeue("m") == [B]
    assert ledger.redis.zscore(ledger.keys.dead, "m") is None
    again = ledger.reserve("m", [A, B], token="t2")
    assert [(s.number, s.state) for s in again.states] == [(A, "accepted"), (B, "send")]


def test_every_key_of_an_account_is_in_one_cluster_slot(ledger: Ledger) -> None:
    keys = ledger.keys
    names = [
        keys.quota("20261128"),
        keys.message("m"),
        keys.receipts("20261128"),
        keys.phones("20261128"),
        keys.dead,
        keys.pending,
        keys.reconcile_lock,
    ]
    assert len({key_slot(name.encode()) for name in names}) == 1


def test_scripts_document_keys_and_argv() -> None:
    for name in ("reserve", "settle", "requeue"):
        source = load_script(name)
        assert "KEYS[1]" in source
        assert "ARGV[1]" in source


@pytest.mark.slow
def test_lua_scripts_ship_in_the_wheel(tmp_path: Path) -> None:
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(root),
        ],
        check=True,
    )
    wheel = next(tmp_path.glob("polyv_sms-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for script in ("reserve", "settle", "requeue", "_record", "_gcra", "ratelimit"):
        assert f"polyv_sms/ledger/lua/{script}.lua" in names
    assert "polyv_sms/py.typed" in names


def test_rate_limited_attempts_are_given_back(ledger: Ledger) -> None:
    r = ledger.reserve("m", [A], token="t")
    assert r.states[0].attempts == 1
    _, states = ledger.settle(
        "m", [Settlement(A, "rate_limited", error="qps")], days=days_of(r), token="t", retry_at=0
    )
    assert (states[0].state, states[0].attempts) == ("reserved", 0)
    assert ledger.reserve("m", [A], token="t2").states[0].attempts == 1
    assert counts(ledger) == {A: 1, "_total": 1}


def test_another_runs_live_lease_protects_its_numbers_from_non_final_settles(
    ledger: Ledger, clock: Clock
) -> None:
    r = ledger.reserve("m", [A, B], token="sender")  # "sender" is sending A and B right now
    _, states = ledger.settle(
        "m",
        [Settlement(A, "fail", error="abort"), Settlement(B, "retry", 11, error="11")],
        days=days_of(r),
        token="other",
        retry_at=0,
    )
    assert [s.state for s in states] == ["reserved", "reserved"]
    assert counts(ledger) == {A: 1, B: 1, "_total": 2}
    # Polyv's final answers are facts and apply whoever reports them.
    _, states = ledger.settle(
        "m", [Settlement(A, "accepted", 12, "a^0")], days=days_of(r), token="other", retry_at=0
    )
    assert states[0].state == "accepted"
    # Once the sender's lease has expired, the other run may end B.
    clock.now += 31
    _, states = ledger.settle(
        "m", [Settlement(B, "fail", error="abort")], days=days_of(r), token="other", retry_at=0
    )
    assert states[0].state == "failed"
    assert counts(ledger) == {A: 1, B: 0, "_total": 1}


def test_a_full_redis_is_ridden_out_like_an_outage(tmp_path: Path) -> None:
    import threading

    from helpers import RedisServer

    server = RedisServer(tmp_path / "full").start()
    try:
        client = server.client()
        ledger = make_ledger(client, Clock(), outage_s=10.0)
        client.config_set("maxmemory", 1)  # every write is refused (noeviction): OOM
        threading.Timer(0.5, lambda: server.client().config_set("maxmemory", 0)).start()
        started = time.monotonic()
        r = ledger.reserve("m", [A], token="t")
        assert time.monotonic() - started >= 0.4
        assert r.states[0].state == "send"
        assert counts(ledger) == {A: 1, "_total": 1}
        client.close()
    finally:
        server.stop()


def accept(ledger: Ledger, message_id: str, number: str, serial: str) -> None:
    r = ledger.reserve(message_id, [number], token=message_id)
    ledger.settle(
        message_id,
        [Settlement(number, "accepted", 12, serial)],
        days=days_of(r),
        token=message_id,
        retry_at=0,
    )


def test_receipts_are_looked_up_across_the_retained_days(ledger: Ledger, clock: Clock) -> None:
    receipts = Receipts(ledger)
    today = clock.now
    clock.now = today - 2 * 86400
    accept(ledger, "m-old", A, "old^0")
    clock.now = today
    accept(ledger, "m-new", A, "new^0")
    accept(ledger, "m-other", B, "other^0")

    found = receipts.phone(A)
    assert [(r["serial_no"], r["message_id"]) for r in found["receipts"]] == [
        ("new^0", "m-new"),
        ("old^0", "m-old"),
    ]
    assert found["receipts"][1]["day"] == ledger.day(today - 2 * 86400)
    assert [r["serial_no"] for r in receipts.phone(A, limit=1)["receipts"]] == ["new^0"]
    assert receipts.receipt("old^0")["phone_number"] == A  # type: ignore[index]
    assert receipts.receipt("nope^0") is None

    # Thirty days on, the older day is past SMS_RECEIPT_TTL_DAYS: no longer answered.
    clock.now = today + 30 * 86400
    assert receipts.receipt("old^0") is None
    assert receipts.receipt("new^0")["message_id"] == "m-new"  # type: ignore[index]
    assert [r["serial_no"] for r in receipts.phone(A)["receipts"]] == ["new^0"]


def test_one_settle_writes_the_receipts_and_phone_index_of_200_numbers(
    ledger: Ledger, clock: Clock
) -> None:
    numbers = [f"1390000{i:04d}" for i in range(200)]
    r = make_ledger(ledger.redis, clock, phone_daily_limit=10, account_daily_limit=1000)
    reservation = r.reserve("m", numbers, token="t")
    pending, states = r.settle(
        "m",
        [Settlement(n, "accepted", 12, f"{i}^0") for i, n in enumerate(numbers)],
        days=days_of(reservation),
        token="t",
        retry_at=0,
    )
    assert pending == 0
    assert all(s.state == "accepted" for s in states)
    today = r.day()
    assert r.redis.hlen(r.keys.receipts(today)) == 200
    assert r.redis.hlen(r.keys.phones(today)) == 200
    assert Receipts(r).receipt("199^0")["phone_number"] == numbers[199]  # type: ignore[index]


def test_settling_an_acceptance_again_does_not_repeat_it_in_the_phone_index(
    ledger: Ledger,
) -> None:
    accept(ledger, "m", A, "s1^0")
    ledger.redis.delete(ledger.keys.message("m"))  # the record is gone (expired, say)
    ledger.settle("m", [Settlement(A, "accepted", 12, "s1^0")], days={}, token="m", retry_at=0)
    assert json.loads(ledger.redis.hget(ledger.keys.phones(ledger.day()), A)) == ["s1^0"]
    assert [r["serial_no"] for r in Receipts(ledger).phone(A)["receipts"]] == ["s1^0"]
