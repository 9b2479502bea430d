"""Issue 11: the HA set-ups carry real traffic through a real worker while they change.

Each test starts its own infrastructure (a 3-master Redis Cluster, a Sentinel set, a RabbitMQ
vhost with quorum queues), a worker subprocess and the simulator answering status 11 to a third
of the numbers, enqueues 20 messages, reshards / fails over / drops the broker connections in
the middle, and checks what a user would: every number final, none accepted twice, each
receipt found with ``polyv-sms receipt``.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from helpers import WorkerProcess, wait_for
from kombu import Connection, Exchange, Queue
from redis.crc import key_slot

from polyv_sms.config import Settings
from polyv_sms.ledger import FINAL_STATES, build_ledger, connect_redis
from polyv_sms.ledger.receipts import Receipts
from polyv_sms.polyv.simulator import PolyvSimulator
from polyv_sms.worker import TASK_NAME, project_config

from .infra import Cluster, SentinelSet, Vhost, rabbitmq_available

MESSAGES = 20
CLI = [sys.executable, "-c", "from polyv_sms.cli.command import main; main()"]
SIM_FAULTS = {"status11_rate": 0.3, "seed": 11}


@pytest.fixture
def ha_dir() -> Iterator[Path]:
    directory = Path(tempfile.mkdtemp(prefix="polyv-sms-ha-"))
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def ha_sim(account: tuple[str, str]) -> Iterator[PolyvSimulator]:
    app_id, secret = account
    simulator = PolyvSimulator(app_id, secret).start()
    simulator.set_faults(**SIM_FAULTS)
    yield simulator
    simulator.stop()


def _env(account: tuple[str, str], sim: PolyvSimulator, **settings: object) -> dict[str, str]:
    app_id, secret = account
    env = {k: v for k, v in os.environ.items() if not k.startswith(("POLYV_", "SMS_"))}
    env |= {
        "POLYV_APP_ID": app_id,
        "POLYV_APP_SECRET": secret,
        "POLYV_API_BASE": sim.url,
        "POLYV_HTTP_TIMEOUT": "2",
        "SMS_RETRY_BACKOFF": "0.3",
        "SMS_RETRY_BACKOFF_MAX": "1.5",
        "SMS_REDIS_OUTAGE": "20",
        "SMS_RECONCILE_INTERVAL": "2",
        "SMS_RECONCILE_GRACE": "5",
        "SMS_LEDGER_START_WAIT": "30",
        "PYTHONUNBUFFERED": "1",
    }
    env |= {name: str(value) for name, value in settings.items()}
    return env


@pytest.fixture
def cluster(ha_dir: Path) -> Iterator[Cluster]:
    started = Cluster(ha_dir)
    try:
        yield started.start()
    finally:
        started.stop()


@pytest.fixture
def sentinels(ha_dir: Path) -> Iterator[SentinelSet]:
    started = SentinelSet(ha_dir)
    try:
        yield started.start()
    finally:
        started.stop()


@pytest.fixture
def vhost() -> Iterator[Vhost]:
    if not rabbitmq_available():
        pytest.skip("no RabbitMQ on 127.0.0.1:5672 (rabbitmqctl status failed)")
    created = Vhost()
    if not created.quorum_queues_enabled():
        pytest.skip("RabbitMQ has no quorum queues (feature flag quorum_queue off, RabbitMQ < 3.8)")
    created.create()
    yield created
    created.delete()


@pytest.fixture
def run_worker(tmp_path: Path) -> Iterator[Callable[[dict[str, str]], WorkerProcess]]:
    started: list[WorkerProcess] = []

    def start(env: dict[str, str]) -> WorkerProcess:
        worker = WorkerProcess(env, tmp_path / f"worker-{len(started)}.log", concurrency=4)
        started.append(worker)
        return worker.start(wait=True)

    yield start
    for worker in started:
        worker.stop()


def _numbers(count: int) -> list[str]:
    return [f"176{random.randrange(10**8):08d}" for _ in range(count)]


def _final(receipts: Receipts, message_id: str) -> dict[str, Any] | None:
    status = receipts.message(message_id)
    if not status or status["pending"] or not status["numbers"]:
        return None
    if all(n["state"] in FINAL_STATES for n in status["numbers"]):
        return status
    return None


def carry_messages(
    send: Callable[[list[str], str], object],
    receipts: Receipts,
    sim: PolyvSimulator,
    env: dict[str, str],
    change: Callable[[], object],
) -> dict[str, dict[str, Any]]:
    """Enqueue half the messages, ``change`` the infrastructure once some are done, enqueue
    the rest; wait for every number to end final and check none was accepted twice."""
    asked: dict[str, list[str]] = {}
    for i in range(MESSAGES):
        if i == MESSAGES // 2:
            first = list(asked)
            wait_for(
                lambda first=first: any(_final(receipts, m) for m in first),
                60,
                0.1,
                "a first message to end",
            )
            assert not all(_final(receipts, m) for m in first), "the change came too late"
            change()
        message_id = f"ha-{i}-{uuid.uuid4().hex[:8]}"
        asked[message_id] = _numbers(2)
        send(asked[message_id], message_id)

    done: dict[str, dict[str, Any]] = {}

    def all_final() -> bool:
        for message_id in asked:
            if message_id not in done and (status := _final(receipts, message_id)):
                done[message_id] = status
        return len(done) == len(asked)

    try:
        wait_for(all_final, 150, 0.2, "every message to end")
    except AssertionError:
        left = {m: receipts.message(m) for m in asked if m not in done}
        raise AssertionError(f"{len(left)} messages did not end: {left}") from None

    stats = sim.stats()
    assert stats["by_status"].get("11", 0) > 0, "no status-11 retry happened"
    accepted = []
    for message_id, numbers in asked.items():
        states = {n["phone_number"]: n for n in done[message_id]["numbers"]}
        assert set(states) == set(numbers)
        for number in numbers:
            # Never accepted twice: Polyv saw it accepted at most once.
            assert sim.accepted(number) <= 1, number
            if states[number]["state"] == "accepted":
                assert sim.accepted(number) == 1, number
                accepted.append((number, message_id, states[number]["serial_no"]))
            else:
                assert states[number]["state"] == "failed", states[number]
                assert sim.accepted(number) == 0, number
    assert len(accepted) == stats["accepted"]
    assert len(accepted) >= MESSAGES  # most numbers get through within 5 attempts
    for number, message_id, serial in accepted:
        found = receipts.receipt(serial)
        assert found is not None, serial
        assert (found["phone_number"], found["message_id"]) == (number, message_id)
    # ... and with the command a user runs, against the same ledger.
    for number, message_id, serial in accepted[:2]:
        shown = subprocess.run(
            [*CLI, "receipt", serial, "--json"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert shown.returncode == 0, shown.stderr
        assert number in shown.stdout
        assert message_id in shown.stdout
    return done


def _receipts(env: dict[str, str]) -> Receipts:
    settings = Settings.from_env(env)
    return Receipts(build_ledger(settings, connect_redis(settings.require_redis_url())))


def _producer(env: dict[str, str]) -> Celery:
    """An application configured like the project (``project_config``), enqueueing by name."""
    producer = Celery("ha-producer")
    producer.conf.update(project_config(Settings.from_env(env)))
    return producer


def _by_name(producer: Celery, **options: Any) -> Callable[[list[str], str], object]:
    def send(numbers: list[str], message_id: str) -> object:
        kwargs = {
            "phone_numbers": numbers,
            "template_param_names": ["code"],
            "template_param_values": ["1234"],
            "message_id": message_id,
        }
        return producer.send_task(TASK_NAME, kwargs=kwargs, **options)

    return send


def test_a_redis_cluster_ledger_keeps_working_through_a_reshard(
    cluster: Cluster, account, ha_sim, redis_server, run_worker
) -> None:
    app_id = account[0]
    slot = key_slot(app_id.encode())
    before = cluster.owner(slot)
    target = next(node for node in cluster.nodes if node is not before)
    # The URL names a node that does NOT own the account's slot: a plain client would
    # loop on MOVED (issue 11); the worker detects the cluster and follows redirections.
    env = _env(
        account,
        ha_sim,
        SMS_BROKER_URL=redis_server.url(0),
        SMS_RESULT_BACKEND=redis_server.url(1),
        SMS_REDIS_URL=f"redis://127.0.0.1:{target.port}/0",
    )
    worker = run_worker(env)
    producer = _producer(env)
    moved: list[int] = []
    done = carry_messages(
        _by_name(producer, queue="sms"),
        _receipts(env),
        ha_sim,
        env,
        lambda: moved.append(cluster.move_slot(slot, target)),
    )
    assert moved, "no reshard"
    assert moved[0] > 0, "the reshard moved no ledger key"
    assert cluster.owner(slot) is target
    log = worker.log()
    assert "MovedError" not in log
    assert "LedgerBroken" not in log
    # `polyv-sms status` and `quota` (issue 11: MovedError) on the resharded cluster.
    first = next(iter(done))

    def cli(*command: str) -> str:
        shown = subprocess.run(
            [*CLI, *command, "--json"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert shown.returncode == 0, shown.stderr
        return shown.stdout

    assert first in cli("status", first)
    assert '"used"' in cli("quota")
    producer.close()


def test_sentinel_carries_ledger_broker_and_results_through_a_failover(
    sentinels: SentinelSet, account, ha_sim, run_worker
) -> None:
    env = _env(
        account,
        ha_sim,
        SMS_BROKER_URL=sentinels.url(0),
        SMS_RESULT_BACKEND=sentinels.url(1),
        SMS_REDIS_URL=sentinels.url(2),
    )
    worker = run_worker(env)
    producer = _producer(env)
    first_master = sentinels.master_port()
    by_name = _by_name(producer, queue="sms")
    results: dict[str, Any] = {}

    def send(numbers: list[str], message_id: str) -> object:
        results[message_id] = by_name(numbers, message_id)
        return results[message_id]

    done = carry_messages(send, _receipts(env), ha_sim, env, sentinels.failover)
    assert sentinels.master_port() != first_master
    assert worker.alive()
    # The result backend behind the same Sentinel: a message enqueued after the failover
    # reports its outcome to its caller.
    last = list(results)[-1]
    outcome = results[last].get(timeout=60)
    assert outcome["message_id"] == last
    counts = {state: n for state, n in outcome["counts"].items() if n}
    assert counts == done[last]["counts"]
    producer.close()


def test_an_idle_sentinel_worker_survives_a_failover(
    sentinels: SentinelSet, account, ha_sim, run_worker
) -> None:
    # The common case in production: the worker waits in BRPOP on an empty queue when the
    # master is demoted; Redis answers that BRPOP "-UNBLOCKED ... (master -> replica?)", which
    # Celery took for an unrecoverable error: the worker stopped and nothing was sent again.
    env = _env(
        account,
        ha_sim,
        SMS_BROKER_URL=sentinels.url(0),
        SMS_RESULT_BACKEND=sentinels.url(1),
        SMS_REDIS_URL=sentinels.url(2),
    )
    worker = run_worker(env)
    first_master = sentinels.master_port()
    old = next(n for n in (sentinels.master, sentinels.replica) if n.port == first_master)

    def waiting_in_brpop() -> bool:
        with old.client() as client:
            return any(c["cmd"] == "brpop" and "b" in c["flags"] for c in client.client_list())

    wait_for(waiting_in_brpop, 30, 0.05, "the worker to wait in BRPOP")
    sentinels.failover()
    assert sentinels.master_port() != first_master
    producer = _producer(env)
    message_id = f"idle-{uuid.uuid4().hex[:8]}"
    result = _by_name(producer, queue="sms")(_numbers(2), message_id)
    assert result.get(timeout=60)["message_id"] == message_id  # type: ignore[attr-defined]
    receipts = _receipts(env)
    wait_for(lambda: _final(receipts, message_id), 60, 0.2, "the message to end")
    assert worker.alive()
    assert "Unrecoverable error" not in worker.log()
    producer.close()


def test_rabbitmq_quorum_queues_keep_countdown_retries_working(
    vhost: Vhost, account, ha_sim, redis_server, run_worker
) -> None:
    env = _env(
        account,
        ha_sim,
        SMS_BROKER_URL=vhost.url(),
        SMS_RESULT_BACKEND=redis_server.url(1),
        SMS_REDIS_URL=redis_server.url(2),
        SMS_QUEUE_TYPE="quorum",
        # sub-second countdowns: RabbitMQ's delayed delivery has whole seconds only
        SMS_RETRY_BACKOFF="0.2",
    )
    worker = run_worker(env)
    assert vhost.queues().get("sms") == "quorum"
    # The documented by-name recipe for an application without the package.
    recipe = Celery("recipe", broker=vhost.url())
    recipe.conf.update(task_serializer="json", broker_transport_options={"confirm_publish": True})
    sms = Queue(
        "sms",
        Exchange("sms", type="topic"),
        routing_key="sms",
        queue_arguments={"x-queue-type": "quorum"},
    )
    by_recipe = _by_name(recipe, queue=sms)
    sent: list[str] = []

    def send(numbers: list[str], message_id: str) -> object:
        sent.append(message_id)
        if len(sent) == 1:  # send_sms.delay, through the CLI a user runs
            done = subprocess.run(
                [*CLI, "send", *numbers, "-p", "code=1", "--message-id", message_id],
                env={k: v for k, v in env.items() if k != "POLYV_APP_SECRET"},
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert done.returncode == 0, done.stderr
            return None
        return by_recipe(numbers, message_id)

    carry_messages(send, _receipts(env), ha_sim, env, vhost.close_connections)
    log = worker.log()
    assert "countdown must be a positive number" not in log
    assert "Direct exchanges are not supported" not in log
    assert "PRECONDITION_FAILED" not in log
    assert vhost.queues().get("sms") == "quorum"
    recipe.close()


def test_a_classic_sms_queue_stops_a_quorum_worker_with_the_way_out(
    vhost: Vhost, account, ha_sim, redis_server, run_worker, tmp_path: Path
) -> None:
    # An existing deployment: the classic queue a classic worker declared.
    with Connection(vhost.url()) as connection:
        connection.default_channel.queue_declare(queue="sms", durable=True, auto_delete=False)
    env = _env(
        account,
        ha_sim,
        SMS_BROKER_URL=vhost.url(),
        SMS_RESULT_BACKEND=redis_server.url(1),
        SMS_REDIS_URL=redis_server.url(2),
        SMS_QUEUE_TYPE="quorum",
    )
    worker = WorkerProcess(env, tmp_path / "quorum-on-classic.log")
    worker.start(wait=False)
    try:
        wait_for(lambda: not worker.alive(), 60, 0.1, "the worker to exit")
        assert worker.process is not None
        assert worker.process.returncode == 78
        log = worker.log()
        assert "SMS_QUEUE_TYPE=quorum" in log
        assert "x-queue-type" in log
        assert "operations.md" in log
        assert " ready." not in log
    finally:
        worker.stop()
    assert vhost.queues().get("sms") == "classic"  # left as it was
