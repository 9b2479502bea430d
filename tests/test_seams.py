"""Where the merged branches meet: the answer journal (issue 10) against the ledger's
LedgerBroken (issue 11), the accounts file (issue 12) against the secret rules. Each test was
written to break the merged whole; real redis-server, the simulator over real HTTP.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import redis
from helpers import record_accepted
from test_dispatch import make, request

from polyv_sms.errors import LedgerBroken
from polyv_sms.ledger import Settlement
from polyv_sms.ledger.journal import Journal, JournalReplayer, on_disk
from polyv_sms.ledger.reconcile import Reconciler
from polyv_sms.polyv.simulator import PolyvSimulator

N1, N2, N3 = "13900002001", "13900002002", "13900002003"


def _meta(numbers: list[str]) -> dict[str, Any]:
    return {
        "task_id": "t",
        "phone_numbers": numbers,
        "template_param_names": ["code"],
        "template_param_values": ["1"],
        "created_at": 0,
    }


def test_a_journal_entry_the_ledger_refuses_does_not_hold_up_the_other_answers(
    client, account, clock, tmp_path: Path
) -> None:
    """One message whose record the ledger refuses (WRONGTYPE: LedgerBroken since issue 11)
    kept every later journal entry of the account from the ledger, and stopped the account's
    reconciler sweeping, for as long as the entry was there."""
    journal = Journal(tmp_path / "journal", account[0])
    dead = Journal(tmp_path / "journal", account[0])  # another worker process, which dies
    with PolyvSimulator(*account, clock=clock) as sim:
        d = make(client, account, sim.url, clock, journal=journal)
        ledger = d.ledger
        # The oldest entry: its message record was clobbered by something else.
        client.set(ledger.keys.message("poisoned"), "not a hash")
        dead.record(
            "poisoned",
            [Settlement(N1, "accepted", 12, "s-p^0", attempt=1)],
            days={N1: ledger.day()},
            token="dead",
            retry_at=clock.now,
            now=clock.now,
        )
        # A later answer of another message, read by a worker that died before its settle.
        record_accepted(
            dead, ledger, "good", N2, "s-g^0", token="dead2", now=clock.now, meta=_meta([N2])
        )
        # And a message whose retry never ran: the reconciler's business.
        ledger.reserve("late", [N3], token="gone", meta=_meta([N3]))
        dead.close()  # (the worker dies: another one takes its answers over)

        JournalReplayer(journal, ledger).replay_once()  # (the worker's thread, one pass)
        assert ledger.peek("good", [N2])[N2].state == "accepted"
        assert [e.token for e in journal.entries()] == ["dead"]  # kept, not .bad
        assert not list(journal.directory.glob("*.bad"))

        clock.now += 3600
        enqueued: list[Any] = []
        swept = Reconciler(
            ledger, lambda *a: enqueued.append(a), interval_s=5, journal=journal
        ).sweep()
        assert swept == ["late"]

        # The poisoned message itself is never sent while its answer waits in the journal.
        with pytest.raises(LedgerBroken):
            d.run(request([N1], "poisoned"), message_id="poisoned", task_id="t2")
        assert sim.received(N1) == 0
    assert len(journal.entries()) == 1
    assert [e.entry["message_id"] for e in on_disk(journal.directory)] == ["poisoned"]


def test_a_journal_entry_the_settle_script_refuses_is_set_aside_and_the_rest_replayed(
    client, account, clock, tmp_path: Path
) -> None:
    """The script's own refusal comes wrapped in LedgerBroken since issue 11: the entry must
    still be set aside (not replayed forever) and the next entry replayed."""
    journal = Journal(tmp_path / "journal", account[0])
    dead = Journal(tmp_path / "journal", account[0])  # another worker process, which dies
    d = make(client, account, "http://127.0.0.1:9", clock, journal=journal)
    dead.record(
        "bad", [Settlement(N1, "no-such-action")], days={}, token="t", retry_at=0, now=clock.now
    )
    record_accepted(
        dead, d.ledger, "good2", N2, "s-g2^0", token="x", now=clock.now, meta=_meta([N2])
    )
    dead.close()
    assert journal.replay(d.ledger) == 1
    assert journal.entries() == []
    # The dead worker's file is gone (nothing left in it); the refused entry set aside.
    assert sorted(p.suffix for p in journal.directory.iterdir()) == [".bad"]
    assert d.ledger.peek("good2", [N2])[N2].state == "accepted"


@pytest.mark.parametrize("key", ["app_secret_env", "app_secret_file"])
def test_a_secret_pasted_where_its_variable_or_file_belongs_is_never_echoed(
    tmp_path: Path, key: str
) -> None:
    """The likeliest way a secret ends up in the accounts file: pasted as the value of
    ``app_secret_env`` (or ``app_secret_file``). The error then echoed it - to the worker's
    stderr, supervisord's log and every log collector."""
    from polyv_sms.accounts import load_accounts
    from polyv_sms.config import Settings
    from polyv_sms.errors import ConfigError

    pasted = "Zx9fK2mQ7pLw4RtY8vBn"  # what a Polyv appSecret looks like
    path = tmp_path / "accounts.toml"
    path.write_text(f'[accounts.shop-b]\napp_id = "appB"\n{key} = "{pasted}"\n')
    with pytest.raises(ConfigError) as caught:
        load_accounts(Settings(accounts_file=str(path)), env={})
    message = str(caught.value)
    assert pasted not in message
    assert "[accounts.shop-b]" in message
    assert key in message


