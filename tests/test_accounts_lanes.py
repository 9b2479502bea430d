"""Accounts, lanes and the shared rate guard with real workers (issue 12): a private
redis-server, worker subprocesses consuming the three lanes, the simulator over HTTP, and the
``polyv-sms`` command with ``--account``."""

from __future__ import annotations

import secrets
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from celery import Celery
from conftest import worker_env
from helpers import WorkerProcess, empty_broker, wait_for
from test_cli import run, run_json

from polyv_sms import send_sms
from polyv_sms.accounts import load_accounts
from polyv_sms.config import Secret, Settings
from polyv_sms.errors import ConfigError, InvalidRequest
from polyv_sms.lanes import WORKER_QUEUES
from polyv_sms.polyv.simulator import PolyvSimulator

TIMEOUT = 60


def numbers(count: int, start: int) -> list[str]:
    return [f"137{i:08d}" for i in range(start, start + count)]


@pytest.fixture
def lane_workers(
    account: tuple[str, str], sim: PolyvSimulator, redis_server, tmp_path: Path
) -> Iterator[Callable[..., WorkerProcess]]:
    """Start workers as documented: ``-Q sms.urgent,sms,sms.bulk``."""
    started: list[WorkerProcess] = []

    def start(concurrency: int = 4, simulator: PolyvSimulator | None = None, **env: object):
        environment = worker_env(account, simulator or sim, redis_server, **env)
        worker = WorkerProcess(
            environment,
            tmp_path / f"worker-{len(started)}.log",
            concurrency=concurrency,
            name=f"lanes{len(started)}",
            extra_args=("-Q", ",".join(WORKER_QUEUES)),
        )
        started.append(worker)
        return worker.start()

    yield start
    for worker in started:
        worker.stop()
    empty_broker(redis_server)


