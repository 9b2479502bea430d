"""Issue 10 with real processes: an answer read from Polyv is never lost, no number is in
flight twice, one message id is one content.

- An answer that trickles in for three times the lease while duplicates of the message are
  enqueued: at most once, Polyv gets exactly one request; at least once, at most two, and
  every status 12 the worker read is in the ledger.
- The ledger's Redis down for 20 s (longer than the lease) while a request is in flight; and
  the one Redis of broker, results and ledger down for 40 s with the worker killed and started
  again: the number is sent once and its receipt is found (the answer waited in the journal).
- A run that found the message busy and could not publish its retry is not lost.
- A message id enqueued again with another content is refused, and never sent.

Each uses short timeouts so that the lease is about 10-17 s; the longest runs about a minute.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from helpers import wait_for

from polyv_sms.config import Settings
from polyv_sms.ledger import build_ledger, connect_redis
from polyv_sms.ledger.journal import on_disk
from polyv_sms.ledger.receipts import Receipts

from .test_unpublished_retry import held_by_broker, refuse_pushes
from .tools import Results, TricklingProxy, elapsed, log_lines, phone, seen_by_message

pytestmark = pytest.mark.slow


def receipts_at(url: str, app_id: str) -> Receipts:
    settings = Settings.from_env({"POLYV_APP_ID": app_id, "SMS_REDIS_URL": url})
    return Receipts(build_ledger(settings, connect_redis(url)))


def only(result: dict) -> dict:
    assert len(result["results"]) == 1, result
    return dict(result["results"][0])


def journal_entries(directory: Path) -> list[Any]:
    """The answers in the journal's files that the ledger has not taken, whoever holds them."""
    return on_disk(directory)


# --------------------------------------------------------------------------- trickling answer


@pytest.mark.parametrize("retry_ambiguous", [False, True], ids=["at-most-once", "at-least-once"])
def test_an_answer_trickling_for_three_leases_is_not_sent_again_meanwhile(
    start_worker, producer, sim, account, redis_server, tmp_path: Path, retry_ambiguous: bool
) -> None:
    started = time.monotonic()
    settings = Settings(http_timeout_s=0.5, redis_outage_s=0.5)
    lease_s = settings.lease_s  # 2*0.5 + 2 + 0.5 + 5 = 8.5 s
    proxy = TricklingProxy(sim.port, duration_s=3 * lease_s)
    try:
        start_worker(
            POLYV_API_BASE=proxy.url,
            POLYV_HTTP_TIMEOUT=0.5,
            SMS_REDIS_OUTAGE=0.5,
            SMS_TAKEOVER_GRACE=2,
            SMS_RETRY_AMBIGUOUS="true" if retry_ambiguous else "false",
            SMS_JOURNAL_DIR=tmp_path / "journal",
            SMS_RECONCILE_INTERVAL=1,
            SMS_RECONCILE_GRACE=1,
        )
        results = Results(redis_server.client(1))
        number, tag = phone(700), f"trickle-{retry_ambiguous}"
        send = producer(redis_server.url(0)).send
        tasks = [send([number], tag=tag, message_id=tag)]
        wait_for(sim.requests, 10, what="the first request")
        # Duplicates of the message while its answer trickles in (a producer retrying, say).
        while time.monotonic() - started < 3 * lease_s:
            tasks.append(send([number], tag=tag, message_id=tag))
            time.sleep(2)
        done = results.successes(tasks, timeout=60)
        # The trickled answer is either read whole (no deadline on the exchange) or given up
        # at the exchange's deadline (POLYV_HTTP_TIMEOUT only bounds each read).
        wait_for(lambda: proxy.delivered + proxy.cut_short, 3 * lease_s + 30, what="the trickle")
    finally:
        proxy.close()
    seen = seen_by_message(sim)[(tag, number)]
    if retry_ambiguous:
        assert 1 <= len(seen.requests) <= 2, seen
    else:
        assert len(seen.requests) == 1, seen
    # Every status 12 that the worker read is in the ledger, with its receipt.
    answered = seen.requests if proxy.delivered else seen.requests[1:]
    read = [r["serial_no"] for r in answered if r["status"] == 12]
    receipts = receipts_at(redis_server.url(2), account[0])
    for serial in read:
        wait_for(lambda s=serial: receipts.receipt(s), 10, what=f"the receipt {serial}")
    final = receipts.message(tag)
    assert final is not None
    state = {n["phone_number"]: n["state"] for n in final["numbers"]}[number]
    if read:
        assert state == "accepted"
    outcomes = {only(r)["outcome"] for r in done.values()}
    print(
        f"\ntrickle ({'at least' if retry_ambiguous else 'at most'} once): lease {lease_s}s,"
        f" {len(tasks)} duplicates, Polyv requests {len(seen.requests)}, trickled answer"
        f" {'read whole' if proxy.delivered else 'given up'}, ledger {state}, results"
        f" {sorted(outcomes)}; {elapsed(started)}s"
    )


