"""What a worker runs beside its tasks: the reconciler thread and the metrics endpoint."""

from __future__ import annotations

import logging
import os
import threading

from polyv_sms import metrics
from polyv_sms.ledger.reconcile import Enqueue, Reconciler
from polyv_sms.runtime import get_runtime

__all__ = ["start", "stop"]

log = logging.getLogger("polyv_sms.background")

_lock = threading.Lock()
_reconcilers: list[Reconciler] = []
#: Set by supervisord (``%(process_num)d``) so that worker N serves metrics on port + N.
WORKER_INDEX_ENV = "SMS_WORKER_INDEX"


def start(enqueue_again: Enqueue) -> None:
    """Start the reconciler and, when ``SMS_METRICS_PORT`` is set, the metrics endpoint.

    Args:
        enqueue_again: how the reconciler puts a message back on the broker (the task module
            hands its own in, so that this module does not import Celery's task).
    """
    runtime = get_runtime()
    settings = runtime.settings
    with _lock:
        if settings.metrics_port is not None:
            raw_index = os.environ.get(WORKER_INDEX_ENV, "") or "0"
            index = int(raw_index) if raw_index.isdigit() else 0
            if not raw_index.isdigit():
                log.error(
                    "%s=%r is not a number; serving metrics as worker 0",
                    WORKER_INDEX_ENV,
                    raw_index,
                )
            port = settings.metrics_port + index
            try:
                metrics.serve(port)
            except OSError as exc:
                # Sending matters more than metrics: keep the worker (and the reconciler) up.
                log.error("metrics: cannot listen on port %d (%s); no metrics served", port, exc)
        if not _reconcilers and settings.reconcile_interval_s > 0:
            # One per account: each sweeps its own ledger keys (issue 12).
            ledgers = [runtime.account(name).ledger for name in sorted(runtime.accounts)]
            for ledger in ledgers or [runtime.ledger]:
                reconciler = Reconciler(
                    ledger, enqueue_again, interval_s=settings.reconcile_interval_s
                )
                reconciler.start()
                _reconcilers.append(reconciler)
            log.info(
                "reconciler sweeping every %gs (%d accounts)",
                settings.reconcile_interval_s,
                len(_reconcilers),
            )


def stop() -> None:
    """Stop the reconciler thread."""
    with _lock:
        while _reconcilers:
            _reconcilers.pop().stop()