def accounts_file(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "accounts.toml"
    path.write_text(body)
    return path


# --- the accounts file ----------------------------------------------------------------------


def test_a_secret_in_the_accounts_file_is_refused_naming_the_account_and_key(
    tmp_path: Path,
) -> None:
    path = accounts_file(
        tmp_path, '[accounts.shop-b]\napp_id = "appB"\napp_secret = "s3cr3t-in-the-file"\n'
    )
    settings = Settings(accounts_file=str(path))
    with pytest.raises(ConfigError) as caught:
        load_accounts(settings, env={})
    message = str(caught.value)
    assert "[accounts.shop-b]" in message
    assert "'app_secret'" in message
    assert "s3cr3t-in-the-file" not in message


def test_an_account_secret_comes_from_its_variable_or_file(tmp_path: Path) -> None:
    secret_file = tmp_path / "c.secret"
    secret_file.write_text("secret-c\n")
    path = accounts_file(
        tmp_path,
        '[accounts.b]\napp_id = "appB"\napp_secret_env = "B_SECRET"\nbulk_headroom = 5\n'
        f'[accounts.c]\napp_id = "appC"\napp_secret_file = "{secret_file}"\npolyv_rate = 7\n',
    )
    settings = Settings(app_id="appA", app_secret=Secret("secret-a"), accounts_file=str(path))
    with pytest.raises(ConfigError, match=r"\[accounts.b\]: app_secret_env names B_SECRET"):
        load_accounts(settings, env={})
    accounts = load_accounts(settings, env={"B_SECRET": "secret-b"})
    assert accounts["b"].app_secret.reveal() == "secret-b"
    assert accounts["b"].bulk_headroom == 5
    assert accounts["c"].app_secret.reveal() == "secret-c"
    assert accounts["c"].polyv_rate == 7.0
    assert "secret-b" not in repr(accounts)


def test_an_account_the_producers_file_does_not_list_is_refused_at_delay() -> None:
    conf = send_sms.app.conf
    saved = conf.get("polyv_sms_account_names")
    conf.polyv_sms_account_names = ["default", "shop-b"]
    try:
        with pytest.raises(InvalidRequest, match="account: unknown account 'shop-z'"):
            send_sms.delay(["13700000001"], ["code"], ["1"], account="shop-z")
        with pytest.raises(InvalidRequest, match="lane: 'fast' is not one of"):
            send_sms.delay(["13700000001"], ["code"], ["1"], lane="fast")
    finally:
        conf.polyv_sms_account_names = saved


# --- accounts with real workers --------------------------------------------------------------


def test_two_accounts_from_one_file_send_through_their_own_app_id_and_sign(
    account, redis_server, lane_workers, tmp_path: Path
) -> None:
    app_a, secret_a = account
    app_b, secret_b = f"appB{secrets.token_hex(4)}", f"secB-{secrets.token_hex(8)}"
    with PolyvSimulator(app_a, secret_a, other_accounts={app_b: secret_b}) as both:
        path = accounts_file(
            tmp_path, f'[accounts.shop-b]\napp_id = "{app_b}"\napp_secret_env = "SHOP_B"\n'
        )
        lane_workers(simulator=both, SMS_ACCOUNTS_FILE=path, SHOP_B=secret_b)
        a = send_sms.delay(["13700000011"], ["code"], ["1"]).get(timeout=TIMEOUT)
        b = send_sms.delay(["13700000012"], ["code"], ["2"], account="shop-b").get(timeout=TIMEOUT)
        assert (a["account"], a["counts"]["accepted"]) == ("default", 1)
        assert (b["account"], b["counts"]["accepted"]) == ("shop-b", 1)
        # The simulator checks each appId's sign with that account's secret.
        sent = {r["numbers"][0]: r["app_id"] for r in both.requests() if r["http_status"] == 200}
        assert sent == {"13700000011": app_a, "13700000012": app_b}

        # An account the worker does not know: a clear failure, nothing sent.
        unknown = send_sms.apply_async(
            kwargs={
                "phone_numbers": ["13700000013"],
                "template_param_names": ["code"],
                "template_param_values": ["3"],
                "account": "shop-z",
            }
        )
        with pytest.raises(InvalidRequest, match="unknown account 'shop-z'"):
            unknown.get(timeout=TIMEOUT)
        assert both.received("13700000013") == 0


def test_a_worker_with_only_an_accounts_file(account, lane_workers, tmp_path: Path) -> None:
    app_id, secret = account  # the simulator's account, named in the file only
    path = accounts_file(
        tmp_path,
        f'[accounts.only]\napp_id = "{app_id}"\napp_secret_file = "{tmp_path}/s"\n'
        "account_daily_limit = 2\nphone_daily_limit = 1\n",
    )
    (tmp_path / "s").write_text(secret + "\n")
    worker = lane_workers(SMS_ACCOUNTS_FILE=path, POLYV_APP_ID="", POLYV_APP_SECRET="")
    sent = send_sms.delay(["13700000031"], ["code"], ["1"], account="only").get(timeout=TIMEOUT)
    assert (sent["account"], sent["counts"]["accepted"]) == ("only", 1)
    with pytest.raises(InvalidRequest, match="unknown account 'default'; this worker knows: only"):
        send_sms.delay(["13700000032"], ["code"], ["1"]).get(timeout=TIMEOUT)
    # The account's own limit bounds its messages (the producer knows only the defaults).
    with pytest.raises(InvalidRequest, match=r"more than account 'only'.s daily limit of 2"):
        send_sms.delay(numbers(3, 40), ["code"], ["1"], account="only").get(timeout=TIMEOUT)
    assert secret not in worker.log()


def test_a_message_stamped_for_another_app_id_is_never_sent(lane_workers, sim) -> None:
    lane_workers()
    other = send_sms.apply_async(
        args=[["13700000021"], ["code"], ["1"]], headers={"polyv_sms_app_id": "someone-else"}
    )
    with pytest.raises(InvalidRequest, match="enqueued for appId 'someone-else'"):
        other.get(timeout=TIMEOUT)
    assert sim.received("13700000021") == 0


# --- lanes -----------------------------------------------------------------------------------


def test_bulk_stops_at_limit_less_headroom_while_urgent_and_standard_use_the_whole_limit(
    lane_workers,
) -> None:
    lane_workers(SMS_ACCOUNT_DAILY_LIMIT=6, SMS_PHONE_DAILY_LIMIT=1, SMS_BULK_HEADROOM=2)
    bulk = send_sms.delay(numbers(5, 100), ["code"], ["1"], lane="bulk").get(timeout=TIMEOUT)
    assert bulk["lane"] == "bulk"
    assert [r["outcome"] for r in bulk["results"]] == ["accepted"] * 4 + ["account_quota_exceeded"]
    more_bulk = send_sms.delay(numbers(1, 110), ["code"], ["1"], lane="bulk").get(timeout=TIMEOUT)
    assert more_bulk["counts"]["account_quota_exceeded"] == 1
    urgent = send_sms.delay(numbers(1, 120), ["code"], ["1"], lane="urgent").get(timeout=TIMEOUT)
    standard = send_sms.delay(numbers(2, 130), ["code"], ["1"]).get(timeout=TIMEOUT)
    assert (urgent["lane"], urgent["counts"]["accepted"]) == ("urgent", 1)
    # The fifth and sixth units; the seventh number meets the account's whole limit.
    assert [r["outcome"] for r in standard["results"]] == ["accepted", "account_quota_exceeded"]


def test_urgent_overtakes_a_bulk_backlog(lane_workers, sim, redis_server) -> None:
    sim.set_faults(latency_s=0.05)
    lane_workers(concurrency=2)
    backlog = [
        send_sms.delay(numbers(1, 1000 + i), ["code"], ["1"], lane="bulk") for i in range(120)
    ]
    wait_for(lambda: len(sim.requests()) >= 5, 30, what="the bulk backlog to start")
    # Six urgent messages land in sms.urgent at once (staged under a prefix, then renamed),
    # so that the order the worker takes them in is the broker's, not the producer's pace.
    stager = Celery("stager", broker=redis_server.url(0))
    stager.conf.update(
        task_serializer="json",
        broker_transport_options={"global_keyprefix": "stage:"},
        broker_connection_retry_on_startup=True,
    )
    urgent = numbers(6, 2000)
    for number in urgent:
        kwargs = {
            "phone_numbers": [number],
            "template_param_names": ["code"],
            "template_param_values": ["1"],
            "lane": "urgent",
        }
        stager.send_task("polyv_sms.send_sms", kwargs=kwargs, queue="sms.urgent")
    stager.close()
    redis_server.client(0).rename("stage:sms.urgent", "sms.urgent")
    wait_for(lambda: all(sim.received(n) for n in urgent), TIMEOUT, what="the urgent messages")
    order = [r["numbers"][0] for r in sim.requests()]
    positions = sorted(order.index(n) for n in urgent)
    # Urgent work is always taken first: once the first urgent message went out, no bulk
    # message started until the last one had (a round-robin over the queues interleaves them).
    assert positions == list(range(positions[0], positions[0] + len(urgent))), positions
    assert sum(1 for p in backlog if p.ready()) < 100


def test_a_retry_stays_in_its_lane(account, sim, redis_server, tmp_path: Path) -> None:
    # A worker that consumes only sms.urgent: a retry published to any other queue would
    # never run.
    env = worker_env(account, sim, redis_server)
    worker = WorkerProcess(
        env, tmp_path / "urgent-only.log", concurrency=2, name="urgent-only",
        extra_args=("-Q", "sms.urgent"),
    ).start()  # fmt: skip
    try:
        sim.set_faults(fail_numbers={"13700000041": 2})
        done = send_sms.delay(["13700000041"], ["code"], ["1"], lane="urgent").get(timeout=TIMEOUT)
        assert (done["lane"], done["results"][0]["attempts"]) == ("urgent", 3)
        assert done["counts"]["accepted"] == 1
    finally:
        worker.stop()
        empty_broker(redis_server)


# --- the shared rate guard -------------------------------------------------------------------


def _max_in_one_second(times: list[float]) -> int:
    times = sorted(times)
    best, start = 0, 0
    for end, moment in enumerate(times):
        while moment - times[start] >= 1.0:
            start += 1
        best = max(best, end - start + 1)
    return best


def test_the_shared_limiter_holds_across_two_worker_processes(lane_workers, sim) -> None:
    rate = 5
    for _ in range(2):
        lane_workers(concurrency=4, SMS_POLYV_RATE=rate)
    pending = [send_sms.delay(numbers(1, 3000 + i), ["code"], ["1"]) for i in range(24)]
    for item in pending:
        assert item.get(timeout=TIMEOUT)["counts"]["accepted"] == 1
    busiest = _max_in_one_second([float(r["received_at"]) for r in sim.requests()])
    # rate * (1 + RATE_BURST_S) + 1 = 6 at most, plus one for a thread that the loaded
    # machine holds back past its slot; without the guard all 24 go within a second or two.
    assert busiest <= rate + 2, busiest


def test_a_rate_limit_answer_pauses_every_worker(lane_workers, sim, redis_server, account) -> None:
    for _ in range(2):
        lane_workers(concurrency=2)
    sim.set_faults(rate_limit_rate=1.0)
    first = send_sms.delay(numbers(1, 4000), ["code"], ["1"])
    ledger = redis_server.client(2)
    pause_key = f"polyv_sms:{{{account[0]}}}:paused"
    wait_for(lambda: ledger.exists(pause_key), 30, what="the shared pause")
    sim.set_faults(rate_limit_rate=0.0)
    assert 290_000 < ledger.pttl(pause_key) <= 300_000
    seen = len(sim.requests())
    later = [send_sms.delay(numbers(1, 4100 + i), ["code"], ["1"]) for i in range(6)]
    time.sleep(3)  # both workers poll the pause meanwhile (SMS_RETRY_BACKOFF_MAX=0.5)
    assert len(sim.requests()) == seen, "a worker sent while Polyv was blocking us"
    ledger.delete(pause_key)  # what `polyv-sms pause --clear` does when Polyv unblocks early
    for item in [first, *later]:
        result = item.get(timeout=TIMEOUT)
        assert result["counts"]["accepted"] == 1
    # Waiting out the pause burned no attempt.
    assert all(item.get()["results"][0]["attempts"] == 1 for item in later)


def test_waiting_for_the_rate_guard_never_gives_a_message_up(lane_workers) -> None:
    # One attempt each, so the task gives up after 4 * 1 + 20 retries; at one request a
    # second the last of 12 messages waits far more retries than that for its slot.
    worker = lane_workers(
        SMS_POLYV_RATE=1, SMS_MAX_ATTEMPTS=1, SMS_RETRY_BACKOFF=0.01, SMS_RETRY_BACKOFF_MAX=0.05
    )
    pending = [send_sms.delay(numbers(1, 5000 + i), ["code"], ["1"]) for i in range(12)]
    results = [item.get(timeout=TIMEOUT) for item in pending]
    assert [r["results"][0]["outcome"] for r in results] == ["accepted"] * 12
    assert [r["results"][0]["attempts"] for r in results] == [1] * 12
    assert "rate; again in" in worker.log()


# --- the command line ------------------------------------------------------------------------


def test_account_on_every_command_and_requeue_through_the_same_account(
    account, redis_server, lane_workers, tmp_path: Path
) -> None:
    app_a, secret_a = account
    app_b, secret_b = f"appB{secrets.token_hex(4)}", f"secB-{secrets.token_hex(8)}"
    path = tmp_path / "accounts.toml"
    path.write_text(
        f'[accounts.shop-b]\napp_id = "{app_b}"\napp_secret_env = "SHOP_B"\nbulk_headroom = 3\n'
    )
    good, bad = "13700000601", "13700000602"
    with PolyvSimulator(app_a, secret_a, other_accounts={app_b: secret_b}) as both:
        both.set_faults(fail_numbers={bad: 1000})
        lane_workers(simulator=both, SMS_ACCOUNTS_FILE=path, SHOP_B=secret_b, SMS_MAX_ATTEMPTS=1)
        # The command's environment has the file but not the secret: look-ups need none.
        env = worker_env(account, both, redis_server, SMS_ACCOUNTS_FILE=path)
        # Exit 3: a number did not end accepted.
        sent = run_json(
            env, "send", good, bad, "-p", "code=1", "--message-id", "m-b", "--account",
            "shop-b", "--lane", "urgent", "--wait", code=3,
        )  # fmt: skip
        assert (sent["account"], sent["lane"]) == ("shop-b", "urgent")
        assert [r["outcome"] for r in sent["results"]] == ["accepted", "failed"]

        status = run_json(env, "status", "m-b", "--account", "shop-b")
        assert {n["phone_number"]: n["state"] for n in status["numbers"]} == {
            good: "accepted",
            bad: "failed",
        }
        assert "no message 'm-b'" in run(env, "status", "m-b", code=1).stderr
        assert run_json(env, "quota", "--account", "shop-b")["account"]["used"] == 1
        assert run_json(env, "quota")["account"]["used"] == 0
        assert [d["message_id"] for d in run_json(env, "dead", "--account", "shop-b")] == ["m-b"]
        assert run_json(env, "dead") == []

        # Requeue goes out through shop-b again, in its lane.
        both.set_faults(fail_numbers={})
        again = run_json(env, "dead", "--account", "shop-b", "--requeue", "m-b", "--wait")
        assert (again["account"], again["lane"]) == ("shop-b", "urgent")
        assert [r["outcome"] for r in again["results"]] == ["accepted", "accepted"]
        assert {r["app_id"] for r in both.requests() if bad in r["numbers"]} == {app_b}
        assert both.received(good) == 1

        listed = run_json(env, "accounts")
        assert [(a["account"], a["app_id"], a["bulk_limit"]) for a in listed] == [
            ("default", app_a, 2000 - 200),
            ("shop-b", app_b, 2000 - 3),
        ]
        assert secret_a not in run(env, "accounts").stdout

        paused = run_json(env, "pause", "--account", "shop-b", "--set", "60")
        assert 50 < paused["paused_for_s"] <= 60
        assert run_json(env, "pause")["paused_for_s"] == 0  # the default account is not paused
        cleared = run_json(env, "pause", "--account", "shop-b", "--clear")
        assert (cleared["cleared"], cleared["paused_for_s"]) == (True, 0)
        assert run_json(env, "reconcile", "--account", "shop-b") == {"enqueued": []}
        unknown = run(env, "status", "x", "--account", "shop-z", code=2)
        assert "no such account" in unknown.stderr


# --- RabbitMQ ----------------------------------------------------------------------------------


@pytest.fixture
def rabbit_vhost() -> Iterator[str]:
    """A RabbitMQ vhost of this test's own on 127.0.0.1:5672 (guest), deleted afterwards."""
    ctl = shutil.which("rabbitmqctl")
    if ctl is None:
        pytest.skip("no rabbitmqctl")
    vhost = f"polyv-sms-test-{uuid.uuid4().hex[:8]}"
    made = subprocess.run([ctl, "add_vhost", vhost], capture_output=True, check=False, timeout=60)
    if made.returncode != 0:
        pytest.skip(f"RabbitMQ not available: {made.stderr.decode(errors='replace')[:200]}")
    try:
        subprocess.run(
            [ctl, "set_permissions", "-p", vhost, "guest", ".*", ".*", ".*"],
            capture_output=True,
            check=True,
            timeout=60,
        )
        yield vhost
    finally:
        subprocess.run([ctl, "delete_vhost", vhost], capture_output=True, check=False, timeout=60)


def test_urgent_overtakes_a_bulk_backlog_on_rabbitmq(
    rabbit_vhost, account, sim, redis_server, tmp_path: Path
) -> None:
    broker = f"amqp://guest:guest@127.0.0.1:5672/{rabbit_vhost}"
    env = worker_env(account, sim, redis_server, SMS_BROKER_URL=broker)
    sim.set_faults(latency_s=0.05)
    worker = WorkerProcess(
        env,
        tmp_path / "worker-rabbit.log",
        concurrency=2,
        name="rabbit",
        extra_args=("-Q", ",".join(WORKER_QUEUES)),
    ).start()
    producer = Celery("rabbit-producer", broker=broker)
    producer.conf.update(task_serializer="json", broker_connection_retry_on_startup=True)
    try:

        def enqueue(number: str, lane: str) -> None:
            kwargs = {
                "phone_numbers": [number],
                "template_param_names": ["code"],
                "template_param_values": ["1"],
                "lane": lane,
            }
            queue = {"bulk": "sms.bulk", "urgent": "sms.urgent"}[lane]
            producer.send_task("polyv_sms.send_sms", kwargs=kwargs, queue=queue)

        for i in range(120):
            enqueue(numbers(1, 6000 + i)[0], "bulk")
        wait_for(lambda: len(sim.requests()) >= 5, 30, what="the bulk backlog to start")
        seen = len(sim.requests())
        urgent = [numbers(1, 6500 + i)[0] for i in range(3)]
        for number in urgent:
            enqueue(number, "urgent")
        wait_for(lambda: all(sim.received(n) for n in urgent), TIMEOUT, what="the urgent messages")
        order = [r["numbers"][0] for r in sim.requests()]
        last_urgent = max(order.index(n) for n in urgent)
        # RabbitMQ serves the three queues of one consumer side by side, not in a strict
        # order: urgent work waits for the messages already prefetched and about one bulk
        # message per urgent one, never for the backlog of about 100 behind them.
        assert last_urgent - seen < 3 * 2 + 2 * 2 + 4, (seen, last_urgent)
        assert len(order) < 100
    finally:
        worker.stop()
        producer.close()


def test_an_account_with_a_larger_limit_takes_larger_messages(tmp_path: Path) -> None:
    from polyv_sms.accounts import widest
    from polyv_sms.worker import celery_config

    path = accounts_file(
        tmp_path,
        '[accounts.big]\napp_id = "appBig"\napp_secret_env = "X"\naccount_daily_limit = 5000\n',
    )
    settings = Settings(accounts_file=str(path))
    assert widest(settings).account_daily_limit == 5000
    config = celery_config(settings)
    # The producer accepts a message as large as the largest account allows, and the task's
    # time limit covers its 25 Polyv requests (the worker checks each account's own limit).
    assert config["polyv_sms_account_daily_limit"] == 5000
    assert config["task_time_limit"] == widest(settings).task_time_limit_s
    assert config["task_time_limit"] > Settings().task_time_limit_s


def test_an_app_id_without_its_secret_is_refused_even_with_an_accounts_file(
    tmp_path: Path,
) -> None:
    path = accounts_file(tmp_path, '[accounts.b]\napp_id = "appB"\napp_secret_env = "B"\n')
    settings = Settings(app_id="appA", accounts_file=str(path))
    with pytest.raises(ConfigError, match="POLYV_APP_SECRET must be set"):
        load_accounts(settings, env={"B": "secret-b"})


def test_every_accounts_secret_is_redacted_from_worker_logs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import io
    import logging

    from polyv_sms import worker

    path = accounts_file(tmp_path, '[accounts.b]\napp_id = "appB"\napp_secret_env = "B_SECRET"\n')
    monkeypatch.setenv("SMS_ACCOUNTS_FILE", str(path))
    monkeypatch.setenv("B_SECRET", "secret-of-b-123")
    monkeypatch.setenv("POLYV_APP_ID", "appA")
    monkeypatch.setenv("POLYV_APP_SECRET", "secret-of-a-456")
    stream = io.StringIO()
    logger = logging.getLogger(f"redaction-{uuid.uuid4().hex}")
    logger.addHandler(logging.StreamHandler(stream))
    logger.propagate = False
    worker._redact_logs(logger)
    logger.warning("oops: %s and %s", "secret-of-b-123", "secret-of-a-456")
    assert "secret-of" not in stream.getvalue()
    assert stream.getvalue().count("**********") == 2
