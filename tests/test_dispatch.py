"""The dispatcher without Celery: a real redis-server, the simulator over HTTP, an injected
clock. Covers what is awkward through a worker: midnight, give-up, aborts across chunks,
answers we cannot interpret, and the reconciler."""

from __future__ import annotations

import random
from datetime import datetime, timedelta
from typing import Any

import pytest
import redis
from helpers import TZ, CannedServer, Clock

from polyv_sms.dispatch import Dispatcher
from polyv_sms.errors import InvalidRequest
from polyv_sms.ledger import Ledger
from polyv_sms.ledger.reconcile import Reconciler
from polyv_sms.polyv.client import PolyvClient
from polyv_sms.polyv.simulator import PolyvSimulator
from polyv_sms.validation import validate_request


def make(
    client: redis.Redis, account: tuple[str, str], url: str, clock: Clock, **options: Any
) -> Dispatcher:
    limits = {"phone_daily_limit": 10, "account_daily_limit": 2000}
    limits |= {k: options.pop(k) for k in list(options) if k in limits}
    ledger = Ledger(
        client,
        account[0],
        max_attempts=options.get("max_attempts", 3),
        receipt_ttl_days=30,
        timezone="Asia/Shanghai",
        lease_s=30.0,
        reconcile_grace_s=60.0,
        clock=clock,
        **limits,
    )
    polyv = PolyvClient(account[0], account[1], url, timeout=1.0, clock=clock)
    return Dispatcher(
        ledger,
        polyv,
        max_attempts=options.pop("max_attempts", 3),
        retry_backoff_s=1.0,
        retry_backoff_max_s=10.0,
        rng=random.Random(1),
        clock=clock,
        **options,
    )


def request(numbers: list[Any], message_id: str | None = None):
    return validate_request(
        (),
        {
            "phone_numbers": numbers,
            "template_param_names": ["code"],
            "template_param_values": ["1"],
            "message_id": message_id,
        },
        account_daily_limit=2000,
    )


def quota(ledger: Ledger, day: str) -> dict[str, int]:
    return {k: int(v) for k, v in ledger.redis.hgetall(ledger.keys.quota(day)).items()}


def run_until_done(
    dispatcher: Dispatcher, req, message_id: str, clock: Clock, limit: int = 20
) -> dict[str, Any]:
    for _ in range(limit):
        outcome = dispatcher.run(req, message_id=message_id, task_id="task-1")
        if outcome.result is not None:
            return outcome.result
        assert outcome.retry_in is not None
        clock.now += outcome.retry_in
    raise AssertionError("the message never finished")


def test_message_straddling_midnight_counts_against_the_day_it_was_reserved(
    client, account, clock
) -> None:
    now = datetime.now(TZ)
    midnight = datetime(now.year, now.month, now.day, tzinfo=TZ) + timedelta(days=1)
    clock.now = midnight.timestamp() - 0.5
    with PolyvSimulator(account[0], account[1], clock=clock) as sim:
        sim.set_faults(fail_numbers={"13900000002": 1})
        dispatcher = make(client, account, sim.url, clock)
        ledger = dispatcher.ledger
        before = ledger.day()
        first = dispatcher.run(request(["13900000001", "13900000002"]), message_id="m", task_id="t")
        assert first.result is None
        assert first.retry_in is not None
        clock.now = midnight.timestamp() + 0.5  # the retry runs after local midnight
        after = ledger.day()
        assert after != before
        result = run_until_done(dispatcher, request(["13900000001", "13900000002"]), "m", clock)
        assert result["counts"]["accepted"] == 2
        # Both units belong to the day the message was reserved on, none to the new day.
        assert quota(ledger, before) == {"13900000001": 1, "13900000002": 1, "_total": 2}
        assert quota(ledger, after) == {}
        # A new message after midnight counts against the new day, with a fresh limit.
        run_until_done(dispatcher, request(["13900000002"]), "m2", clock)
        assert quota(ledger, after) == {"13900000002": 1, "_total": 1}


def test_counters_reset_exactly_at_local_midnight(client, account, clock) -> None:
    now = datetime.now(TZ)
    midnight = datetime(now.year, now.month, now.day, tzinfo=TZ) + timedelta(days=1)
    clock.now = midnight.timestamp() - 0.001
    with PolyvSimulator(account[0], account[1], clock=clock) as sim:
        dispatcher = make(client, account, sim.url, clock, phone_daily_limit=2)
        outcomes = []
        for i in range(3):
            result = run_until_done(dispatcher, request(["13900000003"]), f"d{i}", clock)
            outcomes.append(result["results"][0]["outcome"])
        assert outcomes == ["accepted", "accepted", "quota_exceeded"]
        clock.now = midnight.timestamp()  # exactly 00:00:00.000 local time
        result = run_until_done(dispatcher, request(["13900000003"]), "d3", clock)
        assert result["results"][0]["outcome"] == "accepted"


