"""What a worker runs beside its tasks: the reconciler thread, the metrics endpoint and the
mover of mis-routed tasks (:mod:`polyv_sms.misrouted`)."""

from __future__ import annotations

import logging
import os
import threading

from polyv_sms import metrics
from polyv_sms.ledger.journal import JournalReplayer, stranded
from polyv_sms.ledger.reconcile import Enqueue, Reconciler
from polyv_sms.misrouted import MisroutedMover
from polyv_sms.runtime import AccountRuntime, get_runtime

__all__ = ["BackgroundError", "start", "start_in_pool_child", "stop"]

log = logging.getLogger("polyv_sms.background")

_lock = threading.Lock()
_reconcilers: list[Reconciler] = []
_replayers: list[JournalReplayer] = []
#: The process whose threads ``_replayers`` are (a forked child inherits the list, not them).
_replayers_pid: int | None = None
_mover: MisroutedMover | None = None
#: Set by supervisord (``%(process_num)d``) so that worker N serves metrics on port + N.
WORKER_INDEX_ENV = "SMS_WORKER_INDEX"


class BackgroundError(Exception):
    """A part of the worker beside its tasks could not start; the worker must stop."""


def start(enqueue_again: Enqueue) -> None:
    """Start the reconciler, the mover of mis-routed tasks (Redis brokers) and, when
    ``SMS_METRICS_PORT`` is set, the metrics endpoint.

    A worker without the parts it was configured with is a silent half-start (no metrics
    scraped, no reconciler sweeping): the caller stops the worker on :class:`BackgroundError`.

    Args:
        enqueue_again: how the reconciler puts a message back on the broker (the task module
            hands its own in, so that this module does not import Celery's task).

    Raises:
        BackgroundError: one of them could not start; the message says which and why
            (naming the variable).
    """
    global _mover  # noqa: PLW0603 - one per worker process
    try:
        runtime = get_runtime()
    except Exception as exc:
        raise BackgroundError(f"cannot build the worker's runtime: {exc}") from exc
    settings = runtime.settings
    with _lock:
        if settings.metrics_port is not None:
            raw_index = os.environ.get(WORKER_INDEX_ENV, "").strip() or "0"
            if not raw_index.isdigit():
                raise BackgroundError(f"{WORKER_INDEX_ENV}={raw_index!r} is not a number")
            port = settings.metrics_port + int(raw_index)
            try:
                metrics.serve(port)
            except (OSError, OverflowError) as exc:
                raise BackgroundError(
                    f"metrics: cannot listen on port {port} (SMS_METRICS_PORT="
                    f"{settings.metrics_port} + {WORKER_INDEX_ENV}={raw_index}): {exc}"
                ) from exc
        try:
            accounts = [runtime.account(name) for name in sorted(runtime.accounts)]
        except Exception as exc:
            raise BackgroundError(f"cannot build the accounts' runtimes: {exc}") from exc
        if _start_replayers(accounts) and settings.journal_dir:
            journals = [b.journal for b in accounts if b.journal is not None]
            for name, count in stranded(settings.journal_dir, journals).items():
                log.error(
                    "journal %s holds %d answers of an appId none of this worker's "
                    "accounts has (removed from SMS_ACCOUNTS_FILE?): they do not reach "
                    "the ledger until a worker with that account runs on this host",
                    os.path.join(settings.journal_dir, name),
                    count,
                )
        if not _reconcilers and settings.reconcile_interval_s > 0:
            # One per account: each sweeps its own ledger keys.
            try:
                for built in accounts:
                    reconciler = Reconciler(
                        built.ledger,
                        enqueue_again,
                        interval_s=settings.reconcile_interval_s,
                        journal=built.journal,
                    )
                    reconciler.start()
                    _reconcilers.append(reconciler)
            except Exception as exc:
                while _reconcilers:
                    _reconcilers.pop().stop()
                raise BackgroundError(f"the reconciler could not start: {exc}") from exc
            log.info(
                "reconciler sweeping every %gs (%d accounts)",
                settings.reconcile_interval_s,
                len(_reconcilers),
            )
        if _mover is None:
            try:
                _mover = MisroutedMover.for_broker(settings.broker_url)
            except Exception as exc:
                raise BackgroundError(
                    f"the mover of mis-routed tasks could not start: {exc}"
                ) from exc
            if _mover is not None:
                _mover.start()


def _start_replayers(accounts: list[AccountRuntime]) -> bool:
    """Start this process's journal threads (under ``_lock``); ``False`` if they run."""
    global _replayers_pid  # noqa: PLW0603 - one set per process
    if _replayers and _replayers_pid == os.getpid():
        return False
    _replayers.clear()  # (a forked child's copy of its parent's, whose threads it has not)
    _replayers_pid = os.getpid()
    # Answers a dead worker of this host left in a journal reach the ledger now, and this
    # process's own answers whose settle failed once the ledger answers.
    for built in accounts:
        if built.journal is not None:
            replayer = JournalReplayer(built.journal, built.ledger, account=built.account.name)
            replayer.start()
            _replayers.append(replayer)
    return True


def start_in_pool_child() -> None:
    """In a pool child process (Celery's prefork pool, when an operator's settings choose it):
    journal threads of its own. The child's answers whose settle failed are its own to replay
    - no other process replays a live process's entries - and the threads the main process
    started at ``worker_ready`` are not in the child. (The reconciler, the metrics endpoint and
    the mover stay in the main process.) A runtime that cannot be built is logged: the child's
    tasks meet the same error and retry."""
    try:
        runtime = get_runtime()
        accounts = [runtime.account(name) for name in sorted(runtime.accounts)]
    except Exception as exc:
        log.error("journal threads of pool process %d not started: %s", os.getpid(), exc)
        return
    with _lock:
        _start_replayers(accounts)


def stop() -> None:
    """Stop the journal replayers, the reconcilers and the mover of mis-routed tasks."""
    global _mover  # noqa: PLW0603
    with _lock:
        while _replayers:
            _replayers.pop().stop()
        while _reconcilers:
            _reconcilers.pop().stop()
        if _mover is not None:
            _mover.stop()
            _mover = None
