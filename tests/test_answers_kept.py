"""Issue 10 — an answer read from Polyv is never lost, no number is in flight twice, one message
id is one content. The failure paths, driven end to end through the dispatcher on the session's
real redis-server (or a private one that is killed) and over real HTTP (the simulator, or a
canned server for answers the simulator does not give). Time is injected: the "slow answer"
advances the shared clock while the request is in flight.

The same paths with real worker processes are in ``tests/reliability/test_answers_kept.py``.
"""

from __future__ import annotations

import json
import os
import tempfile
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from helpers import CannedServer, RedisServer, record_accepted
from reliability.tools import ReplyDroppingProxy
from test_dispatch import TZ, Clock, make, quota, request, run_until_done

from polyv_sms.cli.run import requeue_kwargs
from polyv_sms.dispatch import Dispatcher
from polyv_sms.errors import LedgerUnavailable
from polyv_sms.ledger import Ledger, Settlement, stored_requests
from polyv_sms.ledger.receipts import Receipts
from polyv_sms.ledger.reconcile import Reconciler
from polyv_sms.polyv.client import PolyvClient
from polyv_sms.polyv.simulator import PolyvSimulator
from polyv_sms.validation import validate_request

N1, N2 = "13900001001", "13900001002"


def Journal(directory: Path, app_id: str) -> Any:
    """The journal (imported here: the module is new, and the other tests run without it)."""
    from polyv_sms.ledger.journal import Journal as JournalClass

    return JournalClass(directory, app_id)


def on_disk(directory: Path) -> list[Any]:
    """The open entries in the journal's files, whoever holds them."""
    from polyv_sms.ledger.journal import on_disk as read

    return read(directory)


def fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record the paths this process fsyncs, and the journal pages it flushes to disk
    (``msync``: ``"<segment file>@<offset>+<size>"``), from now on."""
    from polyv_sms.ledger import journal as journal_module

    synced: list[str] = []
    real = os.fsync
    real_msync = journal_module._msync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    def msync(segment: Any, offset: int, size: int) -> None:
        synced.append(f"{segment.path}@{offset}+{size}")
        real_msync(segment, offset, size)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(journal_module, "_msync", msync)
    return synced


def flushed(entry: Any) -> str:
    """How :func:`fsyncs` records the flush of a journal entry's pages."""
    offset, size = entry.pages()
    return f"{entry.segment}@{offset}+{size}"


def died(journal: Any) -> None:
    """The process holding ``journal`` dies: its files stay, its locks go (another journal
    on the same directory - another worker process - takes them over)."""
    journal.close()


def hook_after_send(dispatcher: Dispatcher, after) -> None:
    """Run ``after()`` once Polyv answered (or failed), before the dispatcher sees it."""
    real_send = dispatcher.client.send

    def send(*args: Any) -> Any:
        try:
            return real_send(*args)
        finally:
            after()

    dispatcher.client.send = send  # type: ignore[method-assign]


def outcome_of(result: dict[str, Any], number: str) -> dict[str, Any]:
    return next(r for r in result["results"] if r["phone_number"] == number)


# --------------------------------------------------------------------------- item 1


