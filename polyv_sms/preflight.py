"""What a worker checks before it consumes: its ledger answers, and is the Redis it should be.

- Unreachable (refused, timed out, no master known to Sentinel yet): one clear line, then the
  worker waits, saying so every :data:`STILL_WAITING_EVERY_S`, for up to
  ``SMS_LEDGER_START_WAIT``; past that it exits (:data:`EXIT_UNAVAILABLE`) and its supervisor
  starts it again.
- Misconfigured (a wrong or missing password, a ledger key of the wrong type, a Redis Cluster
  given as the broker or result backend, which Celery cannot use): :class:`ConfigError` naming
  the variable; the worker exits with ``EX_CONFIG``.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from urllib.parse import urlsplit

import redis
from redis.exceptions import RedisClusterException

from polyv_sms.config import Settings, redact_url
from polyv_sms.errors import ConfigError, LedgerUnavailable
from polyv_sms.ledger import Keys, connect_redis

__all__ = [
    "EXIT_UNAVAILABLE",
    "LedgerUnreachable",
    "check_brokers",
    "check_queue_type",
    "wait_for_ledger",
]

log = logging.getLogger("polyv_sms.worker")

EXIT_UNAVAILABLE = 69  # EX_UNAVAILABLE
STILL_WAITING_EVERY_S = 30.0
_PAUSE_S = 1.0
_PROBE_TIMEOUT_S = 3.0
#: Ledger keys of an account and the Redis type each must have.
_TYPES = (("pending", "zset"), ("dead", "zset"))


class LedgerUnreachable(Exception):
    """The ledger stayed unreachable for the whole start-up wait."""


def _probe(settings: Settings) -> None:
    """Connect once, ping, check the account's key types; close.

    Raises:
        ConfigError: the ledger is misconfigured (names ``SMS_REDIS_URL``).
        LedgerUnavailable, redis.ConnectionError, redis.TimeoutError: it is unreachable.
    """
    url = settings.require_redis_url()
    try:
        client = connect_redis(
            url, socket_timeout=_PROBE_TIMEOUT_S, connect_timeout=_PROBE_TIMEOUT_S, wait_s=0
        )
    except (redis.AuthenticationError, redis.exceptions.AuthorizationError) as exc:
        raise ConfigError(f"SMS_REDIS_URL: the ledger Redis refused us: {exc}") from None
    try:
        client.ping()
        if settings.app_id:
            keys = Keys(settings.app_id)
            for name, expected in _TYPES:
                key = getattr(keys, name)
                found = str(client.type(key))
                if found not in ("none", expected):
                    raise ConfigError(
                        f"SMS_REDIS_URL: ledger key {key} is a {found}, not a {expected}: "
                        "this Redis (or database) holds something else"
                    )
    except (redis.AuthenticationError, redis.exceptions.AuthorizationError) as exc:
        raise ConfigError(f"SMS_REDIS_URL: the ledger Redis refused us: {exc}") from None
    except redis.ResponseError as exc:
        passing = (
            redis.exceptions.ReadOnlyError,
            redis.exceptions.TryAgainError,
            redis.exceptions.ClusterDownError,  # MASTERDOWN too
        )
        if isinstance(exc, passing) or str(exc).startswith(("BUSY", "NOREPLICAS")):
            raise LedgerUnavailable(f"ledger Redis not ready: {exc}") from None
        raise ConfigError(f"SMS_REDIS_URL: the ledger Redis answered {exc}") from None
    finally:
        with contextlib.suppress(Exception):
            client.close()


def wait_for_ledger(
    settings: Settings,
    *,
    wait_s: float,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Return once the ledger answers; wait (bounded, logged) while it is unreachable.

    Raises:
        ConfigError: misconfigured (see :func:`_probe`).
        LedgerUnreachable: still unreachable after ``wait_s``.
    """
    started = clock()
    said = None
    where = redact_url(settings.require_redis_url())
    while True:
        try:
            _probe(settings)
        except (
            LedgerUnavailable,
            redis.ConnectionError,
            redis.TimeoutError,
            RedisClusterException,
        ) as exc:
            waited = clock() - started
            reason = f"{type(exc).__name__}: {exc}"
            if waited >= wait_s:
                raise LedgerUnreachable(
                    f"the ledger Redis (SMS_REDIS_URL={where}) stayed unreachable for "
                    f"{waited:.0f}s ({reason}); giving up (SMS_LEDGER_START_WAIT={wait_s:g})"
                ) from None
            if said is None:
                log.error(
                    "the ledger Redis (SMS_REDIS_URL=%s) is unreachable (%s); not consuming "
                    "until it answers, for up to %gs (SMS_LEDGER_START_WAIT)",
                    where,
                    reason,
                    wait_s,
                )
                said = waited
            elif waited - said >= STILL_WAITING_EVERY_S:
                log.warning("still waiting for the ledger Redis (%.0fs so far)", waited)
                said = waited
            sleep(_PAUSE_S)
            continue
        if said is not None:
            # (at WARNING: logging is not set up yet at worker_init, and INFO would be lost)
            log.warning("the ledger Redis answers; starting")
        return