def test_permanent_error_fails_every_pending_number_across_chunks(client, account, clock) -> None:
    with PolyvSimulator(account[0], "another-secret", clock=clock) as sim:
        dispatcher = make(client, account, sim.url, clock)
        numbers = [f"139{i:08d}" for i in range(450)]
        outcome = dispatcher.run(request(numbers), message_id="big", task_id="t")
        assert outcome.result is not None
        assert outcome.result["counts"]["failed"] == 450
        assert len(sim.requests()) == 1  # the other chunks were not sent
        assert quota(dispatcher.ledger, dispatcher.ledger.day())["_total"] == 0


def test_unknown_status_ends_failed_and_keeps_the_unit(client, account, clock) -> None:
    body = (
        b'{"code":200,"status":"success","success":true,"requestId":"r","data":['
        b'{"phoneNumber":"13900000004","status":99,"serialNo":null},'
        b'{"phoneNumber":"13900000005","status":12,"serialNo":"5^0"}]}'
    )
    with CannedServer(200, body) as server:
        dispatcher = make(client, account, server.url, clock)
        result = run_until_done(dispatcher, request(["13900000004", "13900000005"]), "u", clock)
    by = {r["phone_number"]: r for r in result["results"]}
    assert by["13900000004"]["outcome"] == "failed"
    assert "unknown status 99" in by["13900000004"]["error"]
    assert by["13900000005"]["outcome"] == "accepted"
    assert len(server.requests) == 1  # not retried: it may have been sent
    assert quota(dispatcher.ledger, dispatcher.ledger.day())["_total"] == 2


def test_number_missing_from_the_answer_is_retried(client, account, clock) -> None:
    body = (
        b'{"code":200,"status":"success","success":true,"requestId":"r","data":['
        b'{"phoneNumber":"13900000006","status":12,"serialNo":"6^0"}]}'
    )
    with CannedServer(200, body) as server:
        dispatcher = make(client, account, server.url, clock, max_attempts=2)
        result = run_until_done(dispatcher, request(["13900000006", "13900000007"]), "x", clock)
    by = {r["phone_number"]: r for r in result["results"]}
    assert by["13900000007"]["outcome"] == "failed"
    assert by["13900000007"]["attempts"] == 2
    assert len(server.requests) == 2
    assert b"13900000006" not in server.requests[1]["body"]


def test_at_most_once_mode_does_not_retry_a_read_timeout(client, account, clock) -> None:
    with PolyvSimulator(account[0], account[1]) as sim:
        sim.set_faults(latency_s=1.5)
        dispatcher = make(client, account, sim.url, clock, retry_ambiguous=False)
        result = run_until_done(dispatcher, request(["13900000008"]), "amb", clock)
    assert result["results"][0]["outcome"] == "failed"
    assert "may have sent" in result["results"][0]["error"]
    assert sim.received("13900000008") == 1
    assert quota(dispatcher.ledger, dispatcher.ledger.day())["_total"] == 1  # unit kept


def test_give_up_ends_pending_numbers_failed(client, account, clock) -> None:
    with PolyvSimulator(account[0], account[1], clock=clock) as sim:
        sim.set_faults(fail_numbers={"13900000009": 1})
        dispatcher = make(client, account, sim.url, clock, max_attempts=5)
        req = request(["13900000009", "13900000010"])
        first = dispatcher.run(req, message_id="g", task_id="t")
        assert first.result is None
        done = dispatcher.run(req, message_id="g", task_id="t", give_up="gave up after 99")
    assert done.result is not None
    by = {r["phone_number"]: r["outcome"] for r in done.result["results"]}
    assert by == {"13900000009": "failed", "13900000010": "accepted"}
    assert sim.received("13900000009") == 1
    # Its last attempt was a plain status 11 (not sent): the unit is given back.
    assert quota(dispatcher.ledger, dispatcher.ledger.day()) == {
        "13900000009": 0,
        "13900000010": 1,
        "_total": 1,
    }


def test_reconciler_re_enqueues_an_overdue_message_once(client, account, clock) -> None:
    with PolyvSimulator(account[0], account[1], clock=clock) as sim:
        sim.set_faults(fail_numbers={"13900000011": 1})
        dispatcher = make(client, account, sim.url, clock)
        outcome = dispatcher.run(
            request(["13900000011"], "rec"), message_id="rec", task_id="task-rec"
        )
        assert outcome.result is None
    enqueued: list[tuple[str, str, dict[str, Any]]] = []
    reconciler = Reconciler(dispatcher.ledger, lambda *a: enqueued.append(a), interval_s=5)
    lock = dispatcher.ledger.keys.reconcile_lock
    assert reconciler.sweep() == []  # the retry is not overdue yet
    clock.now += 120
    assert reconciler.sweep() == ["rec"]
    message_id, task_id, kwargs = enqueued[0]
    assert (message_id, task_id) == ("rec", "task-rec")
    assert kwargs["phone_numbers"] == ["13900000011"]
    assert kwargs["message_id"] == "rec"
    assert client.exists(lock) == 0  # released when the sweep ended
    assert reconciler.sweep() == []  # pushed back: not enqueued twice in a row
    clock.now += 120  # overdue again, but another sweeper holds the lock
    client.set(lock, "another-sweeper", px=5000)
    assert reconciler.sweep() == []
    assert client.get(lock) == "another-sweeper"  # not released by us
    client.delete(lock)
    assert reconciler.sweep() == ["rec"]


