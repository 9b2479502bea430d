"""Scenario 5 - a retry that cannot be published.

What Celery does (celery/app/task.py, ``Task.retry``): it publishes the retry with
``S.apply_async()`` and, when that raises - a Redis broker that cannot be reached gives up
after about 6 s - raises ``Reject(exc, requeue=False)``. The worker (``on_failure`` in
celery/worker/request.py) then records a FAILURE result and rejects the message without
requeueing; kombu's Redis transport (``QoS.reject``) deletes it from the ``unacked`` hash.
Where the broker takes that delete, the message is gone, and the caller's
``AsyncResult.get()`` raises ``Reject``.

What we do (polyv_sms/tasks.py): once the ledger has seen the message, its ``pending`` set holds
it with the time its retry is due, and the reconciler enqueues it again (same task id, same
message id) when it is overdue; the task ends with ``Ignore``, so no FAILURE is recorded. If
the ledger itself was unreachable (the message may be unknown to it), the task requeues the
message instead, and the broker keeps it.

The broker is a redis-server of its own; the results and (but for the last test) the ledger
live on the session's redis-server.
"""

from __future__ import annotations

import time

import pytest
import redis
from helpers import wait_for

from .tools import Results, elapsed, log_lines, pending_messages, phone, seen_by_message

pytestmark = pytest.mark.slow

PUBLISH_FAILED = "could not be published"
RECONCILED = "enqueued again"


def refuse_pushes(broker: redis.Redis, refuse: bool) -> None:
    """Make the broker refuse (or accept again) the commands that put a message on a queue.

    Everything else - the consumer's BRPOP, acknowledgements - keeps working, like a Redis at
    ``maxmemory`` refusing new data while it still accepts deletes.
    """
    sign = "-" if refuse else "+"
    broker.execute_command("ACL", "SETUSER", "default", f"{sign}lpush", f"{sign}rpush")


def held_by_broker(broker: redis.Redis, task_id: str) -> bool:
    """Whether the broker still holds the task's message: queued, or delivered and unacked."""
    unacked = broker.hvals("unacked")
    queued = broker.lrange("sms", 0, -1)
    return any(task_id in item for item in [*unacked, *queued])


def outcomes(result: dict) -> list[str]:
    return [e["outcome"] for e in result["results"]]


def test_retry_published_while_the_broker_is_down_is_not_dropped(
    make_redis, producer, start_worker, autorestart, sim, account, redis_server
) -> None:
    started = time.monotonic()
    broker_server = make_redis(appendonly=True)
    worker = autorestart.watch(
        start_worker(
            SMS_BROKER_URL=broker_server.url(0),
            SMS_RECONCILE_INTERVAL=0.5,
            SMS_RECONCILE_GRACE=1,
        )
    )
    results = Results(redis_server.client(1))
    first, second = phone(510), phone(511)
    sim.set_faults(fail_numbers={first: 1}, latency_s=1.0)
    task_id = producer(broker_server.url(0)).send([first, second], tag="p0", message_id="p0")

    # The broker goes away while the first request is in flight: the retry that follows its
    # status 11 cannot be published (publishing gives up after about 6 s).
    wait_for(sim.requests, 10, what="the first request")
    broker_server.stop(kill=True)
    down = time.monotonic()
    wait_for(lambda: log_lines(worker, PUBLISH_FAILED), 45, what="the retry to fail to publish")
    down_for = elapsed(down)
    assert results.state(task_id) != "FAILURE"
    assert pending_messages(redis_server.client(2), account[0]) == ["p0"]
    broker_server.start()

    result = results.successes([task_id], timeout=60)[task_id]
    assert outcomes(result) == ["accepted", "accepted"]
    seen = seen_by_message(sim)
    assert seen[("p0", first)].statuses == [11, 12]
    assert seen[("p0", second)].statuses == [12]
    assert log_lines(worker, RECONCILED)
    print(
        f"\nretry while the broker is down: broker down {down_for}s until the retry gave up;"
        f" completed by the reconciler; worker restarts {autorestart.restarts};"
        f" {elapsed(started)}s"
    )