def check_brokers(settings: Settings) -> None:
    """Refuse a Redis Cluster node as the broker or result backend (Celery cannot use one:
    every queue operation would be redirected). Unreachable ones are left to Celery.

    Raises:
        ConfigError: naming ``SMS_BROKER_URL`` or ``SMS_RESULT_BACKEND``.
    """
    for name, url in (
        ("SMS_BROKER_URL", settings.broker_url),
        ("SMS_RESULT_BACKEND", settings.result_backend),
    ):
        if url is None or urlsplit(url).scheme not in ("redis", "rediss"):
            continue
        probe = redis.Redis.from_url(
            url, socket_timeout=_PROBE_TIMEOUT_S, socket_connect_timeout=_PROBE_TIMEOUT_S
        )
        try:
            info = probe.info("cluster")
        except redis.RedisError:
            continue  # Celery retries the broker itself, and says so
        finally:
            probe.close()
        if int(info.get("cluster_enabled", 0) or 0):
            raise ConfigError(
                f"{name}: {redact_url(url)} is a Redis Cluster node; Celery cannot use a "
                "Redis Cluster (use RabbitMQ, a plain Redis or sentinel://)"
            )


def check_queue_type(settings: Settings, queue: str) -> None:
    """On RabbitMQ, declare ``queue`` as ``SMS_QUEUE_TYPE`` says, so that a queue of the other
    type (a classic ``sms`` queue when switching to quorum) stops the worker with the way out,
    not with a consumer that reconnects forever. Unreachable: left to Celery.

    Raises:
        ConfigError: naming ``SMS_QUEUE_TYPE``.
    """
    if urlsplit(settings.broker_url).scheme not in ("amqp", "amqps", "pyamqp"):
        return
    from amqp.exceptions import PreconditionFailed  # type: ignore[import-untyped]  # noqa: PLC0415
    from kombu.connection import Connection  # noqa: PLC0415 - RabbitMQ only

    arguments = {"x-queue-type": "quorum"} if settings.queue_type == "quorum" else None
    try:
        with Connection(  # type: ignore[no-untyped-call]
            settings.broker_url, connect_timeout=_PROBE_TIMEOUT_S
        ) as connection:
            connection.ensure_connection(max_retries=1)
            connection.default_channel.queue_declare(
                queue=queue, durable=True, auto_delete=False, arguments=arguments
            )
    except PreconditionFailed as exc:
        if "x-queue-type" not in str(exc.reply_text):
            return  # other arguments of the user's own (SMS_CELERY_CONFIG): Celery's to judge
        raise ConfigError(
            f"SMS_QUEUE_TYPE={settings.queue_type}: RabbitMQ already has a queue {queue!r} of "
            f"another type ({exc.reply_text}); a queue cannot change type in place: drain it "
            "and delete it (rabbitmqctl delete_queue), or see operations.md, 'Moving to quorum "
            "queues'"
        ) from None
    except Exception as exc:  # unreachable or refused: Celery says so itself
        log.debug("queue type not checked: %s", exc)