def test_rate_limiting_waits_and_does_not_use_up_attempts(client, account, clock) -> None:
    with PolyvSimulator(account[0], account[1], clock=clock) as sim:
        sim.set_faults(rate_limit_rate=1.0)
        dispatcher = make(client, account, sim.url, clock, max_attempts=2)
        req = request(["13900000031"])
        for _ in range(3):  # more rate-limited rounds than attempts: none is used up
            outcome = dispatcher.run(req, message_id="rl", task_id="t")
            assert outcome.result is None
            # The pause Polyv imposes (5 min), capped by SMS_RETRY_BACKOFF_MAX (10 s here).
            assert outcome.retry_in == 10.0
            clock.now += outcome.retry_in
        sim.set_faults(rate_limit_rate=0.0)
        result = run_until_done(dispatcher, req, "rl", clock)
    assert result["results"][0]["outcome"] == "accepted"
    assert result["results"][0]["attempts"] == 1


def test_same_message_id_with_other_numbers_is_refused_and_never_sent(
    client, account, clock
) -> None:
    """Design invariant 7: one message id is one request. (It used to send the second
    content under the first's id; the reconciler then revived each task with its own.)"""
    with PolyvSimulator(account[0], account[1], clock=clock) as sim:
        sim.set_faults(fail_numbers={"13900000041": 2})
        dispatcher = make(client, account, sim.url, clock)
        first = dispatcher.run(
            request(["13900000041"], "shared"), message_id="shared", task_id="task-1"
        )
        assert first.result is None  # status 11: waiting for its retry
        clock.now += 1
        with pytest.raises(InvalidRequest, match="message_id 'shared' was already used"):
            dispatcher.run(request(["13900000042"], "shared"), message_id="shared", task_id="t2")
        assert sim.received("13900000042") == 0
        # The same content under the same id is the same request: both tasks come back.
        dispatcher.run(request(["13900000041"], "shared"), message_id="shared", task_id="task-3")
        enqueued: list[tuple[str, str, dict[str, Any]]] = []
        reconciler = Reconciler(dispatcher.ledger, lambda *a: enqueued.append(a), interval_s=5)
        clock.now += 300
        assert reconciler.sweep() == ["shared"]
        assert sorted((m, t, tuple(k["phone_numbers"])) for m, t, k in enqueued) == [
            ("shared", "task-1", ("13900000041",)),
            ("shared", "task-3", ("13900000041",)),
        ]
        result = run_until_done(dispatcher, request(["13900000041"], "shared"), "shared", clock)
    assert result["results"][0]["outcome"] == "accepted"


def test_a_broken_record_does_not_block_the_reconciler(client, account, clock) -> None:
    with PolyvSimulator(account[0], account[1], clock=clock) as sim:
        sim.set_faults(fail_numbers={"13900000051": 1, "13900000052": 1})
        dispatcher = make(client, account, sim.url, clock)
        for message_id, number in (("broken", "13900000051"), ("fine", "13900000052")):
            outcome = dispatcher.run(
                request([number], message_id), message_id=message_id, task_id=f"task-{message_id}"
            )
            assert outcome.result is None
            clock.now += 1
    client.hset(dispatcher.ledger.keys.message("broken"), "req:task-broken", "{not json")
    enqueued: list[tuple[str, str, dict[str, Any]]] = []
    reconciler = Reconciler(dispatcher.ledger, lambda *a: enqueued.append(a), interval_s=5)
    clock.now += 300
    assert reconciler.sweep() == ["fine"]
    assert [t for _, t, _ in enqueued] == ["task-fine"]


def test_run_tokens_differ_in_forked_children_and_ignore_random_seed() -> None:
    """A run's lease token names it to the ledger: two runs must never share one, not in the
    children of a prefork pool (forked from one parent) nor after an application seeds
    ``random`` (which would make a generator of the ``random`` module repeat)."""
    import os

    from polyv_sms import dispatch

    random.seed(7)
    first = dispatch._token()
    random.seed(7)
    assert dispatch._token() != first
    read_end, write_end = os.pipe()
    children = []
    for _ in range(4):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            os.write(write_end, dispatch._token().encode() + b"\n")
            os._exit(0)
        children.append(pid)
    for pid in children:
        os.waitpid(pid, 0)
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        tokens = pipe.read().split()
    tokens.append(dispatch._token())
    assert len(tokens) == 5
    assert len(set(tokens)) == 5
    assert all(len(token) == 32 for token in tokens)
