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
- the threads pool: the work is waiting on HTTP and Redis.
- task events off (Celery's default): each costs a broker publish; Flower enables them.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from celery import Celery, signals

from polyv_sms import routing
from polyv_sms.accounts import load_accounts, widest
from polyv_sms.config import Settings
from polyv_sms.errors import ConfigError
from polyv_sms.lanes import WORKER_QUEUES

__all__ = ["QUEUE", "TASK_NAME", "WORKER_QUEUES", "app", "celery_config"]

log = logging.getLogger("polyv_sms.worker")

QUEUE = "sms"
TASK_NAME = "polyv_sms.send_sms"
#: Publishing (a task or a retry) retries with this policy while the broker is unreachable.
#: Against a stopped Redis kombu gives up after about 6 s (tests/reliability measure it); what
#: a longer outage drops, the reconciler enqueues again from the ledger.
PUBLISH_RETRY_POLICY = {
    "max_retries": 10,
    "interval_start": 0.2,
    "interval_step": 0.5,
    "interval_max": 3.0,
}


def celery_config(settings: Settings) -> dict[str, Any]:
    """The Celery configuration for ``settings``."""
    settings = widest(settings)  # a message of any account fits (issue 12)
    visibility = {"visibility_timeout": int(settings.visibility_timeout_s)}
    broker_options: dict[str, Any] = dict(visibility)
    if settings.broker_url.startswith(("redis", "rediss", "sentinel")):
        # Sweep for messages of dead workers often enough to honour a short visibility timeout.
        sweep = max(1, min(10, int(settings.visibility_timeout_s // 10)))
        broker_options |= {"unacked_restore_interval": sweep, "unacked_restore_throttle": 1}
        # Lanes (issue 12): BRPOP the consumed queues in the order given (-Q sms.urgent,sms,
        # sms.bulk), not round-robin, so that urgent work is always taken first.
        broker_options["queue_order_strategy"] = "priority"
    time_limit = settings.task_time_limit_s
    config: dict[str, Any] = {
        "broker_url": settings.broker_url,
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
        "result_backend_transport_options": dict(visibility),
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
    if settings.result_backend is not None:
        # Left out otherwise: Celery then runs without a result backend (it has no amqp:// one).
        config["result_backend"] = settings.result_backend
    return config


app = Celery("polyv_sms", include=["polyv_sms.tasks"])
app.add_defaults(lambda: celery_config(Settings.from_env()))


@signals.worker_init.connect
def _refuse_without_credentials(**_: Any) -> None:
    """Stop a worker that could not send: no credentials, or no Redis for the ledger."""
    try:
        settings = Settings.from_env()
        if not load_accounts(settings):  # an accounts file may stand in for POLYV_APP_ID
            settings.require_credentials()
        settings.require_redis_url()
    except ConfigError as exc:
        sys.stderr.write(f"polyv-sms worker: {exc}\n")
        sys.stderr.flush()
        raise SystemExit(78) from None  # EX_CONFIG


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
