"""Where the merged branches meet, with real processes: the rate guard (issue 12) against a
retry that cannot be published (issues 10 and 13). The broker is a redis-server of its own;
results and the ledger live on the session's redis-server.
"""

from __future__ import annotations

import pytest
from helpers import wait_for

from polyv_sms.ledger.records import Keys

from .test_unpublished_retry import PUBLISH_FAILED, held_by_broker, refuse_pushes
from .tools import Results, log_lines, phone

pytestmark = pytest.mark.slow


def test_a_run_told_to_wait_for_the_rate_guard_whose_retry_cannot_be_published_is_not_lost(
    make_redis, producer, start_worker, sim, account, redis_server
) -> None:
    """The rate guard answers before ``reserve``: a run put off by it (the shared pause, or
    no slot near enough) has left nothing in the ledger - no stored request, no pending
    entry. If its retry then cannot be published, ending the task with ``Ignore`` (right for
    a message the ledger knows: the reconciler brings it back) dropped it for good: never
    sent, no result, not in the broker."""
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
