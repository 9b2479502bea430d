"""The Celery app of polyv-sms: ``celery -A polyv_sms.worker worker -Q sms.urgent,sms,sms.bulk``
(the three lanes, urgent first; ``-Q sms`` alone serves only the standard lane).

Importing this module connects to nothing and reads no environment variable: the
configuration is built from :meth:`Settings.from_env` the first time Celery needs it, so an
application that only enqueues needs neither credentials nor a reachable broker at import.
A worker refuses to start without ``POLYV_APP_ID``/``POLYV_APP_SECRET`` or without a Redis
for the ledger (``SMS_REDIS_URL``, needed when the broker is not Redis). Without a result
backend (a non-Redis broker and neither ``SMS_RESULT_BACKEND`` nor ``SMS_REDIS_URL``) Celery
stores no results: ``AsyncResult.get()`` then needs ``SMS_RESULT_BACKEND``.

The settings and why (see docs/configuration.md):

- ``task_acks_late`` + ``task_reject_on_worker_lost``: a killed worker's task is delivered
  again; the ledger makes that safe.
- ``worker_prefetch_multiplier=1``: a worker does not hoard messages other workers could run.
- JSON only: no pickle from the broker.
- ``visibility_timeout`` on broker *and* result backend transport options; retry countdowns
  (``SMS_RETRY_BACKOFF_MAX``) are checked to stay below a third of it.
- ``task_time_limit`` above the worst HTTP time of a message; ``worker_soft_shutdown_timeout``
  lets a cold shutdown finish an in-flight Polyv request.
- ``broker_connection_retry_on_startup``, ``result_backend_always_retry`` and a longer publish
  retry policy ride out a broker restart.
- not a setting: on Redis brokers the worker reconnects on the ``-UNBLOCKED`` answer a demoted
  master gives its waiting BRPOP (a failover) instead of stopping, and a message BRPOP took
  whose unacknowledged record failed is restored, not dropped (:mod:`polyv_sms.broker_failover`).
- the threads pool: the work is waiting on HTTP and Redis.
- task events off (Celery's default): each costs a broker publish; Flower enables them.
- ``sentinel://`` URLs (this project's one form, see :class:`~polyv_sms.config.SentinelUrl`) are
  translated into kombu's (``sentinel://h:p;sentinel://h:p``) plus the ``master_name``
  transport option, for the broker and the result backend alike.
- ``SMS_QUEUE_TYPE=quorum`` (RabbitMQ): queues declared ``x-queue-type: quorum`` on a topic
  exchange, which Celery's native delayed delivery needs to hold countdown retries in RabbitMQ
  (not in the worker's memory); publisher confirms on every RabbitMQ broker.
- ``SMS_CELERY_CONFIG``: a module of Celery settings laid over these (its transport option
  dicts are merged key by key), so a user's settings win. (``app.add_defaults`` shadows
  ``config_from_object`` and ``celery --config``; only ``app.conf.update`` in code and this
  module win over it.)
"""

from __future__ import annotations

import importlib
import logging
import sys
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

import redis
from celery import Celery, signals

from polyv_sms import routing
from polyv_sms.accounts import load_accounts, widest
from polyv_sms.config import Settings, parse_sentinel_url
from polyv_sms.errors import ConfigError
from polyv_sms.lanes import WORKER_QUEUES

__all__ = [
    "PUBLISH_RETRY_POLICY",
    "QUEUE",
    "REDIS_SOCKET_TIMEOUT_S",
    "TASK_NAME",
    "WORKER_QUEUES",
    "app",
    "celery_config",
    "give_up_on_timeouts",
    "project_config",
]

log = logging.getLogger("polyv_sms.worker")

QUEUE = "sms"
TASK_NAME = "polyv_sms.send_sms"
#: How long a command on the Redis broker's or result backend's connections may wait for its
#: answer, and a connect for the server (kombu sets no timeout on the broker's, Celery 120 s on
#: the result backend's). A Redis that accepts connections and never answers (stopped with
#: SIGSTOP, stuck) or a host that drops packets is then an error after this long, not a wait as
#: long as the connection stays open. Three seconds is far above a healthy Redis's slowest
#: answer (a fork for a snapshot stalls it for tens of milliseconds per GB).
REDIS_SOCKET_TIMEOUT_S = 3.0


def give_up_on_timeouts(exc: BaseException, interval: float) -> None:
    """kombu's ``errback`` of a publish: a broker that timed out is not tried again.

    A refused or reset connection is retried (a Redis restarting). A timeout is a server that
    accepts and does not answer: each retry would wait the whole socket timeout again, and a
    frozen server that wakes would run every retried publish it had buffered. Only a Redis
    broker's timeouts (redis-py's ``TimeoutError``): a RabbitMQ broker keeps kombu's retries.
    """
    del interval
    if isinstance(exc, redis.TimeoutError):
        raise exc


