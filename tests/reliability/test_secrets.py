"""Scenario 7 - secrets: the app secret appears nowhere but in the worker's environment.

A representative run on a redis-server of its own (AOF on) goes through every path - messages
queued with no worker, success, status 11 retries, HTTP 500, HTML bodies, dropped connections
and timeouts, a worker killed mid-send and the redelivery, a request refused by the worker,
bad numbers, a Polyv error envelope - with workers logging at DEBUG. Then the secret is looked
for in: every key name and value of every database (read by type: a ``DUMP`` may compress),
the AOF files (every write ever made, deleted keys included), the broker's task messages as
they sat in the queue and in ``unacked``, the results and exception texts, and the worker logs.
A last test looks through the session's shared redis-server and every worker log the session
wrote, for any test account's secret.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from conftest import worker_env
from helpers import RedisServer, WorkerProcess, wait_for

from polyv_sms.config import Settings
from polyv_sms.worker import celery_config

from .tools import Results, elapsed, phone

pytestmark = pytest.mark.slow

#: Every test's account secret looks like this (tests/conftest.py, ``account``).
ANY_TEST_SECRET = re.compile(rb"sec-[0-9a-f]{24}")


def read_everything(server: RedisServer) -> Iterator[tuple[int, bytes, bytes]]:
    """``(db, key, content)`` for every key of every database, each value read by its type."""
    probe = redis.Redis(port=server.port, socket_timeout=5)
    databases = int(probe.config_get("databases")["databases"])
    probe.close()
    for db in range(databases):
        client = redis.Redis(port=server.port, db=db, socket_timeout=5)
        for key in client.scan_iter(count=1000):
            kind = client.type(key).decode()
            if kind == "string":
                parts = [client.get(key) or b""]
            elif kind == "hash":
                parts = [item for pair in client.hgetall(key).items() for item in pair]
            elif kind == "list":
                parts = client.lrange(key, 0, -1)
            elif kind == "set":
                parts = list(client.smembers(key))
            elif kind == "zset":
                parts = [member for member, _ in client.zrange(key, 0, -1, withscores=True)]
            elif kind == "stream":
                parts = [repr(entry).encode() for entry in client.xrange(key)]
            else:
                parts = [client.dump(key) or b""]
            yield db, key, key + b"\n" + b"\n".join(parts)
        client.close()


def leaks_in_redis(server: RedisServer, pattern: re.Pattern[bytes]) -> list[tuple[int, bytes]]:
    return [(db, key) for db, key, content in read_everything(server) if pattern.search(content)]


def leaks_in_files(paths: list[Path], pattern: re.Pattern[bytes]) -> list[str]:
    return [str(path) for path in paths if path.is_file() and pattern.search(path.read_bytes())]


@pytest.fixture
def debug_workers(account, sim, redis_server) -> Iterator:
    """``start(log, **env)``: a worker logging at DEBUG; all stopped after the test."""
    started: list[WorkerProcess] = []

    def start(log: Path, **overrides: object) -> WorkerProcess:
        env = worker_env(account, sim, redis_server, **overrides)
        worker = WorkerProcess(env, log, concurrency=4, extra_args=("--loglevel", "DEBUG"))
        started.append(worker.start())
        return worker

    yield start
    for worker in started:
        worker.stop()


def test_the_secret_appears_nowhere_after_every_path(
    make_redis, producer, debug_workers, sim, account, tmp_path
) -> None:
    started = time.monotonic()
    app_id, secret = account
    pattern = re.compile(re.escape(secret.encode()))
    server = make_redis(appendonly=True)
    urls = {
        "SMS_BROKER_URL": server.url(0),
        "SMS_RESULT_BACKEND": server.url(1),
        "SMS_REDIS_URL": server.url(2),
        "POLYV_HTTP_TIMEOUT": 0.5,
        "SMS_REDIS_OUTAGE": 1,
    }
    app = producer(server.url(0))
    results = Results(server.client(1))
    logs = [tmp_path / f"worker-{i}.log" for i in range(3)]
    sweeps: dict[str, list] = {}

    # 1. Messages wait in the broker with no worker: what a task message carries.
    tasks = [app.send([phone(900 + i), "13900x", 17], tag=f"s{i}") for i in range(6)]
    tasks.append(app.send([phone(906)], tag="bad", values=["1", "2"]))  # refused in the worker
    assert server.client(0).llen("sms") == 7
    sweeps["queued task messages"] = leaks_in_redis(server, pattern)

    # 2. Success, status 11 retries, 500s, HTML pages, dropped connections, timeouts.
    sim.set_faults(
        status11_rate=0.3,
        http500_rate=0.1,
        garbage_rate=0.1,
        drop_rate=0.1,
        slow_rate=0.1,
        slow_latency_s=0.8,
        seed=3,
    )
    first = debug_workers(logs[0], **urls)
    metas = results.wait(tasks, timeout=60)
    assert metas[tasks[-1]]["result"]["exc_type"] == "InvalidRequest"
    outcomes = {e["outcome"] for t in tasks[:-1] for e in metas[t]["result"]["results"]}
    assert {"accepted", "invalid"} <= outcomes

    # 3. A worker killed mid-send; the redelivery.
    sim.set_faults(
        latency_s=0.3,
        status11_rate=0.0,
        http500_rate=0.0,
        garbage_rate=0.0,
        drop_rate=0.0,
        slow_rate=0.0,
    )
    received = len(sim.requests())
    crash = [app.send([phone(910 + i)], tag=f"k{i}") for i in range(4)]
    wait_for(lambda: len(sim.requests()) >= received + 4, 15, what="sends in flight")
    first.kill()
    assert server.client(0).hlen("unacked") > 0
    sweeps["unacknowledged task messages"] = leaks_in_redis(server, pattern)
    second = debug_workers(logs[1], SMS_VISIBILITY_TIMEOUT=2, **urls)
    results.successes(crash, timeout=60)
    second.stop()

    # 4. A Polyv error envelope (unknown appId): a permanent error, its text in the result.
    debug_workers(logs[2], POLYV_APP_ID=f"{app_id}-unknown", **urls)
    refused = app.send([phone(920)], tag="envelope")
    result = results.successes([refused], timeout=30)[refused]
    assert "application not found" in result["results"][0]["error"]

    sweeps["every key and value"] = leaks_in_redis(server, pattern)
    aof = sorted(server.directory.rglob("*.aof*"))
    assert aof, "the AOF files are where every write went"
    sweeps["AOF files (every write ever made)"] = leaks_in_files(aof, pattern)
    sweeps["worker logs"] = leaks_in_files(logs, pattern)
    assert all(log.stat().st_size > 0 for log in logs)
    assert "DEBUG" in logs[0].read_text()
    # What the code shows of its settings.
    settings = Settings.from_env(worker_env(account, sim, server))
    shown = [repr(settings), str(settings.describe()), repr(celery_config(settings))]
    sweeps["settings, as shown"] = [text for text in shown if secret in text]
    assert {where: found for where, found in sweeps.items() if found} == {}

    # The control: the same sweep does find a secret that is there.
    scratch = make_redis(appendonly=False)
    scratch.client(7).hset("control", "value", f"<{secret}>")
    assert leaks_in_redis(scratch, pattern) == [(7, b"control")]
    print(f"\nsecrets: looked in {', '.join(sweeps)}; none found; {elapsed(started)}s")


def test_no_test_secret_in_the_shared_redis_or_any_worker_log(
    redis_server, tmp_path_factory
) -> None:
    """Whatever ran before in this session: no account secret in the session's redis-server
    (every database) nor in any worker log the session wrote."""
    assert leaks_in_redis(redis_server, ANY_TEST_SECRET) == []
    logs = sorted(tmp_path_factory.getbasetemp().rglob("worker-*.log"))
    assert leaks_in_files(logs, ANY_TEST_SECRET) == []
