"""Issue 11: the worker checks its ledger before it consumes; ledger errors that never clear
end the message instead of looping through the broker; a user's Celery settings win; quorum
countdowns are never rounded to zero."""

from __future__ import annotations

import select
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import fakeredis
import pytest
import redis
from celery import Celery
from helpers import RedisServer, free_port, wait_for

from polyv_sms.config import Settings
from polyv_sms.errors import ConfigError, LedgerBroken, LedgerUnavailable
from polyv_sms.ledger import Keys, build_ledger, connect_redis
from polyv_sms.tasks import _broker_countdown, send_sms
from polyv_sms.worker import celery_config

from .infra import Node


def _exits(worker, timeout: float = 60.0) -> int:
    wait_for(lambda: not worker.alive(), timeout, 0.1, "the worker to exit")
    assert worker.process is not None
    return int(worker.process.returncode)


def test_a_worker_waits_for_an_unreachable_ledger_then_consumes(
    start_worker, tmp_path: Path
) -> None:
    port = free_port()
    worker = start_worker(wait=False, SMS_REDIS_URL=f"redis://127.0.0.1:{port}/0")
    wait_for(lambda: "is unreachable" in worker.log(), 60, 0.1, "the unreachable line")
    time.sleep(1.5)
    log = worker.log()
    assert log.count("is unreachable") == 1  # one clear line, not one per attempt
    assert "SMS_REDIS_URL=redis://127.0.0.1:" in log
    assert "SMS_LEDGER_START_WAIT" in log
    assert " ready." not in log
    assert worker.alive()
    server = RedisServer(tmp_path / "late", port=port).start()
    try:
        worker.wait_ready(60)
        assert "the ledger Redis answers" in worker.log()
    finally:
        worker.stop()
        server.stop()


def test_a_worker_gives_up_on_a_ledger_that_never_answers(start_worker) -> None:
    worker = start_worker(
        wait=False, SMS_REDIS_URL=f"redis://127.0.0.1:{free_port()}/0", SMS_LEDGER_START_WAIT=1
    )
    assert _exits(worker) == 69
    log = worker.log()
    assert "stayed unreachable" in log
    assert "SMS_REDIS_URL" in log
    assert " ready." not in log


def test_a_misconfigured_ledger_or_broker_stops_the_worker_naming_the_variable(
    start_worker, redis_server, account, tmp_path: Path
) -> None:
    guarded = Node(tmp_path, "--requirepass", "right", password="right").start()
    cluster_node = Node(tmp_path, "--cluster-enabled", "yes", "--cluster-port", str(free_port()))
    cluster_node.start()
    try:
        cases = [
            ({"SMS_REDIS_URL": f"redis://:wrong@127.0.0.1:{guarded.port}/0"}, "SMS_REDIS_URL"),
            ({"SMS_REDIS_URL": f"redis://127.0.0.1:{guarded.port}/0"}, "SMS_REDIS_URL"),
            ({"SMS_RESULT_BACKEND": f"redis://127.0.0.1:{cluster_node.port}/0"}, "Cluster"),
        ]
        for overrides, named in cases:
            worker = start_worker(wait=False, **overrides)
            assert _exits(worker) == 78, worker.log()
            assert named in worker.log()
            assert " ready." not in worker.log()
        # A ledger key of the wrong type: this Redis (or database) holds something else.
        with redis_server.client(2) as client:
            client.set(Keys(account[0]).pending, "not a zset")
        worker = start_worker(wait=False)
        assert _exits(worker) == 78
        assert "is a string, not a zset" in worker.log()
    finally:
        guarded.stop()
        cluster_node.stop()
        with redis_server.client(2) as client:
            client.delete(Keys(account[0]).pending)