@pytest.mark.parametrize(("lane", "queue"), [("urgent", "sms.urgent"), ("bulk", "sms.bulk")])
def test_a_misrouted_message_is_moved_to_its_lanes_queue(
    tmp_path: Path, lane: str, queue: str
) -> None:
    """The mover of mis-routed tasks (issue 13) moved every one to ``sms``: a login code
    enqueued by name with ``lane="urgent"`` and no queue then waited behind the standard
    backlog (issue 12's promise), and a bulk one jumped ahead of it."""
    from celery import Celery
    from helpers import RedisServer

    from polyv_sms.misrouted import MisroutedMover

    server = RedisServer(tmp_path / "own").start()
    try:
        app = Celery(broker=server.url(0))
        app.send_task(
            "polyv_sms.send_sms",
            kwargs={
                "phone_numbers": [N1],
                "template_param_names": ["code"],
                "template_param_values": ["1"],
                "lane": lane,
            },
        )
        mover = MisroutedMover.for_broker(server.url(0))
        assert mover is not None
        assert len(mover.sweep()) == 1
        with server.client(0) as broker:
            assert broker.llen("celery") == 0
            assert broker.llen("sms") == 0
            (moved,) = broker.lrange(queue, 0, -1)
        import json

        assert json.loads(moved)["properties"]["delivery_info"]["routing_key"] == queue
        mover.client.close()
    finally:
        server.stop()