def test_retry_refused_by_the_broker_is_recovered_by_the_reconciler(
    make_redis, producer, start_worker, sim, account, redis_server
) -> None:
    started = time.monotonic()
    broker_server = make_redis(appendonly=False)
    worker = start_worker(
        SMS_BROKER_URL=broker_server.url(0),
        SMS_RECONCILE_INTERVAL=0.5,
        SMS_RECONCILE_GRACE=1,
    )
    broker = broker_server.client(0)
    results = Results(redis_server.client(1))
    first, second = phone(500), phone(501)
    sim.set_faults(fail_numbers={first: 1}, latency_s=0.5)
    task_id = producer(broker_server.url(0)).send([first, second], tag="p1", message_id="p1")

    wait_for(sim.requests, 10, what="the first request")
    refuse_pushes(broker, True)  # while the first request is in flight
    # The retry cannot be published, and the broker takes the delete: its copy is gone ...
    wait_for(lambda: not held_by_broker(broker, task_id), 15, what="the broker's copy to go")
    assert log_lines(worker, PUBLISH_FAILED)
    # ... but no FAILURE was recorded, and the ledger still has the message pending.
    assert results.state(task_id) not in ("FAILURE", "SUCCESS")
    assert pending_messages(redis_server.client(2), account[0]) == ["p1"]
    refuse_pushes(broker, False)

    result = results.successes([task_id], timeout=30)[task_id]
    assert outcomes(result) == ["accepted", "accepted"]
    seen = seen_by_message(sim)
    assert seen[("p1", first)].statuses == [11, 12]
    assert seen[("p1", second)].statuses == [12]
    assert log_lines(worker, RECONCILED)
    print(f"\nretry refused by the broker: completed by the reconciler; {elapsed(started)}s")


def test_unpublished_retry_before_the_ledger_saw_the_message_stays_with_the_broker(
    make_redis, producer, start_worker, autorestart, sim
) -> None:
    started = time.monotonic()
    ledger_server = make_redis(appendonly=True)
    broker_server = make_redis(appendonly=False)
    worker = autorestart.watch(
        start_worker(
            SMS_BROKER_URL=broker_server.url(0),
            SMS_RESULT_BACKEND=broker_server.url(1),
            SMS_REDIS_URL=ledger_server.url(0),
            SMS_REDIS_OUTAGE=1,
            SMS_VISIBILITY_TIMEOUT=3,
        )
    )
    broker = broker_server.client(0)
    results = Results(broker_server.client(1))
    first, second = phone(520), phone(521)

    # The ledger is down: the first run cannot reserve, so the ledger never hears of the
    # message; then its retry cannot be published either.
    ledger_server.stop(kill=True)
    task_id = producer(broker_server.url(0)).send([first, second], tag="p2", message_id="p2")
    refuse_pushes(broker, True)
    wait_for(lambda: log_lines(worker, PUBLISH_FAILED), 15, what="the retry to fail to publish")
    # Celery would delete the message now. It stays with the broker instead (the requeue is
    # refused too, and Celery ends the worker over that; supervisord - here ``autorestart`` -
    # starts it again).
    wait_for(
        lambda: (
            autorestart.restarts
            or not held_by_broker(broker, task_id)
            or log_lines(worker, "Couldn't reject")
        ),
        30,
        what="the worker to finish with the message",
    )
    assert held_by_broker(broker, task_id)
    assert results.state(task_id) != "FAILURE"
    ledger_server.start()
    refuse_pushes(broker, False)

    # The visibility timeout hands the message out again.
    result = results.successes([task_id], timeout=30)[task_id]
    assert outcomes(result) == ["accepted", "accepted"]
    assert [sim.received(n) for n in (first, second)] == [1, 1]
    print(
        f"\nretry unpublished before the ledger saw the message: kept by the broker, worker"
        f" restarts {autorestart.restarts}; {elapsed(started)}s"
    )