def test_a_ledger_error_that_never_clears_fails_the_message_at_once(
    start_worker, redis_server, account, sim
) -> None:
    worker = start_worker()
    message_id = "wrongtype-1"
    with redis_server.client(2) as client:
        client.set(Keys(account[0]).message(message_id), "something else")
    result = send_sms.delay(["17680476163"], ["code"], ["1"], message_id=message_id)
    with pytest.raises(LedgerBroken, match="WRONGTYPE"):
        result.get(timeout=60)
    log = worker.log()
    assert "retry: Retry in" not in log  # failed, not retried through the broker
    assert "SMS_REDIS_URL" in log
    assert sim.received() == 0


def _ledger(client: redis.Redis):
    settings = Settings.from_env(
        {"POLYV_APP_ID": "app", "SMS_BROKER_URL": "redis://127.0.0.1:1/0", "SMS_REDIS_OUTAGE": "5"}
    )
    return build_ledger(settings, client)


@pytest.mark.parametrize(
    "error",
    [
        redis.exceptions.MovedError("3999 127.0.0.1:6381"),
        redis.exceptions.ResponseError("WRONGTYPE Operation against a key"),
        redis.exceptions.NoScriptError("NOSCRIPT No matching script"),
        redis.AuthenticationError("invalid password"),
        redis.exceptions.NoPermissionError("NOPERM"),
    ],
)
def test_ledger_errors_that_never_clear_are_raised_at_once(error: Exception) -> None:
    ledger = _ledger(fakeredis.FakeRedis(decode_responses=True))
    calls = []

    def failing() -> None:
        calls.append(1)
        raise error

    with pytest.raises(LedgerBroken, match=type(error).__name__):
        ledger.call(failing)
    assert len(calls) == 1


@pytest.mark.parametrize(
    "error",
    [
        redis.exceptions.TryAgainError("TRYAGAIN"),
        redis.exceptions.ClusterDownError("CLUSTERDOWN"),
        redis.exceptions.ReadOnlyError("READONLY"),
        redis.exceptions.ResponseError("BUSY Redis is busy running a script"),
        redis.exceptions.ResponseError("NOREPLICAS Not enough good replicas to write"),
        redis.ConnectionError("refused"),
    ],
)
def test_ledger_errors_of_a_moving_cluster_or_failover_are_ridden_out(error: Exception) -> None:
    ledger = _ledger(fakeredis.FakeRedis(decode_responses=True))
    calls = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise error
        return "ok"

    assert ledger.call(flaky) == "ok"
    ledger.outage_s = 0
    calls.clear()
    with pytest.raises(LedgerUnavailable):
        ledger.call(lambda: (_ for _ in ()).throw(error))


def _task(config: dict) -> SimpleNamespace:
    app = Celery("countdown")
    app.conf.update(config)
    return SimpleNamespace(app=app)


def test_quorum_countdowns_are_rounded_up_never_to_zero() -> None:
    amqp = {"SMS_BROKER_URL": "amqp://guest:guest@127.0.0.1:5672//"}
    quorum = _task(celery_config(Settings.from_env({**amqp, "SMS_QUEUE_TYPE": "quorum"})))
    assert _broker_countdown(quorum, 0.05) == 1.0
    assert _broker_countdown(quorum, 0.0) == 1.0
    assert _broker_countdown(quorum, 1.2) == 2.0
    classic = _task(celery_config(Settings.from_env(amqp)))
    assert _broker_countdown(classic, 0.05) == 0.05
    on_redis = _task(celery_config(Settings.from_env({})))
    assert _broker_countdown(on_redis, 0.3) == 0.3


