"""Where the merged branches meet, with real processes: the rate guard (issue 12) against a
retry that cannot be published (issues 10 and 13). The broker is a redis-server of its own;
results and the ledger live on the session's redis-server.
"""

from __future__ import annotations

import time

import pytest
from helpers import wait_for

from polyv_sms.ledger.records import Keys

from .test_unpublished_retry import PUBLISH_FAILED, held_by_broker, refuse_pushes
from .tools import Results, log_lines, phone

pytestmark = pytest.mark.slow


def test_a_run_told_to_wait_for_the_rate_guard_whose_retry_cannot_be_published_is_not_lost(
    make_redis, producer, start_worker, sim, account, redis_server
) -> None:
    """The rate guard answers before ``reserve`` writes: a run put off by it (the shared
    pause, or no slot near enough) has reserved nothing. It used to leave nothing in the ledger
    at all - no stored request, no pending entry - and if its retry then could not be
    published, ending the task with ``Ignore`` (right for a message the ledger knows: the
    reconciler brings it back) dropped it for good: never sent, no result, not in the broker.
    (It now leaves its request and a pending entry; the task still waits in place.)"""
    broker_server = make_redis(appendonly=False)
    broker = broker_server.client(0)
    results = Results(redis_server.client(1))
    number = phone(610)
    task_id = producer(broker_server.url(0)).send([number], tag="rg", message_id="rg-1")
    # Polyv blocked us a moment ago (another worker saw it): every worker pauses.
    redis_server.client(2).set(Keys(account[0]).base + "paused", "rate exceeded", px=4000)
    refuse_pushes(broker, True)
    worker = start_worker(SMS_BROKER_URL=broker_server.url(0), SMS_RECONCILE_INTERVAL=0.5)
    wait_for(lambda: log_lines(worker, PUBLISH_FAILED), 30, what="the retry to fail to publish")
    refuse_pushes(broker, False)

    metas = results.wait([task_id], timeout=45)
    assert metas[task_id]["status"] == "SUCCESS", (
        f"state {results.state(task_id)}; broker holds it: {held_by_broker(broker, task_id)}; "
        f"sent {sim.received(number)} times"
    )
    assert sim.received(number) == 1


def test_each_accounts_journal_reaches_its_own_ledger_when_a_worker_starts(
    start_worker, sim, account, redis_server, tmp_path
) -> None:
    """Two accounts from one file (issue 12) and the answers a dead worker left in the
    journal (issue 10): a worker started afresh replays each account's answers into that
    account's ledger - never the other's - and a re-enqueued message sends nothing again."""
    import secrets

    import redis

    from polyv_sms.ledger import Settlement
    from polyv_sms.ledger.journal import Journal, on_disk

    app_a = account[0]
    app_b, secret_b = f"appB{secrets.token_hex(4)}", f"secB-{secrets.token_hex(8)}"
    ledger = redis.Redis.from_url(redis_server.url(2), decode_responses=True)
    journal_dir = tmp_path / "journal"
    number = phone(620)
    for app_id, message in ((app_a, "ja"), (app_b, "jb")):
        keys = Keys(app_id)
        # What the dead worker's reserve left: the number reserved under its lease.
        day = time.strftime("%Y%m%d", time.gmtime(time.time() + 8 * 3600))  # Asia/Shanghai
        ledger.hset(
            keys.message(message),
            mapping={f"n:{number}": f"reserved|{day}|1|||1|", "pending": 1, "lease": "dead"},
        )
        dead = Journal(journal_dir, app_id)  # the dead worker's
        dead.record(
            message,
            [Settlement(number, "accepted", 12, f"s-{message}^0", attempt=1)],
            days={number: day},
            token="dead",
            retry_at=time.time(),
            now=time.time(),
        )
        dead.close()  # (it died: its file stays, its lock goes)
        assert len(on_disk(journal_dir / app_id)) == 1
    path = tmp_path / "accounts.toml"
    path.write_text(f'[accounts.shop-b]\napp_id = "{app_b}"\napp_secret_env = "SHOP_B"\n')
    start_worker(SMS_ACCOUNTS_FILE=path, SHOP_B=secret_b, SMS_JOURNAL_DIR=journal_dir)
    wait_for(lambda: not on_disk(journal_dir), 30, what="the journals to be replayed")
    for app_id, message, other in ((app_a, "ja", "jb"), (app_b, "jb", "ja")):
        state = ledger.hget(Keys(app_id).message(message), f"n:{number}")
        assert state is not None
        assert state.startswith("accepted|"), (app_id, state)
        assert f"s-{message}^0" in state
        assert not ledger.exists(Keys(app_id).message(other))
    assert not list(journal_dir.rglob("*.bad"))
    assert sim.received(number) == 0
    ledger.close()


def test_a_journal_no_account_replays_is_reported_at_start(start_worker, tmp_path) -> None:
    """Answers left in the journal of an account since removed from the accounts file were
    never replayed, and nothing said so: their receipts never reached the ledger."""
    from polyv_sms.ledger import Settlement
    from polyv_sms.ledger.journal import Journal, on_disk

    journal_dir = tmp_path / "journal"
    gone = journal_dir / "appGone123"
    dead = Journal(journal_dir, "appGone123")  # a worker of that account, dead since
    dead.record(
        "m-gone",
        [Settlement(phone(630), "accepted", 12, "s-gone^0", attempt=1)],
        days={phone(630): "20261130"},
        token="dead",
        retry_at=time.time(),
        now=time.time(),
    )
    dead.close()
    worker = start_worker(SMS_JOURNAL_DIR=journal_dir)
    wait_for(lambda: "holds 1 answers of an appId" in worker.log(), 30, what="the warning")
    assert str(gone) in worker.log()
    assert [e.entry["message_id"] for e in on_disk(gone)] == ["m-gone"]
