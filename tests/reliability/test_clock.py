"""Scenario 8 - clocks: a worker whose clock is off by two minutes still signs requests Polyv
accepts, because the timestamp is taken for each request; and "a day" starts exactly at local
midnight in ``SMS_TIMEZONE``.

Both run the worker's own objects (``build_runtime``: the ledger on a real redis-server, the
Polyv client, the dispatcher) against the simulator over HTTP, with injected clocks: nothing
sleeps, and no test waits for a real midnight.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from polyv_sms.config import Secret, Settings
from polyv_sms.polyv.simulator import PolyvSimulator
from polyv_sms.runtime import Runtime, build_runtime
from polyv_sms.validation import validate_request

from .tools import TAG, phone, seen_by_message

WINDOW_S = 180  # Polyv's timestamp window


def next_day_of_length(zone: str, hours: int | None) -> date:
    """The next local day (from tomorrow on) that is ``hours`` long (``None``: any length).

    Dates come from the real calendar because Redis expires a day's counts against its own
    clock (``EXPIREAT`` end of the day + 1 day): a day in the past would vanish at once.
    """
    tz = ZoneInfo(zone)
    day = datetime.now(tz).date()
    for _ in range(400):
        day += timedelta(days=1)
        start = datetime(day.year, day.month, day.day, tzinfo=tz)
        end = datetime.combine(day + timedelta(days=1), datetime.min.time(), tzinfo=tz)
        if hours is None or end.timestamp() - start.timestamp() == hours * 3600:
            return day
    raise AssertionError(f"no {hours}-hour day in {zone} within 400 days")


class Clock:
    """A clock that can be moved: ``start`` plus however far it was moved (no real time)."""

    def __init__(self, start: float) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def runtimes(redis_server) -> Iterator:
    """``make(account, simulator, clock, **settings)``: a worker runtime; closed after the test."""
    made: list[Runtime] = []

    def make(account, simulator: PolyvSimulator, clock, **options) -> Runtime:
        settings = Settings(
            app_id=account[0],
            app_secret=Secret(account[1]),
            api_base=simulator.url,
            http_timeout_s=2,
            redis_url=redis_server.url(2),
            **options,
        )
        made.append(build_runtime(settings, clock=clock))
        return made[-1]

    yield make
    for runtime in made:
        runtime.close()


def send(runtime: Runtime, numbers: list[str], tag: str):
    request = validate_request(
        (),
        {"phone_numbers": numbers, "template_param_names": [TAG], "template_param_values": [tag]},
        account_daily_limit=runtime.settings.account_daily_limit,
    )
    return runtime.dispatcher.run(request, message_id=tag, task_id=f"task-{tag}")


@pytest.mark.parametrize("skew_s", [120, -120])
def test_a_skewed_worker_clock_signs_fresh_valid_requests(
    sim, account, runtimes, skew_s: int
) -> None:
    polyv_time = Clock(time.time())
    sim.set_clock(polyv_time)
    worker = runtimes(account, sim, lambda: polyv_time() + skew_s)
    flaky, steady = phone(800), phone(801)
    sim.set_faults(fail_numbers={flaky: 1})

    first = send(worker, [flaky, steady], "skew")
    assert first.result is None  # status 11 for one number: a retry is due
    polyv_time.now += 600  # the retry runs ten minutes later
    second = send(worker, [flaky, steady], "skew")

    assert second.result is not None
    assert [e["outcome"] for e in second.result["results"]] == ["accepted", "accepted"]
    records = sim.requests()
    assert [r["http_status"] for r in records] == [200, 200]
    # Each request carries the worker's time at that request: off by the skew, inside Polyv's
    # window, and the retry's ten minutes later (never the first request's, nor enqueue time).
    stamps = [int(r["timestamp"]) / 1000 for r in records]
    for stamp, record in zip(stamps, records, strict=True):
        assert stamp - record["received_at"] == pytest.approx(skew_s, abs=0.01)
    assert stamps[1] - stamps[0] == pytest.approx(600, abs=0.01)
    assert seen_by_message(sim)[("skew", flaky)].statuses == [11, 12]


def test_a_clock_off_by_more_than_polyvs_window_is_refused(sim, account, runtimes) -> None:
    """The control: the simulator does check the window, so the test above means something."""
    polyv_time = Clock(time.time())
    sim.set_clock(polyv_time)
    worker = runtimes(account, sim, lambda: polyv_time() + WINDOW_S + 60)
    outcome = send(worker, [phone(802)], "late")
    assert outcome.result is not None
    [entry] = outcome.result["results"]
    assert entry["outcome"] == "failed"
    assert "timestamp expired" in entry["error"]


@pytest.mark.parametrize(
    ("zone", "hours"),
    [
        ("Asia/Shanghai", None),
        # The day daylight saving time starts: 23 hours long, and midnight still ends it.
        ("America/New_York", 23),
    ],
)
def test_the_day_resets_exactly_at_local_midnight(
    account, runtimes, zone: str, hours: int | None
) -> None:
    tz = ZoneInfo(zone)
    day = next_day_of_length(zone, hours)
    midnight = datetime.combine(day + timedelta(days=1), datetime.min.time(), tzinfo=tz)
    clock = Clock(midnight.timestamp() - 1.0)  # 23:59:59.000 local
    with PolyvSimulator(
        account[0],
        account[1],
        phone_daily_limit=2,
        account_daily_limit=3,
        timezone=zone,
        clock=clock,
    ) as simulator:
        worker = runtimes(
            account, simulator, clock, phone_daily_limit=2, account_daily_limit=3, timezone=zone
        )
        a, b, c = phone(810), phone(811), phone(812)

        def outcome(number: str) -> tuple[str, int | None]:
            result = send(worker, [number], uuid.uuid4().hex).result
            assert result is not None
            return result["results"][0]["outcome"], result["results"][0]["status"]

        # Day D, the last second: A reaches its limit, then the account reaches its limit.
        assert [outcome(a), outcome(a), outcome(b)] == [("accepted", 12)] * 3
        clock.now = midnight.timestamp() - 0.001  # 23:59:59.999
        assert outcome(a) == ("quota_exceeded", None)  # refused by us; Polyv was not asked
        assert outcome(c) == ("account_quota_exceeded", None)
        received = len(simulator.requests())
        # Exactly midnight: a new day, fresh counts for the number and for the account.
        clock.now = midnight.timestamp()
        assert [outcome(a), outcome(c)] == [("accepted", 12)] * 2
        assert len(simulator.requests()) == received + 2
        # The counts live under their own day.
        ledger = worker.ledger
        before, after = ledger.day(midnight.timestamp() - 0.001), ledger.day(midnight.timestamp())
        assert before == day.strftime("%Y%m%d")
        assert (datetime.strptime(after, "%Y%m%d") - datetime.strptime(before, "%Y%m%d")).days == 1
        quota = ledger.redis
        assert quota.hgetall(ledger.keys.quota(before)) == {a: "2", b: "1", "_total": "3"}
        assert quota.hgetall(ledger.keys.quota(after)) == {a: "1", c: "1", "_total": "2"}
