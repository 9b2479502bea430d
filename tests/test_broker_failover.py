"""polyv_sms.broker_failover: a message BRPOP took whose unacknowledged record failed is kept.

(Its other half, a worker reconnecting on ``-UNBLOCKED``, is tested with a real Sentinel
switchover: ``tests/ha/test_ha.py::test_an_idle_sentinel_worker_survives_a_failover``.)

A real redis-server and kombu's real Redis transport. The record (``MULTI``/``ZADD``/``HSET``/
``EXEC``) is made to fail the way a demoted master makes it fail - after ``BRPOP`` took the
message - here with a key of the wrong type in place of the ``unacked`` hash.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import redis
from kombu import Connection
from kombu.transport import redis as kombu_redis

from polyv_sms import broker_failover

DB = 3  # not the session's broker, results or ledger database


@pytest.fixture
def keeping() -> Iterator[None]:
    qos, brpop_read = kombu_redis.Channel.QoS, kombu_redis.Channel._brpop_read
    broker_failover.install()
    yield
    kombu_redis.Channel.QoS, kombu_redis.Channel._brpop_read = qos, brpop_read


def _take_with_failing_record(url: str, client: redis.Redis) -> str:
    """Publish one message, let BRPOP take it while its record fails; return the queue."""
    name = f"unacked-test-{uuid.uuid4().hex[:8]}"
    options = {
        "unacked_key": f"{name}-unacked",
        "unacked_index_key": f"{name}-unacked-index",
        "unacked_mutex_key": f"{name}-unacked-mutex",
    }
    with Connection(url, transport_options=options) as connection:
        queue = connection.SimpleQueue(name)
        queue.put({"message_id": "m-1"})
        client.set(options["unacked_key"], "not a hash")  # HSET answers WRONGTYPE
        with pytest.raises(redis.ResponseError):
            queue.get(timeout=10)
        assert client.llen(name) == 0  # BRPOP took it
        client.delete(options["unacked_key"])  # the broker answers again
        queue.close()
    return name  # the connection is closed: kombu restored what it held


def test_a_message_whose_record_failed_goes_back_to_its_queue(
    redis_server, keeping, caplog: pytest.LogCaptureFixture
) -> None:
    client = redis_server.client(DB)
    name = _take_with_failing_record(redis_server.url(DB), client)
    assert client.llen(name) == 1
    assert "could not be recorded as unacknowledged (ResponseError)" in caplog.text
    with Connection(redis_server.url(DB)) as connection:
        queue = connection.SimpleQueue(name)
        message = queue.get(timeout=10)
        assert message.payload == {"message_id": "m-1"}
        message.ack()
        queue.close()
    assert client.llen(name) == 0


def test_a_message_recorded_after_all_is_restored_once(redis_server, keeping) -> None:
    # The EXEC ran but its answer was lost: the hash has the message; it comes back once.
    client = redis_server.client(DB)
    original_append = kombu_redis.QoS.append

    def append_then_lose_the_answer(self, message, delivery_tag):  # type: ignore[no-untyped-def]
        original_append(self, message, delivery_tag)
        raise redis.ConnectionError("the answer to EXEC was lost")

    name = f"unacked-test-{uuid.uuid4().hex[:8]}"
    kombu_redis.QoS.append = append_then_lose_the_answer
    try:
        with Connection(redis_server.url(DB)) as connection:
            queue = connection.SimpleQueue(name)
            queue.put({"message_id": "m-2"})
            with pytest.raises(redis.ConnectionError):
                queue.get(timeout=10)
            assert client.llen(name) == 0
            queue.close()
    finally:
        kombu_redis.QoS.append = original_append
    assert client.llen(name) == 1
