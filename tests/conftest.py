"""Fixtures: a private redis-server for the session, the simulator, worker subprocesses.

The test process is a producer: its Celery app (``polyv_sms.worker.app``) is configured from
the environment set here, before anything touches it. Each test gets its own Polyv account
(appId), so ledger keys never collide; workers are stopped and the ``sms`` queue emptied
after each test that started one.
"""

from __future__ import annotations

import os
import secrets
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path

import pytest
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import TZ, Clock, RedisServer, WorkerProcess, empty_broker

from polyv_sms.polyv.simulator import PolyvSimulator

_session_redis: RedisServer | None = None


def pytest_configure(config: pytest.Config) -> None:
    global _session_redis
    if hasattr(config, "workerinput") or _session_redis is not None:
        return
    directory = Path(tempfile.mkdtemp(prefix="polyv-sms-redis-"))
    _session_redis = RedisServer(directory).start()
    os.environ["SMS_BROKER_URL"] = _session_redis.url(0)
    os.environ["SMS_RESULT_BACKEND"] = _session_redis.url(1)
    os.environ["SMS_REDIS_URL"] = _session_redis.url(2)
    for name in ("POLYV_APP_ID", "POLYV_APP_SECRET", "SMS_METRICS_PORT"):
        os.environ.pop(name, None)


def pytest_unconfigure(config: pytest.Config) -> None:
    global _session_redis
    if _session_redis is not None:
        _session_redis.stop()
        import shutil

        shutil.rmtree(_session_redis.directory, ignore_errors=True)
        _session_redis = None


@pytest.fixture(scope="session")
def redis_server() -> RedisServer:
    """The session's private redis-server (db 0 broker, db 1 results, db 2 ledger)."""
    assert _session_redis is not None
    return _session_redis


@pytest.fixture
def clock() -> Clock:
    """A clock the test moves by hand, starting now (modules with another clock define their
    own ``clock``)."""
    return Clock(datetime.now(TZ).timestamp())


@pytest.fixture
def client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    """A client of the session's redis-server, database 2 (the ledger tests'); modules whose
    ``client`` is something else define their own."""
    real = redis.Redis.from_url(redis_server.url(2), decode_responses=True)
    yield real
    real.close()


@pytest.fixture
def account() -> tuple[str, str]:
    """A fresh (appId, appSecret) for this test."""
    return f"app{uuid.uuid4().hex[:10]}", f"sec-{secrets.token_hex(12)}"


@pytest.fixture
def sim(account: tuple[str, str]) -> Iterator[PolyvSimulator]:
    """The Polyv simulator for this test's account, over real HTTP."""
    app_id, secret = account
    simulator = PolyvSimulator(app_id, secret).start()
    yield simulator
    simulator.stop()


def worker_env(
    account: tuple[str, str], sim: PolyvSimulator, redis_server: RedisServer, **overrides: object
) -> dict[str, str]:
    """The environment of a worker for this test's account and simulator."""
    app_id, secret = account
    env = {k: v for k, v in os.environ.items() if not k.startswith(("POLYV_", "SMS_"))}
    env |= {
        "POLYV_APP_ID": app_id,
        "POLYV_APP_SECRET": secret,
        "POLYV_API_BASE": sim.url,
        "POLYV_HTTP_TIMEOUT": "2",
        "SMS_BROKER_URL": redis_server.url(0),
        "SMS_RESULT_BACKEND": redis_server.url(1),
        "SMS_REDIS_URL": redis_server.url(2),
        "SMS_RETRY_BACKOFF": "0.05",
        "SMS_RETRY_BACKOFF_MAX": "0.5",
        "SMS_REDIS_OUTAGE": "5",
        "SMS_RECONCILE_INTERVAL": "0",
        "PYTHONUNBUFFERED": "1",
    }
    for name, value in overrides.items():
        env[name] = str(value)
    return env


@pytest.fixture
def start_worker(
    account: tuple[str, str],
    sim: PolyvSimulator,
    redis_server: RedisServer,
    tmp_path: Path,
) -> Iterator[Callable[..., WorkerProcess]]:
    """Start worker subprocesses: ``start_worker(concurrency=4, SMS_MAX_ATTEMPTS=3, ...)``."""
    started: list[WorkerProcess] = []

    def start(
        concurrency: int = 4,
        wait: bool = True,
        extra_args: tuple[str, ...] = (),
        **overrides: object,
    ) -> WorkerProcess:
        env = worker_env(account, sim, redis_server, **overrides)
        log = tmp_path / f"worker-{len(started)}.log"
        worker = WorkerProcess(
            env, log, concurrency=concurrency, name=f"w{len(started)}", extra_args=extra_args
        )
        started.append(worker)
        return worker.start(wait=wait)

    yield start
    for worker in started:
        worker.stop()
    empty_broker(redis_server)