# --------------------------------------------------------------------------- long outages


def test_ledger_down_longer_than_the_lease_while_in_flight_sends_once(
    make_redis, start_worker, producer, sim, account, redis_server, tmp_path: Path
) -> None:
    started = time.monotonic()
    ledger_server = make_redis(appendonly=True)
    journal = tmp_path / "journal"
    worker = start_worker(
        POLYV_HTTP_TIMEOUT=4,
        SMS_REDIS_URL=ledger_server.url(0),
        SMS_REDIS_OUTAGE=2,
        SMS_JOURNAL_DIR=journal,
        SMS_RECONCILE_INTERVAL=1,
        SMS_RECONCILE_GRACE=1,
    )
    lease_s = Settings(http_timeout_s=4, redis_outage_s=2).lease_s  # 17 s
    results = Results(redis_server.client(1))
    number = phone(710)
    sim.set_faults(latency_s=2.0)
    task = producer(redis_server.url(0)).send([number], tag="down20", message_id="down20")
    wait_for(sim.requests, 10, what="the request")
    ledger_server.stop(kill=True)  # while Polyv processes it
    down = time.monotonic()
    # Polyv answers (2 s) and the settle gives up (SMS_REDIS_OUTAGE=2): the answer is read.
    time.sleep(max(0.0, 20 - (time.monotonic() - down)))
    assert lease_s < 20
    ledger_server.start()
    sim.set_faults(latency_s=0.0)

    result = only(results.successes([task], timeout=60)[task])
    serials = seen_by_message(sim)[("down20", number)].accepted
    assert sim.received(number) == 1
    assert (result["outcome"], result["serial_no"]) == ("accepted", serials[0])
    receipt = receipts_at(ledger_server.url(0), account[0]).receipt(serials[0])
    assert receipt is not None
    assert receipt["message_id"] == "down20"
    assert journal_entries(journal) == []
    assert log_lines(worker, "kept in the journal reached the ledger")
    print(f"\nledger down 20s (lease {lease_s}s) mid-request: sent once; {elapsed(started)}s")


def test_the_one_redis_down_40s_with_the_worker_killed_sends_once(
    make_redis, start_worker, producer, sim, account, tmp_path: Path
) -> None:
    started = time.monotonic()
    server = make_redis(appendonly=True)
    journal = tmp_path / "journal"
    worker = start_worker(
        POLYV_HTTP_TIMEOUT=4,
        SMS_BROKER_URL=server.url(0),
        SMS_RESULT_BACKEND=server.url(1),
        SMS_REDIS_URL=server.url(2),
        SMS_REDIS_OUTAGE=2,
        SMS_JOURNAL_DIR=journal,
        SMS_RECONCILE_INTERVAL=1,
        SMS_RECONCILE_GRACE=1,
        SMS_VISIBILITY_TIMEOUT=10,
    )
    number = phone(720)
    sim.set_faults(latency_s=2.0)
    task = producer(server.url(0)).send([number], tag="down40", message_id="down40")
    wait_for(sim.requests, 10, what="the request")
    server.stop(kill=True)  # broker, results and ledger, while Polyv processes the request
    down = time.monotonic()
    # Polyv answers (2 s), the settle gives up (SMS_REDIS_OUTAGE=2), and the worker dies
    # with the answer only in its journal.
    time.sleep(7)
    worker.kill()
    time.sleep(max(0.0, 40 - (time.monotonic() - down)))
    sim.set_faults(latency_s=0.0)
    server.start()
    worker.start()  # started again (supervisord's autorestart)

    results = Results(server.client(1))
    result = only(results.successes([task], timeout=60)[task])
    serials = seen_by_message(sim)[("down40", number)].accepted
    assert sim.received(number) == 1
    assert (result["outcome"], result["serial_no"]) == ("accepted", serials[0])
    receipt = receipts_at(server.url(2), account[0]).receipt(serials[0])
    assert receipt is not None
    assert receipt["message_id"] == "down40"
    assert journal_entries(journal) == []
    print(f"\none Redis down 40s, worker killed: sent once, receipt kept; {elapsed(started)}s")


