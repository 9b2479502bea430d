"""The answer journal with real worker processes: a worker SIGKILLed right after it read
Polyv's answer, while the ledger is frozen, leaves the answer in its journal file; another
worker process, alive on the same journal directory, takes the file over without the ledger,
settles the answer once the ledger is back, and the number is never sent again.

(The same worker started again after a kill: ``test_answers_kept.py``.)
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from helpers import wait_for

from polyv_sms.config import Settings
from polyv_sms.ledger import build_ledger, connect_redis
from polyv_sms.ledger.journal import on_disk
from polyv_sms.ledger.receipts import Receipts

from .tools import Results, elapsed, log_lines, phone, seen_by_message

pytestmark = pytest.mark.slow


def test_a_worker_killed_after_reading_the_answer_is_taken_over_by_a_live_one(
    make_redis, start_worker, producer, sim, account, redis_server, tmp_path: Path
) -> None:
    started = time.monotonic()
    ledger_server = make_redis(appendonly=True)
    journal = tmp_path / "journal"
    options = {
        "POLYV_HTTP_TIMEOUT": 4,
        "SMS_REDIS_URL": ledger_server.url(0),
        "SMS_REDIS_OUTAGE": 30,  # the settle waits on the frozen ledger: killed meanwhile
        "SMS_JOURNAL_DIR": journal,
        "SMS_VISIBILITY_TIMEOUT": 10,
    }
    workers = [start_worker(concurrency=2, **options) for _ in range(2)]
    results = Results(redis_server.client(1))
    number = phone(750)
    sim.set_faults(latency_s=1.0)
    task = producer(redis_server.url(0)).send([number], tag="takeover", message_id="takeover")
    wait_for(sim.requests, 10, what="the request")
    assert ledger_server.process is not None
    os.kill(ledger_server.process.pid, signal.SIGSTOP)  # frozen while Polyv answers
    try:
        # The answer is read: it is in the journal of the worker that sent it. Kill that one.
        (found,) = wait_for(lambda: on_disk(journal), 10, what="the answer in the journal")
        segment = found.path
        victim = next(w for w in workers if w.process and f"{w.process.pid}-" in segment.name)
        survivor = next(w for w in workers if w is not victim)
        victim.kill()
        # The live worker takes the dead one's file over (no ledger needed for that).
        wait_for(
            lambda: log_lines(survivor, "took over 1 answers a dead process left"),
            10,
            what="the live worker to take the answer over",
        )
        assert segment.exists()  # the ledger has not taken it yet
    finally:
        os.kill(ledger_server.process.pid, signal.SIGCONT)
    wait_for(lambda: not segment.exists(), 60, what="the answer to reach the ledger")
    assert on_disk(journal) == []
    serials = seen_by_message(sim)[("takeover", number)].accepted
    settings = Settings.from_env({"POLYV_APP_ID": account[0], "SMS_REDIS_URL": ledger_server.url()})
    receipts = Receipts(build_ledger(settings, connect_redis(ledger_server.url())))
    receipt = receipts.receipt(serials[0])
    assert receipt is not None
    assert receipt["message_id"] == "takeover"
    # The task comes back (the broker's visibility timeout) to the live worker: nothing sent.
    sim.set_faults(latency_s=0.0)
    result = results.successes([task], timeout=90)[task]
    (outcome,) = result["results"]
    assert (outcome["outcome"], outcome["serial_no"]) == ("accepted", serials[0])
    assert sim.received(number) == 1
    assert log_lines(survivor, "kept in the journal reached the ledger")
    print(f"\nworker killed with the answer, ledger frozen: taken over; {elapsed(started)}s")


def test_a_worker_stopped_cleanly_leaves_no_journal_file(
    start_worker, producer, sim, account, redis_server, tmp_path: Path
) -> None:
    journal = tmp_path / "journal"
    worker = start_worker(SMS_JOURNAL_DIR=journal)
    results = Results(redis_server.client(1))
    number = phone(760)
    task = producer(redis_server.url(0)).send([number], tag="clean", message_id="clean")
    (outcome,) = results.successes([task], timeout=30)[task]["results"]
    assert outcome["outcome"] == "accepted"
    assert len(list((journal / account[0]).glob("*.seg"))) == 1  # its file, while it runs
    assert worker.stop() == 0  # warm shutdown (SIGTERM)
    assert list((journal / account[0]).iterdir()) == []


def test_an_answer_kept_by_a_prefork_child_reaches_the_ledger_without_another_run(
    make_redis, start_worker, producer, sim, account, tmp_path: Path
) -> None:
    """``celery worker -P prefork`` (the project runs threads; an operator may not): the
    journal threads start with the worker's main process, and a pool child has none. An
    answer a child kept (the ledger down past SMS_REDIS_OUTAGE) waited for that same child to
    run the message again - no other process may replay a live process's entries - and a
    retry that another child ran after the lease and its grace sent the number again."""
    ledger_server = make_redis(appendonly=True)
    journal = tmp_path / "journal"
    # (-P prefork alone is not enough: Celery takes it for its default and keeps the
    # configured pool, threads, unless a settings module of the operator's says prefork.)
    (tmp_path / "prefork_settings.py").write_text('worker_pool = "prefork"\n')
    worker = start_worker(
        concurrency=2,
        extra_args=("-P", "prefork"),
        PYTHONPATH=tmp_path,
        SMS_CELERY_CONFIG="prefork_settings",
        POLYV_HTTP_TIMEOUT=4,
        SMS_REDIS_URL=ledger_server.url(0),
        SMS_REDIS_OUTAGE=1,
        SMS_JOURNAL_DIR=journal,
        SMS_RECONCILE_INTERVAL=0,  # (no sweep: only a journal thread may settle it)
        SMS_RETRY_BACKOFF=60,  # (the task's retry comes long after the test looked)
        SMS_RETRY_BACKOFF_MAX=120,
    )
    number = phone(770)
    sim.set_faults(latency_s=2.0)
    producer(worker.env["SMS_BROKER_URL"]).send([number], tag="prefork", message_id="prefork")
    wait_for(sim.requests, 10, what="the request")
    ledger_server.stop(kill=True)  # while Polyv processes it
    wait_for(lambda: on_disk(journal), 10, what="the answer in the journal")
    wait_for(lambda: log_lines(worker, "retrying in"), 10, what="the settle to give up")
    ledger_server.start()
    # A journal thread of the child settles it within a second or two, with no run of it.
    wait_for(lambda: not on_disk(journal), 10, what="the kept answer to reach the ledger")
    settings = Settings.from_env({"POLYV_APP_ID": account[0], "SMS_REDIS_URL": ledger_server.url()})
    ledger = build_ledger(settings, connect_redis(ledger_server.url()))
    assert ledger.peek("prefork", [number])[number].state == "accepted"
    assert sim.received(number) == 1