#: Publishing (a task or a retry) retries with this policy while the broker is unreachable.
#: Against a stopped Redis kombu gives up after about 6 s (tests/reliability measure it); what
#: a longer outage drops, the reconciler enqueues again from the ledger. A timeout
#: (REDIS_SOCKET_TIMEOUT_S) ends the publish at once (:func:`give_up_on_timeouts`).
PUBLISH_RETRY_POLICY = {
    "max_retries": 10,
    "interval_start": 0.2,
    "interval_step": 0.5,
    "interval_max": 3.0,
    "errback": give_up_on_timeouts,
}


#: Transport option dicts of a user's config module are merged into the project's key by key.
_MERGED = ("broker_transport_options", "result_backend_transport_options")
_AMQP = ("amqp", "amqps", "pyamqp")


def celery_config(settings: Settings) -> dict[str, Any]:
    """The Celery configuration for ``settings``."""
    settings = widest(settings)  # a message of any account fits (issue 12)
    visibility = {"visibility_timeout": int(settings.visibility_timeout_s)}
    broker_options: dict[str, Any] = dict(visibility)
    result_options: dict[str, Any] = dict(visibility)
    broker_url = settings.broker_url
    if broker_url.startswith("sentinel:"):
        sentinel = parse_sentinel_url(broker_url, "SMS_BROKER_URL")
        broker_url = sentinel.kombu_url()
        broker_options["master_name"] = sentinel.master_name
    result_backend = settings.result_backend
    if result_backend is not None and result_backend.startswith("sentinel:"):
        sentinel = parse_sentinel_url(result_backend, "SMS_RESULT_BACKEND")
        result_backend = sentinel.kombu_url()
        result_options["master_name"] = sentinel.master_name
    if settings.broker_url.startswith(("redis", "rediss", "sentinel")):
        # Sweep for messages of dead workers often enough to honour a short visibility timeout.
        sweep = max(1, min(10, int(settings.visibility_timeout_s // 10)))
        broker_options |= {"unacked_restore_interval": sweep, "unacked_restore_throttle": 1}
        # Lanes (issue 12): BRPOP the consumed queues in the order given (-Q sms.urgent,sms,
        # sms.bulk), not round-robin, so that urgent work is always taken first.
        broker_options["queue_order_strategy"] = "priority"
        # A frozen broker is an error within a bound, not a wait without end (kombu's own
        # advice for a broker that can vanish without closing the connection).
        broker_options["socket_timeout"] = REDIS_SOCKET_TIMEOUT_S
        broker_options["socket_connect_timeout"] = REDIS_SOCKET_TIMEOUT_S
    time_limit = settings.task_time_limit_s
    config: dict[str, Any] = {
        "broker_url": broker_url,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "task_default_queue": QUEUE,
        "task_routes": {TASK_NAME: {"queue": QUEUE}},
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "broker_transport_options": broker_options,
        "result_backend_transport_options": result_options,
        "task_time_limit": time_limit,
        "task_soft_time_limit": time_limit - 5,
        "worker_soft_shutdown_timeout": 2 * settings.http_timeout_s + 5,
        "broker_connection_retry_on_startup": True,
        "result_backend_always_retry": True,
        "result_backend_max_retries": 30,
        "task_publish_retry_policy": PUBLISH_RETRY_POLICY,
        # Task events cost a broker publish per task state (~0.2 ms of CPU each, measured in
        # benchmarks/README.md): off, as in Celery. Flower turns the workers' events on by
        # itself (its enable_events option, on by default); `celery worker -E` does too.
        "worker_send_task_events": False,
        "task_send_sent_event": False,
        "worker_pool": "threads",
        "worker_concurrency": settings.worker_concurrency,
        "worker_hijack_root_logger": True,
        "polyv_sms_account_daily_limit": settings.account_daily_limit,
        # Accounts (issue 12): names and appIds the producer checks and stamps; no secret.
        **routing.producer_accounts(settings),
    }
    if result_backend is not None:
        # Left out otherwise: Celery then runs without a result backend (it has no amqp:// one).
        config["result_backend"] = result_backend
        config["redis_socket_timeout"] = REDIS_SOCKET_TIMEOUT_S
        config["redis_socket_connect_timeout"] = REDIS_SOCKET_TIMEOUT_S
    if urlsplit(settings.broker_url).scheme in _AMQP:
        # RabbitMQ confirms each publish (a task, a retry) once it has it: kombu's publish
        # returns only then, and raises if RabbitMQ refuses it.
        broker_options["confirm_publish"] = True
    if settings.queue_type == "quorum":
        config |= {
            # Every queue Celery declares (sms and any other it routes to) is a quorum queue
            # on a topic exchange: native delayed delivery cannot route through a direct one.
            "task_default_queue_type": "quorum",
            "task_default_exchange_type": "topic",
            "task_create_missing_queue_type": "quorum",
            "task_create_missing_queue_exchange_type": "topic",
            # Countdown retries wait in RabbitMQ's celery_delayed_* queues (quorum too), not
            # in the worker (quorum queues have no global QoS for ETA tasks to lean on).
            "broker_native_delayed_delivery_queue_type": "quorum",
            "worker_detect_quorum_queues": True,
        }
    return config


def _user_settings(name: str) -> dict[str, Any]:
    """The Celery settings of the module ``SMS_CELERY_CONFIG`` names."""
    try:
        module = importlib.import_module(name)
    except ImportError as exc:
        raise ConfigError(f"SMS_CELERY_CONFIG={name!r} cannot be imported: {exc}") from None
    return {
        key: value
        for key, value in vars(module).items()
        if not key.startswith("_") and key.islower() and not isinstance(value, ModuleType)
    }


def project_config(settings: Settings) -> dict[str, Any]:
    """The project's Celery configuration with the user's ``SMS_CELERY_CONFIG`` laid over it.

    The user's settings win; their ``broker_transport_options`` and
    ``result_backend_transport_options`` are merged into the project's key by key (so giving
    ``sentinel_kwargs`` keeps the visibility timeout).
    """
    config = celery_config(settings)
    if settings.celery_config_module:
        for key, value in _user_settings(settings.celery_config_module).items():
            if key in _MERGED and isinstance(value, dict):
                config[key] = {**config.get(key, {}), **value}
            else:
                config[key] = value
    return config


app = Celery("polyv_sms", include=["polyv_sms.tasks"])
app.add_defaults(lambda: project_config(Settings.from_env()))


@signals.worker_init.connect
def _refuse_without_credentials(**_: Any) -> None:
    """Stop a worker that could not send: no credentials, no Redis for the ledger, a ledger
    that refuses us or holds something else, a Redis Cluster as broker. Wait (bounded) for a
    ledger that does not answer yet: consuming without one would only queue up retries."""
    from polyv_sms import preflight  # noqa: PLC0415 - only workers need it

    try:
        settings = Settings.from_env()
        if not load_accounts(settings):  # an accounts file may stand in for POLYV_APP_ID
            settings.require_credentials()
        settings.require_redis_url()
        preflight.check_brokers(settings)
        for queue in WORKER_QUEUES:
            preflight.check_queue_type(settings, queue)
        preflight.wait_for_ledger(settings, wait_s=settings.ledger_start_wait_s)
    except ConfigError as exc:
        _exit(f"polyv-sms worker: {exc}", 78)  # EX_CONFIG
    except preflight.LedgerUnreachable as exc:
        _exit(f"polyv-sms worker: {exc}", preflight.EXIT_UNAVAILABLE)


def _exit(line: str, code: int) -> None:
    sys.stderr.write(line + "\n")
    sys.stderr.flush()
    raise SystemExit(code) from None


@signals.worker_init.connect
def _ride_out_a_master_demotion(**_: Any) -> None:
    from polyv_sms import broker_failover  # noqa: PLC0415 - only workers consume

    broker_failover.install()  # only Redis brokers use it; see polyv_sms/broker_failover.py


@signals.worker_init.connect
def _write_results_cheaply(**_: Any) -> None:
    from polyv_sms import results  # noqa: PLC0415 - only workers need it

    results.install()  # the text Celery writes of each result: see polyv_sms/results.py


@signals.worker_init.connect
def _record_threads(sender: Any = None, **_: Any) -> None:
    from polyv_sms import runtime  # noqa: PLC0415 - only workers need it

    threads = getattr(sender, "concurrency", None)
    if isinstance(threads, int):
        runtime.set_worker_threads(threads)


@signals.after_setup_logger.connect
@signals.after_setup_task_logger.connect
def _redact_logs(logger: logging.Logger, **_: Any) -> None:
    from polyv_sms import logs  # noqa: PLC0415 - only workers need it

    settings = Settings.from_env()
    try:
        secrets = [account.app_secret.reveal() for account in load_accounts(settings).values()]
    except ConfigError:  # the worker refuses to start with a message of its own
        secrets = [settings.app_secret.reveal()] if settings.app_secret else []
    logs.install(logger, tuple(secrets))