# --------------------------------------------------------------------------- busy, content


def test_a_busy_run_whose_retry_cannot_be_published_is_not_lost(
    make_redis, producer, start_worker, autorestart, sim, redis_server
) -> None:
    started = time.monotonic()
    broker_server = make_redis(appendonly=False)
    autorestart.watch(
        start_worker(
            SMS_BROKER_URL=broker_server.url(0),
            SMS_VISIBILITY_TIMEOUT=3,
            SMS_RETRY_BACKOFF_MAX=0.5,
        )
    )
    broker = broker_server.client(0)
    # The producer has a user of its own: refusing the worker's pushes must not stop it.
    broker.execute_command("ACL", "SETUSER", "producer", "on", ">p", "~*", "&*", "+@all")
    producer_url = f"redis://producer:p@127.0.0.1:{broker_server.port}/0"
    results = Results(redis_server.client(1))
    number = phone(730)
    sim.set_faults(latency_s=1.5)  # inside the 2 s HTTP timeout
    send = producer(producer_url).send
    first = send([number], tag="busy", message_id="busy")
    wait_for(sim.requests, 10, what="the request")
    # While the first run holds the message, the same message is enqueued again: that run
    # finds it busy, and its retry (or a requeue) cannot be published.
    refuse_pushes(broker, True)
    second = send([number], tag="busy", message_id="busy")
    wait_for(lambda: log_lines(autorestart.workers[0], "could not be published"), 30, what="it")
    refuse_pushes(broker, False)

    done = results.successes([first, second], timeout=60)
    assert [only(r)["outcome"] for r in done.values()] == ["accepted", "accepted"]
    assert sim.received(number) == 1
    assert not held_by_broker(broker, second)
    print(f"\nbusy run with an unpublishable retry: both tasks complete; {elapsed(started)}s")


def test_a_message_id_enqueued_again_with_another_content_is_refused_and_never_sent(
    start_worker, producer, sim, redis_server
) -> None:
    start_worker(SMS_RETRY_BACKOFF=1, SMS_RETRY_BACKOFF_MAX=1)
    results = Results(redis_server.client(1))
    number = phone(740)
    sim.set_faults(fail_numbers={number: 1})  # the first request: status 11, a retry follows
    send = producer(redis_server.url(0)).send
    one = send([number], tag="otp", message_id="otp", names=["tag", "code"], values=["otp", "1111"])
    wait_for(sim.requests, 10, what="the first request")
    two = send([number], tag="otp", message_id="otp", names=["tag", "code"], values=["otp", "2222"])
    metas = results.wait([one, two], timeout=30)
    assert metas[one]["status"] == "SUCCESS"
    assert only(metas[one]["result"])["outcome"] == "accepted"
    assert metas[two]["status"] == "FAILURE"
    assert metas[two]["result"]["exc_type"] == "InvalidRequest"
    assert "message_id 'otp' was already used" in str(metas[two]["result"]["exc_message"])
    assert [r["template_param_values"] for r in sim.requests()] == [["otp", "1111"]] * 2
