"""The worker's long-lived objects (Redis client, ledger, Polyv client, dispatcher), built once
per process from :class:`~polyv_sms.config.Settings` on first use.

Tests replace them with :func:`set_runtime` (an injected clock, say) before a worker runs.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import redis

from polyv_sms.config import JOURNAL_DIR_ENV, Settings
from polyv_sms.dispatch import Dispatcher
from polyv_sms.errors import ConfigError
from polyv_sms.ledger import Ledger, build_ledger, connect_redis
from polyv_sms.ledger.journal import Journal
from polyv_sms.polyv.client import PolyvClient

__all__ = ["Runtime", "build_runtime", "get_runtime", "set_runtime"]


@dataclass(frozen=True)
class Runtime:
    """Everything a worker process needs to send."""

    settings: Settings
    redis: redis.Redis
    ledger: Ledger
    client: PolyvClient
    dispatcher: Dispatcher
    journal: Journal | None = None

    def close(self) -> None:
        """Release pooled connections."""
        self.client.close()
        self.redis.close()


#: Threads of this worker process (``celery worker -c`` may differ from
#: ``SMS_WORKER_CONCURRENCY``), recorded at start-up: the HTTP pool keeps a connection per
#: thread, or urllib3 discards and reopens connections under load.
_worker_threads = 0


def set_worker_threads(count: int) -> None:
    """Record how many threads this worker runs tasks in (sizes the HTTP connection pool)."""
    global _worker_threads  # noqa: PLW0603 - one worker per process
    _worker_threads = count


def build_runtime(
    settings: Settings,
    *,
    clock: Callable[[], float] = time.time,
    rng: random.Random | None = None,
) -> Runtime:
    """Build the runtime for ``settings``.

    Raises:
        ConfigError: the credentials or the ledger's Redis (``SMS_REDIS_URL``) are missing,
            or the journal's directory (``SMS_JOURNAL_DIR``) cannot be created.
    """
    app_id, secret = settings.require_credentials()
    journal = None
    if settings.journal_dir:
        try:
            journal = Journal(settings.journal_dir, app_id)
        except OSError as exc:
            raise ConfigError(
                f"{JOURNAL_DIR_ENV}={settings.journal_dir!r}: cannot create the journal ({exc})"
            ) from None
    client = connect_redis(settings.require_redis_url())
    ledger = build_ledger(settings, client, clock=clock)
    polyv = PolyvClient(
        app_id,
        secret,
        settings.api_base,
        settings.http_timeout_s,
        clock=clock,
        pool_maxsize=max(10, settings.worker_concurrency, _worker_threads),
    )
    dispatcher = Dispatcher(
        ledger,
        polyv,
        max_attempts=settings.max_attempts,
        retry_backoff_s=settings.retry_backoff_s,
        retry_backoff_max_s=settings.retry_backoff_max_s,
        retry_ambiguous=settings.retry_ambiguous,
        rng=rng,
        clock=clock,
        journal=journal,
    )
    return Runtime(settings, client, ledger, polyv, dispatcher, journal)


_lock = threading.Lock()
_current: tuple[int, Runtime] | None = None


def get_runtime() -> Runtime:
    """The runtime of this process, built from the environment on first use (and again
    after a fork: connections are not shared across processes)."""
    global _current  # noqa: PLW0603 - one runtime per process, by design
    current = _current
    if current is not None and current[0] == os.getpid():
        return current[1]
    with _lock:
        if _current is None or _current[0] != os.getpid():
            _current = (os.getpid(), build_runtime(Settings.from_env()))
        return _current[1]


def set_runtime(runtime: Runtime | None) -> None:
    """Replace this process's runtime (``None``: build from the environment on next use)."""
    global _current  # noqa: PLW0603
    with _lock:
        _current = None if runtime is None else (os.getpid(), runtime)