def test_a_users_celery_config_module_wins_over_the_projects(tmp_path: Path) -> None:
    (tmp_path / "my_celery.py").write_text(
        "worker_concurrency = 3\n"
        "task_acks_late = False\n"
        "broker_transport_options = {'sentinel_kwargs': {'password': 'x'}}\n"
    )
    code = (
        "from polyv_sms.worker import app\n"
        "c = app.conf\n"
        "print(c.worker_concurrency, c.task_acks_late, c.task_default_queue,"
        " sorted(c.broker_transport_options))\n"
    )
    env = {
        "PYTHONPATH": str(tmp_path),
        "SMS_CELERY_CONFIG": "my_celery",
        "SMS_BROKER_URL": "redis://127.0.0.1:1/0",
        "PATH": "/usr/bin:/bin",
    }
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    # The user's values win; the transport options are merged, the project's others stay.
    assert done.stdout.split()[:3] == ["3", "False", "sms"]
    assert "sentinel_kwargs" in done.stdout
    assert "visibility_timeout" in done.stdout
    env["SMS_CELERY_CONFIG"] = "no_such_module"
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False
    )
    assert done.returncode != 0
    assert "SMS_CELERY_CONFIG='no_such_module' cannot be imported" in done.stderr


def test_the_ledger_client_follows_what_the_url_names(tmp_path: Path) -> None:
    plain = Node(tmp_path).start()
    node = Node(tmp_path, "--cluster-enabled", "yes", "--cluster-port", str(free_port())).start()
    try:
        assert type(connect_redis(f"redis://127.0.0.1:{plain.port}/3")) is redis.Redis
        with pytest.raises(ConfigError, match=r"SMS_REDIS_URL: a Redis Cluster has database 0"):
            connect_redis(f"redis://127.0.0.1:{node.port}/2")
        # An ACL user that may not run INFO: taken for a plain Redis, not refused.
        with plain.client() as admin:
            admin.acl_setuser(
                "limited", enabled=True, passwords=["+pw"], keys=["*"], commands=["+@all", "-info"]
            )
        client = connect_redis(f"redis://limited:pw@127.0.0.1:{plain.port}/0")
        assert type(client) is redis.Redis
        assert client.ping()
        with pytest.raises(LedgerUnavailable):
            connect_redis(f"redis://127.0.0.1:{free_port()}/0", wait_s=0)
    finally:
        plain.stop()
        node.stop()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of the test's own: these tests freeze it or close its connections."""
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


def _leave_a_reply_unread(pool: redis.ConnectionPool) -> redis.Connection:
    """A pooled connection handed back with a ``GET a`` sent and its reply, arrived, unread."""
    dirty = pool.get_connection()
    dirty.send_command("GET", "a")
    assert select.select([dirty._sock], [], [], 2)[0]
    pool.release(dirty)
    return dirty


def test_a_frozen_ledger_redis_is_an_outage_within_the_socket_timeout(
    own_redis: RedisServer,
) -> None:
    """The plain client bounds its waits in the kernel (SO_RCVTIMEO, no poll() before each
    read): a Redis that accepts and never answers (SIGSTOP) is still a connection error
    within about socket_timeout per try, and the client works again once Redis does."""
    import signal
    import socket

    server = own_redis
    assert server.process is not None
    client = connect_redis(server.url(0), socket_timeout=0.4, connect_timeout=0.4)
    try:
        assert client.set("k", "v")
        connection = client.connection_pool.get_connection()
        try:
            sock = connection._sock
            assert sock is not None
            assert sock.gettimeout() is None  # blocking: no poll() before each call
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, 16) != bytes(16)
        finally:
            client.connection_pool.release(connection)
        server.process.send_signal(signal.SIGSTOP)
        try:
            started = time.monotonic()
            with pytest.raises((redis.ConnectionError, redis.TimeoutError)):
                client.get("k")
            # Three tries (redis-py's Retry of 2) of 0.4 s each, plus its backoff.
            assert time.monotonic() - started < 3.0
        finally:
            server.process.send_signal(signal.SIGCONT)
        assert client.get("k") == "v"
    finally:
        client.close()


