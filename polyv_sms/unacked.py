"""A message a worker took from a Redis queue but could not record as unacknowledged is kept.

kombu's Redis transport takes a message in two steps: ``BRPOP`` removes it from the queue,
then a ``MULTI``/``ZADD``/``HSET``/``EXEC`` records it in the ``unacked`` hash, from which it
is restored if the worker loses its connection (or dies: after the visibility timeout). When
the second step fails - the master was demoted between the two, as in a Sentinel failover or
switchover (the paused ``EXEC`` is refused with ``READONLY``), or the connection broke - the
worker's memory holds the only copy, and kombu drops it: the message was never run, never
reached the ledger, and its caller's ``AsyncResult`` waits forever.

:func:`install` makes the worker keep such a message with its unacknowledged ones, so that the
restore kombu runs when the worker drops the broken connection (``Restoring N unacknowledged
message(s)``; its new connections ask Sentinel for the master) puts it back in its queue. If
the hash does hold the message (the ``EXEC`` ran and only its answer was lost), it is restored
from there, once, as before.

Limit: the restore itself needs a broker that answers; if the worker is stopped or killed
before one does, the message is lost as before (its ``BRPOP`` was already replicated).
"""

# kombu has no type annotations: every call into it would need its own ignore.
# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

import logging
from typing import Any

import redis
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import loads

__all__ = ["KeepingQoS", "install"]

log = logging.getLogger("polyv_sms.unacked")


class KeepingQoS(kombu_redis.QoS):
    """kombu's Redis QoS that keeps a message whose unacknowledged record failed."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: Delivery tag -> message taken from the queue whose ``unacked`` record failed.
        self._unrecorded: dict[str, Any] = {}

    def append(self, message: Any, delivery_tag: str) -> None:
        """Record ``message`` as unacknowledged; if that fails, keep it to be restored.

        Raises:
            redis.RedisError, OSError: the record failed (the consumer reconnects, and its
                restore puts the message back in its queue).
        """
        try:
            super().append(message, delivery_tag)
        except (redis.RedisError, OSError) as exc:
            # The message is off the queue and nowhere in Redis: hold it with the delivered
            # ones, so that the restore after the reconnection includes it.
            virtual.QoS.append(self, message, delivery_tag)
            self._unrecorded[delivery_tag] = message
            log.warning(
                "task %s was taken from queue %r but could not be recorded as unacknowledged "
                "(%s); it goes back to its queue as the worker reconnects",
                (getattr(message, "headers", None) or {}).get("id", delivery_tag),
                message.delivery_info.get("routing_key"),
                type(exc).__name__,
            )
            raise

    def ack(self, delivery_tag: str) -> None:
        """Acknowledge ``delivery_tag`` (forgetting it if it was never recorded)."""
        self._unrecorded.pop(delivery_tag, None)
        super().ack(delivery_tag)

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        """Reject ``delivery_tag`` (a requeue goes through :meth:`restore_by_tag`)."""
        if not requeue:
            self._unrecorded.pop(delivery_tag, None)
        super().reject(delivery_tag, requeue=requeue)

    def restore_by_tag(self, tag: str, client: Any = None, leftmost: bool = False) -> None:
        """Put the message of ``tag`` back in its queue: from the ``unacked`` hash, or from
        memory when its record failed and the hash does not have it."""
        message = self._unrecorded.pop(tag, None)
        if message is None:
            super().restore_by_tag(tag, client=client, leftmost=leftmost)
            return
        delivery = message.delivery_info

        def restore_transaction(pipe: Any) -> None:
            recorded = pipe.hget(self.unacked_key, tag)
            pipe.multi()
            self._remove_from_indices(tag, pipe)
            if recorded:  # the EXEC ran after all: restore that copy, and only it
                payload, exchange, routing_key = loads(bytes_to_str(recorded))
            else:
                payload, exchange, routing_key = (
                    message._raw,
                    delivery["exchange"],
                    delivery["routing_key"],
                )
            self.channel._do_restore_message(payload, exchange, routing_key, pipe, leftmost)

        with self.channel.conn_or_acquire(client) as connected:
            connected.transaction(restore_transaction, self.unacked_key)


def install() -> None:
    """Make kombu's Redis channels (``redis://``, ``rediss://``, ``sentinel://``) use
    :class:`KeepingQoS`. Idempotent; called by the worker on a Redis broker."""
    kombu_redis.Channel.QoS = KeepingQoS