def test_an_answer_the_broken_ledger_refused_is_kept_durably_and_never_sent_again(
    client, account, clock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Polyv answered, and the settle met an error retrying will not clear (LedgerBroken,
    issue 11: here the message record clobbered while the request was in flight). The answer
    must stay in the journal - made durable, since it now waits for an operator, not for a
    restart - and the message must not be sent again meanwhile, nor once the ledger is fixed."""
    from test_answers_kept import flushed, fsyncs, hook_after_send

    journal = Journal(tmp_path / "journal", account[0])
    with PolyvSimulator(*account, clock=clock) as sim:
        d = make(client, account, sim.url, clock, journal=journal)
        key = d.ledger.keys.message("lb")
        saved: dict[str, Any] = {}

        def clobber() -> None:
            saved.update(client.hgetall(key))
            client.delete(key)
            client.set(key, "not a hash")

        hook_after_send(d, clobber)
        synced = fsyncs(monkeypatch)
        with pytest.raises(LedgerBroken):
            d.run(request([N1], "lb"), message_id="lb", task_id="t1")
        (entry,) = journal.entries("lb")
        assert flushed(entry) in synced  # the entry's pages
        assert str(journal.directory) in synced  # (when its segment file was created)
        # While the ledger is broken, no run sends it again.
        again = make(client, account, sim.url, clock, journal=journal)
        with pytest.raises(LedgerBroken):
            again.run(request([N1], "lb"), message_id="lb", task_id="t2")
        assert sim.received(N1) == 1
        # The operator puts the record back: the answer reaches the ledger, nothing is resent.
        client.delete(key)
        client.hset(key, mapping=saved)
        outcome = again.run(request([N1], "lb"), message_id="lb", task_id="t2")
        assert outcome.result is not None
        assert outcome.result["results"][0]["outcome"] == "accepted"
        assert sim.received(N1) == 1
    assert journal.entries() == []
    assert on_disk(journal.directory) == []


def test_a_secret_file_that_is_not_utf8_is_a_clear_config_error(tmp_path: Path) -> None:
    """A secret file saved as UTF-16 (a Windows editor) crashed the loader with a
    UnicodeDecodeError - not the ConfigError naming the account and key that every other
    bad secret gets (and that the worker turns into a clear refusal to start)."""
    from polyv_sms.accounts import load_accounts
    from polyv_sms.config import Settings
    from polyv_sms.errors import ConfigError

    secret = tmp_path / "b.secret"
    secret.write_bytes("Zx9fK2mQ7pLw4RtY8vBn".encode("utf-16"))
    path = tmp_path / "accounts.toml"
    path.write_text(f'[accounts.shop-b]\napp_id = "appB"\napp_secret_file = "{secret}"\n')
    with pytest.raises(ConfigError, match=r"\[accounts.shop-b\]: app_secret_file .* UTF-8"):
        load_accounts(Settings(accounts_file=str(path)), env={})


def test_an_accounts_file_that_is_not_utf8_is_a_clear_config_error(tmp_path: Path) -> None:
    from polyv_sms.accounts import load_accounts
    from polyv_sms.config import Settings
    from polyv_sms.errors import ConfigError

    path = tmp_path / "accounts.toml"
    path.write_bytes('[accounts.b]\napp_id = "x"\napp_secret_env = "B"\n'.encode("utf-16"))
    with pytest.raises(ConfigError, match=r"SMS_ACCOUNTS_FILE=.*not UTF-8"):
        load_accounts(Settings(accounts_file=str(path)), env={"B": "s"})


@pytest.mark.parametrize("with_default", [True, False])
def test_the_simulator_command_knows_every_account_of_the_accounts_file(
    account, tmp_path: Path, with_default: bool
) -> None:
    """``polyv-sms simulator`` is how an operator tries a deployment without sending SMS.
    With an accounts file (issue 12) it knew only POLYV_APP_ID: every message of another
    account failed with a bad sign, and a deployment with only the file could not start it."""
    import os
    import signal
    import subprocess
    import sys

    from helpers import free_port, wait_for

    from polyv_sms.polyv.client import PolyvClient

    app_a, secret_a = account
    app_b, secret_b = f"appB{account[0][-6:]}", "secB-0123456789abcdef"
    path = tmp_path / "accounts.toml"
    path.write_text(f'[accounts.shop-b]\napp_id = "{app_b}"\napp_secret_env = "SHOP_B"\n')
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("POLYV_", "SMS_"))}
    env |= {"SMS_ACCOUNTS_FILE": str(path), "SHOP_B": secret_b}
    if with_default:
        env |= {"POLYV_APP_ID": app_a, "POLYV_APP_SECRET": secret_a}
    polyv_sms = str(Path(sys.executable).parent / "polyv-sms")
    process = subprocess.Popen(
        [polyv_sms, "simulator", "--port", str(port)], env=env, stderr=subprocess.PIPE, text=True
    )
    accounts = [(app_b, secret_b)] + ([(app_a, secret_a)] if with_default else [])
    try:
        for app_id, secret in accounts:
            with PolyvClient(app_id, secret, f"http://127.0.0.1:{port}", 2) as client:

                def send(client: PolyvClient = client) -> list[int] | None:
                    try:
                        return [r.status for r in client.send([N1], ["code"], ["1"]).results]
                    except Exception as exc:
                        if process.poll() is not None:
                            raise AssertionError(f"the simulator exited: {exc}") from None
                        if "sign" in str(exc) or "appId" in str(exc):
                            raise
                        return None

                assert wait_for(send, 15, what="the simulator") == [12]
    finally:
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=10)
    assert secret_b not in err
    assert secret_a not in err


def test_a_lease_taken_after_an_outage_lasts_its_whole_length(client, account, clock) -> None:
    """Invariant 8 (issues 10 and 14): a run's lease must outlive the exchange and the settle.
    ``reserve`` computed "now" once, before riding out a Redis outage (issue 11's in-place
    retry): a reserve that got through after 20 s of outage wrote a lease that had already
    lost those 20 s - here the lease ended before the exchange could, and another run could
    take the numbers over while Polyv was still answering."""
    d = make(client, account, "http://127.0.0.1:9", clock)
    ledger = d.ledger
    real = ledger._reserve
    outage_s = 20.0
    calls: list[float] = []

    def flaky(*args: Any, **kwargs: Any) -> Any:
        calls.append(clock.now)
        if len(calls) == 1:
            clock.now += outage_s  # the outage the ledger rode out
            raise redis.ConnectionError("Redis restarting")
        return real(*args, **kwargs)

    ledger._reserve = flaky  # type: ignore[method-assign]
    reservation = ledger.reserve("lo", [N1], token="run", meta=_meta([N1]))
    assert reservation.states[0].state == "send"
    got_through = calls[-1]
    lease_until_ms = int(client.hget(ledger.keys.message("lo"), "lease_until"))
    assert lease_until_ms / 1000 >= got_through + ledger.lease_s - 0.01
    # The record's own time (the replay identity) is still the first attempt's.
    assert client.hget(ledger.keys.message("lo"), "lease_at") == str(int(calls[0] * 1000))


def test_a_look_up_in_another_account_names_that_account(redis_server, tmp_path: Path) -> None:
    """``polyv-sms status/receipt/dead --requeue --account shop-b`` said "no message in the
    ledger of this account (POLYV_APP_ID)" - the one account it had not looked in."""
    import os
    import subprocess
    import sys

    path = tmp_path / "accounts.toml"
    path.write_text('[accounts.shop-b]\napp_id = "appB-lookup"\napp_secret_env = "SHOP_B"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith(("POLYV_", "SMS_"))}
    env |= {
        "POLYV_APP_ID": "appA-lookup",
        "POLYV_APP_SECRET": "secA",
        "SMS_ACCOUNTS_FILE": str(path),
        "SMS_REDIS_URL": redis_server.url(2),
    }
    polyv_sms = str(Path(sys.executable).parent / "polyv-sms")
    for command in (["status", "nope"], ["receipt", "s-nope"], ["dead", "--requeue", "nope"]):
        done = subprocess.run(
            [polyv_sms, *command, "--account", "shop-b"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode != 0
        assert "account 'shop-b'" in done.stderr, done.stderr
        assert "POLYV_APP_ID" not in done.stderr


def test_polyvs_block_pauses_every_account_of_the_deployment(
    account, redis_server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Polyv blocks an IP, not an account, for 5 minutes past its rate (docs/polyv-sms-api.md).
    The shared pause (issue 12) stopped only the account that saw the answer: every other
    account of the deployment kept sending into the block, each discovering it on its own."""
    from polyv_sms.config import Settings
    from polyv_sms.runtime import build_runtime

    app_a, secret_a = account
    app_b, secret_b = f"appB{app_a[-6:]}", "secB-0123456789abcdef"
    path = tmp_path / "accounts.toml"
    path.write_text(f'[accounts.shop-b]\napp_id = "{app_b}"\napp_secret_env = "SHOP_B"\n')
    monkeypatch.setenv("SHOP_B", secret_b)
    with PolyvSimulator(app_a, secret_a, other_accounts={app_b: secret_b}) as sim:
        sim.set_faults(rate_limit_rate=1.0)
        settings = Settings.from_env(
            {
                "POLYV_APP_ID": app_a,
                "POLYV_APP_SECRET": secret_a,
                "POLYV_API_BASE": sim.url,
                "SMS_ACCOUNTS_FILE": str(path),
                "SMS_REDIS_URL": redis_server.url(2),
                "SMS_JOURNAL_DIR": "off",
            }
        )
        runtime = build_runtime(settings)
        try:
            a, b = runtime.account("default"), runtime.account("shop-b")
            outcome = a.dispatcher.run(request([N1], "blocked"), message_id="blocked", task_id="t")
            assert outcome.reason == "pending"
            assert a.dispatcher.guard is not None
            assert b.dispatcher.guard is not None
            assert a.dispatcher.guard.paused_for() > 290
            assert b.dispatcher.guard.paused_for() > 290
            seen = len(sim.requests())
            put_off = b.dispatcher.run(request([N2], "other"), message_id="other", task_id="t2")
            assert put_off.reason == "paused"
            assert len(sim.requests()) == seen
        finally:
            for guard in (runtime.account("default"), runtime.account("shop-b")):
                assert guard.dispatcher.guard is not None
                guard.dispatcher.guard.clear()
            runtime.close()
