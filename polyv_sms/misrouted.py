"""Mis-routed tasks: ``polyv_sms.send_sms`` messages a plain Celery client left in ``celery``.

A producer that enqueues by name with its own Celery app (``app.send_task("polyv_sms.send_sms",
...)``) and forgets ``queue="sms"`` publishes to Celery's default queue, ``celery``, which no
polyv-sms worker reads: its ``AsyncResult.get()`` would wait forever. Each worker on a Redis
broker looks at the head of that queue every :data:`SWEEP_INTERVAL_S` seconds, moves the
``polyv_sms.send_sms`` messages it finds there to their lane's queue (``sms.urgent``, ``sms``
or ``sms.bulk``, by the ``lane`` keyword) and logs a warning naming the task.
Other applications' messages in ``celery`` are left alone (a worker that consumed ``celery``
would drop them as unregistered tasks).

Limits: Redis brokers only (``redis://``, ``rediss://``); the first :data:`PEEK_MESSAGES`
messages of the queue each sweep; messages published with a priority above 0 (kombu keeps
those in other lists) are not looked at.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import threading
from typing import Any, cast

import redis

from polyv_sms.lanes import DEFAULT_LANE, LANE_QUEUES
from polyv_sms.worker import QUEUE, TASK_NAME

__all__ = ["DEFAULT_QUEUE", "PEEK_MESSAGES", "SWEEP_INTERVAL_S", "MisroutedMover"]

log = logging.getLogger("polyv_sms.misrouted")

#: Celery's default queue: where a client without polyv-sms's routes publishes.
DEFAULT_QUEUE = "celery"
#: How often a worker looks for mis-routed messages (the longest extra wait of one).
SWEEP_INTERVAL_S = 5.0
#: Messages looked at per sweep, from the head of the queue (where the consumer takes them).
PEEK_MESSAGES = 200
#: Moves one message only if it is still there: two workers never both move it, and a
#: message another consumer took meanwhile is not duplicated. KEYS: from, to; ARGV: the
#: message as found, the message as moved (routing key rewritten).
_MOVE = """
if redis.call('LREM', KEYS[1], -1, ARGV[1]) == 1 then
  redis.call('RPUSH', KEYS[2], ARGV[2])
  return 1
end
return 0
"""
_REDIS_SCHEMES = ("redis://", "rediss://")
_SOCKET_TIMEOUT_S = 5.0


def _lane_queue(message: dict[str, Any]) -> str:
    """The queue of the message's lane (``sms`` when its body says none, or cannot be read:
    the worker then judges the request). An urgent message moved to ``sms`` would wait
    behind the standard backlog; a bulk one would jump ahead of it."""
    try:
        body = message["body"]
        if message["properties"].get("body_encoding") == "base64":
            body = base64.b64decode(body)
        decoded = json.loads(body)
        kwargs = decoded[1] if isinstance(decoded, list) else decoded.get("kwargs")
        lane = kwargs.get("lane", DEFAULT_LANE) if isinstance(kwargs, dict) else DEFAULT_LANE
        return LANE_QUEUES.get(lane, QUEUE) if isinstance(lane, str) else QUEUE
    except (ValueError, KeyError, TypeError, IndexError, AttributeError, binascii.Error):
        return QUEUE


def _moved(raw: str) -> tuple[str, str, str] | None:
    """``(task id, queue, message routed to it)`` when ``raw`` is a ``send_sms`` message."""
    if TASK_NAME not in raw:  # cheap: most messages in a shared queue are someone else's
        return None
    try:
        message: dict[str, Any] = json.loads(raw)
        if message["headers"]["task"] != TASK_NAME:
            return None
        queue = _lane_queue(message)
        message["properties"]["delivery_info"]["routing_key"] = queue
    except (ValueError, KeyError, TypeError):
        return None
    return str(message["headers"].get("id")), queue, json.dumps(message)


class MisroutedMover:
    """Moves ``polyv_sms.send_sms`` messages from ``celery`` to ``sms`` (see the module).

    Args:
        client: a client of the broker's Redis (``decode_responses=True``).
        interval_s: seconds between sweeps.
    """

    def __init__(self, client: redis.Redis, *, interval_s: float = SWEEP_INTERVAL_S) -> None:
        self.client = client
        self.interval_s = interval_s
        self._move = client.register_script(_MOVE)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def for_broker(cls, broker_url: str) -> MisroutedMover | None:
        """A mover for ``broker_url``, or ``None`` when the broker is not a plain Redis URL."""
        if not broker_url.startswith(_REDIS_SCHEMES):
            return None
        client = redis.Redis.from_url(
            broker_url,
            decode_responses=True,
            socket_timeout=_SOCKET_TIMEOUT_S,
            socket_connect_timeout=_SOCKET_TIMEOUT_S,
        )
        return cls(client)

    def sweep(self) -> list[str]:
        """Move the mis-routed messages at the head of ``celery`` once.

        Returns:
            The task ids moved.
        """
        # kombu LPUSHes and its consumer BRPOPs: the head of the queue is its right end.
        found = cast(list[str], self.client.lrange(DEFAULT_QUEUE, -PEEK_MESSAGES, -1))
        moved = []
        for raw in reversed(found):
            candidate = _moved(raw)
            if candidate is None:
                continue
            task_id, queue, routed = candidate
            if self._move(keys=[DEFAULT_QUEUE, queue], args=[raw, routed]):
                moved.append(task_id)
                log.warning(
                    "task %s (%s) was published to queue %r, which polyv-sms workers do not "
                    "read; moved it to %r. Enqueue by name with queue=%r (or call "
                    "send_sms.delay())",
                    task_id,
                    TASK_NAME,
                    DEFAULT_QUEUE,
                    queue,
                    queue,
                )
        return moved

    def start(self) -> None:
        """Sweep now and then every ``interval_s``, in a daemon thread, until :meth:`stop`."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._loop, name="polyv-sms-misrouted", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread (it ends after its current sweep) and release the connection."""
        self._stop.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.sweep()
            except Exception:
                log.exception("looking for mis-routed tasks failed; trying again later")
            self._stop.wait(self.interval_s)
        self.client.close()