def test_the_pool_hands_out_no_closed_or_dirty_connection(
    own_redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pool's check of each connection it hands out (``can_read``) answers from
    getsockopt, without poll(): a connection whose server closed it, or that holds a reply
    nobody read, is still replaced before a command goes out on it, and a command never
    reads another command's reply (redis-py 8's own check no longer looks for one)."""
    server = own_redis
    client = connect_redis(server.url(0), socket_timeout=2, connect_timeout=2)
    try:
        client.set("a", "A")
        client.set("b", "B")
        pool = client.connection_pool

        def no_poll() -> None:
            raise AssertionError("poll() on the pool's check")

        # A healthy idle connection: reused, and its check polls nothing.
        with monkeypatch.context() as patched:
            patched.setattr(select, "poll", no_poll)
            first = pool.get_connection()
            assert first.can_read() is False
            pool.release(first)
            assert client.get("a") == "A"
            # A reply nobody read (a command sent, its caller gone): the connection is
            # replaced, and the next command reads its own reply, not that one.
            again = _leave_a_reply_unread(pool)
            assert again is first
            assert again._sock is not None
            with pytest.raises(redis.ConnectionError, match="nobody read"):
                again.can_read()
            assert client.get("b") == "B"
        # Closed by the server (CLIENT KILL, a restart, an idle timeout): replaced too.
        victim = pool.get_connection()
        (victim_id,) = [c["id"] for c in server.client().client_list() if c["cmd"] != "client|list"]
        pool.release(victim)
        server.client().client_kill_filter(_id=victim_id)
        assert select.select([victim._sock], [], [], 2)[0]
        with pytest.raises(redis.ConnectionError, match="closed"):
            victim.can_read()
        assert client.get("a") == "A"
        assert victim._sock is not None  # reconnected, not left closed
    finally:
        client.close()


@pytest.mark.parametrize("path", ["pure-python parser", "no getsockopt check"])
def test_the_fallback_check_also_refuses_a_reply_nobody_read(
    own_redis: RedisServer, monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    """Without hiredis (redis-py's own parser), or off Linux, the pool's check is redis-py's
    ``poll()``: data it finds waiting must still get the connection replaced, else, with
    maintenance notifications on, every later command on it reads the reply before its own."""
    from redis._parsers import _RESP3Parser

    from polyv_sms.ledger import connection

    url = own_redis.url(0)
    options = connection._plain_options(url, connection._options(2.0, 2.0))
    if path == "pure-python parser":
        options["parser_class"] = _RESP3Parser
    else:
        monkeypatch.setattr(connection, "_SOCKOPT_CHECK", False)
    client = redis.Redis.from_url(url, **options)
    try:
        client.set("a", "A")
        client.set("b", "B")
        pool = client.connection_pool
        assert pool.maint_notifications_enabled()  # redis-py itself ignores waiting data
        _leave_a_reply_unread(pool)
        assert client.get("b") == "B"
        assert client.get("a") == "A"
    finally:
        client.close()


def test_a_kernel_that_refuses_the_socket_options_is_no_outage(
    own_redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where ``getsockopt(SO_MEMINFO)`` (or ``TCP_INFO``) is refused (ENOPROTOOPT: an older or
    sandboxed kernel, an emulator, a seccomp filter), the check is not a broken connection:
    it falls back to ``poll()``, and the ledger keeps working (it was a total outage: every
    connection failed the check, and ``connect_redis`` itself gave up)."""
    from polyv_sms.ledger import connection

    monkeypatch.setattr(connection, "_SOCKOPT_CHECK", True)
    monkeypatch.setattr(
        connection.KernelTimeoutConnection, "_sockopt_refused", False, raising=False
    )
    monkeypatch.setattr(connection, "_SO_MEMINFO", 0x7FFF)  # an option no kernel has
    client = None
    try:
        client = connect_redis(own_redis.url(0), socket_timeout=2, connect_timeout=2, wait_s=0)
        for i in range(5):
            client.set("a", str(i))
        assert client.get("a") == "4"
        assert connection.KernelTimeoutConnection._sockopt_refused
        # The fallback still refuses a connection holding a reply nobody read.
        _leave_a_reply_unread(client.connection_pool)
        client.set("b", "B")
        assert client.get("b") == "B"
    finally:
        if client is not None:
            client.close()
