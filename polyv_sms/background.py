"""What a worker runs beside its tasks: the reconciler thread and the metrics endpoint."""

from __future__ import annotations

import logging
import os
import threading

from polyv_sms import metrics
from polyv_sms.ledger.journal import JournalReplayer
from polyv_sms.ledger.reconcile import Enqueue, Reconciler
from polyv_sms.runtime import get_runtime

__all__ = ["start", "stop"]

log = logging.getLogger("polyv_sms.background")

_lock = threading.Lock()
_reconciler: Reconciler | None = None
_replayer: JournalReplayer | None = None
#: Set by supervisord (``%(process_num)d``) so that worker N serves metrics on port + N.
WORKER_INDEX_ENV = "SMS_WORKER_INDEX"


def start(enqueue_again: Enqueue) -> None:
    """Start the reconciler and, when ``SMS_METRICS_PORT`` is set, the metrics endpoint.

    Args:
        enqueue_again: how the reconciler puts a message back on the broker (the task module
            hands its own in, so that this module does not import Celery's task).
    """
    global _reconciler, _replayer  # noqa: PLW0603 - one per worker process
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
        if _replayer is None and runtime.journal is not None:
            # Answers a dead worker of this host left in the journal reach the ledger now.
            _replayer = JournalReplayer(runtime.journal, runtime.ledger)
            _replayer.start()
        if _reconciler is None and settings.reconcile_interval_s > 0:
            _reconciler = Reconciler(
                runtime.ledger,
                enqueue_again,
                interval_s=settings.reconcile_interval_s,
                journal=runtime.journal,
            )
            _reconciler.start()
            log.info("reconciler sweeping every %gs", settings.reconcile_interval_s)


def stop() -> None:
    """Stop the reconciler and journal threads."""
    global _reconciler, _replayer  # noqa: PLW0603
    with _lock:
        if _replayer is not None:
            _replayer.stop()
            _replayer = None
        if _reconciler is not None:
            _reconciler.stop()
            _reconciler = None
