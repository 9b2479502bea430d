"""What the worker changes in kombu's Redis transport so that it rides out a master demotion.

A Redis master demoted to a replica (a Sentinel failover or switchover, a managed Redis's
failover) trips kombu's Redis transport (``redis://``, ``rediss://``, ``sentinel://``) twice:

1. The consumer's waiting ``BRPOP`` is answered ``-UNBLOCKED force unblock from blocking
   operation, instance state changed (master -> replica?)``: a ``ResponseError``, which Celery
   takes for an unrecoverable error - the worker stopped (``Unrecoverable error:
   server:ResponseError``; celery/celery#7946). :func:`install` turns that one answer into a
   connection error: the consumer reconnects (kombu asks Sentinel for the new master), as it
   already does for the ``READONLY`` a later command gets. Other error answers (a refused
   permission, a key of the wrong type) stay what they were.
2. kombu takes a message in two steps: ``BRPOP`` removes it from the queue, then
   ``MULTI``/``ZADD``/``HSET``/``EXEC`` records it in the ``unacked`` hash, from which it is
   restored if the worker loses its connection (or dies: after the visibility timeout). When
   the second step fails - the master was demoted between the two (the paused ``EXEC`` is
   refused with ``READONLY``), or the connection broke - the worker's memory holds the only
   copy, and kombu drops it: the message is never run, never reaches the ledger, and its
   caller's ``AsyncResult`` waits forever. :class:`KeepingQoS` keeps such a message with the
   delivered ones, so that the restore kombu runs when the worker drops the broken connection
   (``Restoring N unacknowledged message(s)``; its new connections ask Sentinel for the
   master) puts it back in its queue. If the hash does hold the message (the ``EXEC`` ran and
   only its answer was lost), it is restored from there, once, as before.

Limit: that restore needs a broker that answers; if the worker is stopped or killed before one
does, the message is lost as before (its ``BRPOP`` was already replicated).
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

__all__ = ["UNBLOCKED", "KeepingQoS", "install"]

log = logging.getLogger("polyv_sms.broker_failover")

#: How Redis begins its answer to a blocked command when the instance stops being a master.
UNBLOCKED = "UNBLOCKED"


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


def _brpop_read_reconnecting(channel: Any, **options: Any) -> Any:
    """kombu's ``Channel._brpop_read``, with ``-UNBLOCKED`` raised as a connection error."""
    try:
        return _KOMBU_BRPOP_READ(channel, **options)
    except redis.ResponseError as exc:
        if not str(exc).startswith(UNBLOCKED):
            raise
        # As kombu does for a connection error: drop the connection, the next one asks again.
        connection = channel.client.connection
        if connection is not None:
            connection.disconnect()
        raise redis.ConnectionError(f"the broker's master was demoted: {exc}") from exc


_KOMBU_BRPOP_READ = kombu_redis.Channel._brpop_read


def install() -> None:
    """Make kombu's Redis channels (``redis://``, ``rediss://``, ``sentinel://``) reconnect on
    ``-UNBLOCKED`` and keep unrecorded messages (:class:`KeepingQoS`). Idempotent; called by
    the worker (channels created before it are unchanged)."""
    kombu_redis.Channel._brpop_read = _brpop_read_reconnecting  # type: ignore[method-assign,assignment]
    kombu_redis.Channel.QoS = KeepingQoS