def test_an_answer_read_after_the_lease_was_lost_is_kept_and_nobody_sent_it_meanwhile(
    client, account, clock
) -> None:
    """SMS_MAX_ATTEMPTS=1; the answer (12) takes longer than the lease. Another run tries
    meanwhile: it must wait out the takeover grace, and once it gave the number up (no attempt
    left) the late 12 still makes it accepted, with its receipt and its unit."""
    with PolyvSimulator(*account, clock=clock) as sim:
        first = make(client, account, sim.url, clock, max_attempts=1)
        second = make(client, account, sim.url, clock, max_attempts=1)
        req = request([N1], "slow")
        seen: list[Any] = []

        def meanwhile() -> None:
            clock.now += first.ledger.lease_s + 1  # the lease ran out while Polyv answered
            seen.append(second.run(req, message_id="slow", task_id="t2"))
            clock.now += getattr(first.ledger, "takeover_grace_s", 0) + 1
            seen.append(second.run(req, message_id="slow", task_id="t2"))

        hook_after_send(first, meanwhile)
        result = first.run(req, message_id="slow", task_id="t1").result
        assert sim.received(N1) == 1
        serial = sim.requests()[0]["results"][0]["serialNo"]
    # The other run saw the expired lease and waited (takeover grace) ...
    assert seen[0].result is None
    assert seen[0].reason == "busy"
    # ... then found no attempt left and gave the number up, never sending it.
    assert outcome_of(seen[1].result, N1)["outcome"] == "failed"
    # The late 12 is recorded all the same: accepted, receipt, the unit counted once.
    assert result is not None
    assert outcome_of(result, N1) | {"attempts": 1} == outcome_of(result, N1)
    assert (outcome_of(result, N1)["outcome"], outcome_of(result, N1)["serial_no"]) == (
        "accepted",
        serial,
    )
    ledger = first.ledger
    assert ledger.peek("slow", [N1])[N1].state == "accepted"
    assert Receipts(ledger).receipt(serial)["phone_number"] == N1
    assert quota(ledger, ledger.day()) == {N1: 1, "_total": 1}
    assert client.zscore(ledger.keys.dead, "slow") is None


def test_a_second_status_12_for_a_number_keeps_its_receipt_too(client, account, clock) -> None:
    """Sent twice (at-least-once, a run whose lease was lost): every receipt read is stored."""
    with PolyvSimulator(*account, clock=clock) as sim:
        d = make(client, account, sim.url, clock)
        reserved = d.ledger.reserve("twice", [N1], token="a")
        days = {N1: reserved.states[0].day}
        d.ledger.settle(
            "twice",
            [Settlement(N1, "accepted", 12, "s-1^0", attempt=1)],
            days=days,
            token="a",
            retry_at=0,
        )
        d.ledger.settle(
            "twice",
            [Settlement(N1, "accepted", 12, "s-2^0", attempt=1)],
            days=days,
            token="b",
            retry_at=0,
        )
        receipts = Receipts(d.ledger)
        assert receipts.receipt("s-1^0")["phone_number"] == N1
        assert receipts.receipt("s-2^0")["phone_number"] == N1
        assert d.ledger.peek("twice", [N1])[N1].serial_no == "s-1^0"


# --------------------------------------------------------------------------- item 2 (journal)


def test_an_answer_outlasting_the_ledger_outage_is_journaled_and_never_sent_again(
    account, clock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ledger's Redis dies while the request is in flight and stays down past
    SMS_REDIS_OUTAGE; meanwhile the lease and its grace run out. The answer waits in the
    journal; the next run of the message replays it before reserving: nothing is sent again."""
    server = RedisServer(Path(tempfile.mkdtemp(prefix="polyv-sms-journal-")), appendonly=True)
    server.start()
    try:
        ledger_client = redis.Redis.from_url(server.url(0), decode_responses=True)
        journal = Journal(tmp_path / "journal", account[0])
        with PolyvSimulator(*account, clock=clock) as sim:
            d = make(ledger_client, account, sim.url, clock, journal=journal)
            d.ledger.outage_s = 0.3
            hook_after_send(d, lambda: server.stop(kill=True))
            synced = fsyncs(monkeypatch)
            with pytest.raises(LedgerUnavailable):
                d.run(request([N1], "j1"), message_id="j1", task_id="t1")
            (entry,) = journal.entries("j1")
            # The process's first entry created its segment file (fsync'd with its
            # directory); made durable once the ledger was found down: the entry's pages.
            (segment,) = journal.segments()
            assert str(journal.directory) in synced
            assert [s for s in synced if "@" in s] == [flushed(entry)]
            assert entry.segment == segment
            serial = sim.requests()[0]["results"][0]["serialNo"]
            server.start()
            clock.now += d.ledger.lease_s + d.ledger.takeover_grace_s + 60
            # A worker started afresh on this host (same journal directory).
            again = make(ledger_client, account, sim.url, clock, journal=journal)
            result = run_until_done(again, request([N1], "j1"), "j1", clock)
            assert sim.received(N1) == 1
            synced.clear()
            run_until_done(again, request([N2], "j1b"), "j1b", clock)
            assert synced == []  # the happy path neither fsyncs nor flushes
        assert outcome_of(result, N1)["outcome"] == "accepted"
        assert outcome_of(result, N1)["serial_no"] == serial
        assert journal.entries() == []
        assert on_disk(journal.directory) == []
        assert Receipts(again.ledger).receipt(serial)["message_id"] == "j1"
        ledger_client.close()
    finally:
        server.stop(kill=True)


def test_the_reconciler_replays_the_journal_before_it_judges_a_message_overdue(
    client, account, clock, tmp_path: Path
) -> None:
    journal = Journal(tmp_path / "journal", account[0])
    dead = Journal(tmp_path / "journal", account[0])
    with PolyvSimulator(*account, clock=clock) as sim:
        d = make(client, account, sim.url, clock, journal=journal)
        meta = {
            "task_id": "t",
            "phone_numbers": [N1],
            "template_param_names": ["code"],
            "template_param_values": ["1"],
            "created_at": 0,
        }
        # A worker read Polyv's 12 and died before the settle: only the journal has it.
        record_accepted(dead, d.ledger, "j2", N1, "s-j2^0", token="dead", now=clock.now, meta=meta)
        died(dead)
        enqueued: list[Any] = []
        clock.now += 3600
        assert (
            Reconciler(
                d.ledger, lambda *a: enqueued.append(a), interval_s=5, journal=journal
            ).sweep()
            == []
        )
    assert enqueued == []
    assert d.ledger.peek("j2", [N1])[N1].state == "accepted"
    assert journal.entries() == []
    assert on_disk(journal.directory) == []
    assert list(journal.directory.iterdir()) == []  # the dead worker's file removed


# --------------------------------------------------------------------------- item 4 / item 5


LONG = "13800138000" + " " * 60 + "ext 12"


def test_the_stored_request_is_the_input_byte_for_byte_and_a_requeue_sends_nothing_new(
    client, account, clock
) -> None:
    numbers = [LONG, N1, N1, " 139-0000-1002 "]
    with PolyvSimulator(*account, clock=clock) as sim:
        sim.set_faults(fail_numbers={N1: 1})
        d = make(client, account, sim.url, clock)
        first = d.run(request(numbers, "exact"), message_id="exact", task_id="t1")
        assert first.result is None  # N1: status 11, waiting for its retry
        record = client.hgetall(d.ledger.keys.message("exact"))
        assert stored_requests(record)[0]["phone_numbers"] == numbers
        enqueued: list[Any] = []
        clock.now += 600
        Reconciler(d.ledger, lambda *a: enqueued.append(a), interval_s=5).sweep()
        assert [kwargs["phone_numbers"] for _, _, kwargs in enqueued] == [numbers]
        again = validate_request((), enqueued[0][2], account_daily_limit=2000)
        result = run_until_done(d, again, "exact", clock)
        assert sim.received("13800138000") == 0
        failed = {N1}
        assert requeue_kwargs("exact", record, failed)["phone_numbers"] == numbers
    # (The result shows an invalid number's text cut for display; the ledger keeps it whole.)
    assert outcome_of(result, LONG[:64])["outcome"] == "invalid"
    assert outcome_of(result, N1)["outcome"] == "accepted"


def test_a_message_id_reused_for_another_content_is_refused_and_never_sent(
    client, account, clock
) -> None:
    with PolyvSimulator(*account, clock=clock) as sim:
        sim.set_faults(fail_numbers={N1: 1})
        d = make(client, account, sim.url, clock)
        one = validate_request(
            (),
            {
                "phone_numbers": [N1],
                "template_param_names": ["code"],
                "template_param_values": ["1111"],
                "message_id": "otp",
            },
            account_daily_limit=2000,
        )
        two = validate_request(
            (),
            {
                "phone_numbers": [N1],
                "template_param_names": ["code"],
                "template_param_values": ["2222"],
                "message_id": "otp",
            },
            account_daily_limit=2000,
        )
        assert d.run(one, message_id="otp", task_id="t1").result is None
        with pytest.raises(ValueError, match="message_id 'otp' was already used"):
            d.run(two, message_id="otp", task_id="t2")
        clock.now += 30
        result = run_until_done(d, one, "otp", clock)
        sent = [r["template_param_values"] for r in sim.requests()]
    assert sent == [["1111"], ["1111"]]
    assert outcome_of(result, N1)["outcome"] == "accepted"


# --------------------------------------------------------------------------- item 6


def test_a_replayed_rate_limited_settle_gives_the_attempt_back_once(
    redis_server, account, clock
) -> None:
    proxy = ReplyDroppingProxy(redis_server.port)
    proxied = redis.Redis.from_url(proxy.url(2), decode_responses=True)
    try:
        with PolyvSimulator(*account, clock=clock) as sim:
            sim.set_faults(fail_numbers={N1: 10})
            d = make(proxied, account, sim.url, clock, max_attempts=2)
            assert d.run(request([N1], "rl"), message_id="rl", task_id="t").result is None
            clock.now += 30
            sim.set_faults(rate_limit_rate=1.0)

            def lose_the_settle_reply() -> None:
                proxy.drop_next_reply()  # the settle runs, its reply is lost: it is replayed

            hook_after_send(d, lose_the_settle_reply)
            assert d.run(request([N1], "rl"), message_id="rl", task_id="t").result is None
            assert proxy.dropped == 1
            d.client.send = PolyvClient.send.__get__(d.client)  # type: ignore[method-assign]
            sim.set_faults(rate_limit_rate=0.0)
            result = run_until_done(d, request([N1], "rl"), "rl", clock)
            processed = [r for r in sim.requests() if r["fault"] is None]
    finally:
        proxied.close()
        proxy.close()
    assert outcome_of(result, N1)["outcome"] == "failed"
    assert len(processed) == 2  # SMS_MAX_ATTEMPTS, the rate-limited request not counted


# --------------------------------------------------------------------------- item 7


ENTRY_NOT_PARSING = json.dumps(
    {
        "code": 200,
        "status": "success",
        "success": True,
        "requestId": "r",
        "data": [{"phoneNumber": N1, "status": "twelve"}],
    }
).encode()


@pytest.mark.parametrize(
    ("status", "body", "content_type"),
    [
        (200, b"<html>upstream maintenance</html>", "text/html"),
        (200, ENTRY_NOT_PARSING, "application/json"),
        (503, b'{"code":503,"status":"error","message":"busy"}', "application/json"),
        (502, b"<html>bad gateway</html>", "text/html"),
    ],
    ids=["200-not-json", "entry-not-parsing", "503-json", "502-html"],
)
def test_at_most_once_ends_an_answer_that_may_have_been_sent_failed(
    client, account, clock, status: int, body: bytes, content_type: str
) -> None:
    with CannedServer(status, body, content_type) as server:
        d = make(client, account, server.url, clock, retry_ambiguous=False)
        result = d.run(request([N1], "amo"), message_id="amo", task_id="t").result
        assert result is not None, "at most once: nothing may be left to send again"
        assert len(server.requests) == 1
    entry = outcome_of(result, N1)
    assert (entry["outcome"], entry["attempts"]) == ("failed", 1)
    # Polyv may have sent it: the unit is kept.
    assert quota(d.ledger, d.ledger.day()) == {N1: 1, "_total": 1}


# --------------------------------------------------------------------------- also-look-at


def test_give_up_keeps_the_unit_when_a_later_attempt_may_have_gone_out(
    client, account, clock
) -> None:
    with PolyvSimulator(*account, clock=clock) as sim:
        sim.set_faults(fail_numbers={N1: 1})
        d = make(client, account, sim.url, clock)
        assert d.run(request([N1], "gu"), message_id="gu", task_id="t").result is None
        # A run took attempt 2 and died before it settled (its status 11 is attempt 1's).
        d.ledger.reserve("gu", [N1], token="dead")
        day = d.ledger.day()  # the unit's day (an hour on may be tomorrow)
        clock.now += 3600
        result = d.run(request([N1], "gu"), message_id="gu", task_id="t", give_up="gave up")
    assert result.result is not None
    assert outcome_of(result.result, N1)["outcome"] == "failed"
    assert quota(d.ledger, day) == {N1: 1, "_total": 1}


def test_minus_one_after_midnight_raises_todays_counter_and_refunds_the_reserved_day(
    client, account
) -> None:
    now = datetime.now(TZ)
    midnight = datetime(now.year, now.month, now.day, tzinfo=TZ) + timedelta(days=1)
    clock = Clock(midnight.timestamp() - 5)
    body = json.dumps(
        {
            "code": 200,
            "status": "success",
            "success": True,
            "requestId": "r",
            "data": [{"phoneNumber": N1, "status": -1, "serialNo": ""}],
        }
    ).encode()
    with CannedServer(200, body) as server:
        d = make(client, account, server.url, clock)
        yesterday = d.ledger.day()

        def past_midnight() -> None:
            clock.now += 10

        hook_after_send(d, past_midnight)
        result = d.run(request([N1], "mn"), message_id="mn", task_id="t").result
    today = d.ledger.day()
    assert today != yesterday
    assert outcome_of(result, N1)["outcome"] == "quota_exceeded"
    assert quota(d.ledger, yesterday) == {N1: 0, "_total": 0}
    assert quota(d.ledger, today) == {N1: 10}


def test_the_dead_set_is_trimmed_past_the_records_lifetime(client, account, clock) -> None:
    with PolyvSimulator(*account, clock=clock) as sim:
        sim.set_faults(fail_numbers={N1: 5, N2: 5})
        d = make(client, account, sim.url, clock, max_attempts=1)
        d.run(request([N1], "old"), message_id="old", task_id="t1")
        assert client.zscore(d.ledger.keys.dead, "old") is not None
        clock.now += 31 * 86400
        d.run(request([N2], "new"), message_id="new", task_id="t2")
    assert client.zrange(d.ledger.keys.dead, 0, -1) == ["new"]


def test_a_later_chunk_does_not_bring_the_reconcilers_due_time_forward(
    client, account, clock
) -> None:
    numbers = [f"1390002{i:04d}" for i in range(201)]
    with PolyvSimulator(*account, clock=clock) as sim:
        d = make(client, account, sim.url, clock)
        sim.set_faults(rate_limit_rate=1.0)

        def rate_limit_only_the_first() -> None:
            sim.set_faults(rate_limit_rate=0.0, fail_numbers={numbers[-1]: 1})

        hook_after_send(d, rate_limit_only_the_first)
        started = clock.now
        outcome = d.run(request(numbers, "chunks"), message_id="chunks", task_id="t")
    assert outcome.result is None
    due = client.zscore(d.ledger.keys.pending, "chunks") / 1000
    # The first chunk was rate limited: its retry is due no sooner than the pause.
    assert due >= started + d.retry_backoff_max_s + d.ledger.reconcile_grace_s - 0.01


@pytest.mark.parametrize("how", ["settle failed", "process died"])
def test_journal_entries_of_one_message_are_found_and_replayed_oldest_first(
    client, account, clock, tmp_path: Path, how: str
) -> None:
    """Entries left by failed settles (this process), or by a process that died (taken over
    by this one), are found by message and replayed oldest first."""
    journal = writer = Journal(tmp_path, account[0])
    if how == "process died":
        writer = Journal(tmp_path, account[0])
    ledger: Ledger = make(client, account, "http://127.0.0.1:9", clock).ledger
    r = ledger.reserve("jj", [N1, N2], token="a")
    days = {s.number: s.day for s in r.states}
    entries = [
        writer.record(
            "jj",
            [Settlement(N1, "retry", 11, error="the first answer", attempt=1)],
            days=days,
            token="a",
            retry_at=0,
            now=clock.now,
        ),
        # A later answer for the same number and attempt: the record keeps the last replayed.
        writer.record(
            "jj",
            [Settlement(N1, "retry", 11, error="the second answer", attempt=1)],
            days=days,
            token="a",
            retry_at=0,
            now=clock.now,
        ),
        writer.record(
            "jj",
            [Settlement(N2, "accepted", 12, "s^0", attempt=1)],
            days=days,
            token="a",
            retry_at=0,
            now=clock.now,
        ),
        writer.record("other", [], days={}, token="b", retry_at=0, now=clock.now),
    ]
    assert journal.entries() == []  # in flight: their settles are under way
    if how == "settle failed":
        for entry in entries:
            journal.keep(entry)
    else:
        died(writer)
    assert len(journal.entries("jj")) == 3
    assert journal.replay(ledger, "jj") == 3
    assert journal.replay(ledger, "jj") == 0  # taken: removed
    states = ledger.peek("jj", [N1, N2])
    assert (states[N1].state, states[N2].state) == ("reserved", "accepted")
    assert states[N1].error == "the second answer"  # oldest first
    assert [e.message_id for e in journal.entries()] == ["other"]
    assert [d.entry["message_id"] for d in on_disk(tmp_path)] == ["other"]


# --------------------------------------------------------------------------- item 8


HUGE = 7 * 10**5000  # more than the 4300 digits Python turns into text


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (([N1], ["code"], ["12\ud83d"]), r"template_param_values\[0\]: is not valid Unicode"),
        (([N1], ["co\udc00de"], ["1"]), r"template_param_names\[0\]: is not valid Unicode"),
        ((["1390000\ud83d1001"], ["code"], ["1"]), r"phone_numbers\[0\]: is not valid Unicode"),
        (([N1], ["code"], [HUGE]), r"template_param_values\[0\]: the integer has far too many"),
        (([HUGE], ["code"], ["1"]), r"phone_numbers\[0\]: the integer has far too many"),
    ],
    ids=["surrogate-value", "surrogate-name", "surrogate-number", "huge-value", "huge-number"],
)
def test_bad_text_and_huge_ints_are_invalid_requests_at_delay(
    redis_server, args: tuple[Any, ...], field: str
) -> None:
    from polyv_sms import send_sms
    from polyv_sms.errors import InvalidRequest

    broker = redis_server.client(0)
    before = broker.llen("sms")
    with pytest.raises(InvalidRequest, match=field):
        send_sms.delay(*args)
    with pytest.raises(InvalidRequest, match="message_id: is not valid Unicode"):
        send_sms.delay([N1], ["code"], ["1"], message_id="m\ud83d")
    assert broker.llen("sms") == before


def test_a_lone_surrogate_enqueued_by_name_fails_in_the_worker_without_sending(
    start_worker, sim, redis_server
) -> None:
    from celery import Celery

    start_worker()
    by_name = Celery("by-name", broker=redis_server.url(0), backend=redis_server.url(1))
    try:
        result = by_name.send_task(
            "polyv_sms.send_sms", args=[[N1], ["code"], ["12\ud83d"]], queue="sms"
        )
        with pytest.raises(Exception, match="not valid Unicode") as caught:
            result.get(timeout=30)
        assert type(caught.value).__name__ == "InvalidRequest"
    finally:
        by_name.close()
    assert sim.requests() == []


@pytest.mark.parametrize("value", [-13800138000, "-13800138000", " -138 0013 8000"])
def test_a_negative_number_is_invalid(value: object) -> None:
    from polyv_sms.polyv.phones import check_phone

    check = check_phone(value)
    assert check.number is None
    assert check.reason == "is negative (starts with a minus sign)"
    assert check_phone(HUGE).number is None


def test_at_most_once_a_number_whose_run_was_lost_mid_send_is_not_sent_again(
    client, account, clock
) -> None:
    """A worker killed (or stuck) mid-send leaves its lease; at most once, the run that takes
    over ends that number failed (unit kept) instead of sending it a second time."""
    with PolyvSimulator(*account, clock=clock) as sim:
        d = make(client, account, sim.url, clock, retry_ambiguous=False)
        req = request([N1, N2], "lost")
        lost = d.ledger.reserve("lost", [N1], token="killed-mid-send")  # N1 went out, then...
        assert lost.states[0].state == "send"
        clock.now += d.ledger.lease_s + 1
        for _ in range(20):
            outcome = d.run(req, message_id="lost", task_id="t")
            if outcome.result is not None:
                break
            clock.now += outcome.retry_in or 0
        assert outcome.result is not None
        assert sim.received(N1) == 0
        assert sim.received(N2) == 1
    assert outcome_of(outcome.result, N1)["outcome"] == "failed"
    assert outcome_of(outcome.result, N2)["outcome"] == "accepted"
    assert quota(d.ledger, d.ledger.day()) == {N1: 1, N2: 1, "_total": 2}


def test_the_journal_directory_setting() -> None:
    from polyv_sms.config import Settings

    assert Settings.from_env({"SMS_RUN_DIR": "/srv/sms"}).journal_dir == "/srv/sms/journal"
    assert Settings.from_env({"SMS_JOURNAL_DIR": "/var/lib/j"}).journal_dir == "/var/lib/j"
    assert Settings.from_env({"SMS_JOURNAL_DIR": "off"}).journal_dir is None
    assert Settings.from_env({"SMS_TAKEOVER_GRACE": "3"}).takeover_grace_s == 3.0


def test_a_journal_entry_the_ledger_refuses_is_set_aside_not_replayed_forever(
    client, account, clock, tmp_path: Path
) -> None:
    journal = Journal(tmp_path, account[0])
    ledger = make(client, account, "http://127.0.0.1:9", clock).ledger
    entry = journal.record(
        "bad", [Settlement(N1, "no-such-action")], days={}, token="t", retry_at=0, now=clock.now
    )
    journal.keep(entry)  # its settle failed
    assert journal.replay(ledger, "bad") == 0
    assert journal.entries() == []
    assert journal.replay(ledger, "bad") == 0
    assert on_disk(journal.directory) == []
    (bad,) = journal.directory.glob("*.bad")
    assert sorted(p.suffix for p in journal.directory.iterdir()) == [".bad", ".seg"]
    assert oct(bad.stat().st_mode & 0o777) == "0o600"
    # What it holds is the entry, for an operator to read.
    assert json.loads(bad.read_text())["items"] == [[N1, "no-such-action", None, None, "", None]]


def test_the_journal_thread_replays_and_reports_what_is_left(
    client, account, clock, tmp_path: Path
) -> None:
    from helpers import free_port

    from polyv_sms import metrics
    from polyv_sms.ledger.journal import JournalReplayer

    journal = Journal(tmp_path, account[0])
    dead = Journal(tmp_path, account[0])
    ledger = make(client, account, "http://127.0.0.1:9", clock).ledger
    record_accepted(dead, ledger, "jt", N1, "s-jt^0", token="a", now=clock.now, retry_at=0)
    died(dead)
    down = make(
        redis.Redis(port=free_port(), socket_connect_timeout=0.2),
        account,
        "http://127.0.0.1:9",
        clock,
    ).ledger
    down.outage_s = 0.1
    assert JournalReplayer(journal, down).replay_once() == 0
    assert metrics.JOURNAL_PENDING.labels("default")._value.get() == 1
    before = metrics.JOURNAL_REPLAYED._value.get()
    assert JournalReplayer(journal, ledger).replay_once() == 1
    assert metrics.JOURNAL_PENDING.labels("default")._value.get() == 0
    assert metrics.JOURNAL_REPLAYED._value.get() == before + 1
    assert ledger.peek("jt", [N1])[N1].serial_no == "s-jt^0"
    assert list(journal.directory.iterdir()) == []
