"""The ``polyv_sms.send_sms`` task. Thin: validation, the dispatcher and Celery's retry.

Producers call ``send_sms.delay(...)``: the request is validated before anything is
published, so a bad request raises :class:`~polyv_sms.errors.InvalidRequest` in the caller and
nothing is enqueued. Producers that enqueue by name (``send_task``) are validated again in the
worker: the task fails at once, nothing is sent and no retry follows.

An unreachable broker or result backend makes ``send_sms.delay()`` raise
:class:`~polyv_sms.errors.BrokerUnavailable` within :data:`ENQUEUE_BOUND_S` (when the server
refuses connections: stopped, wrong port; or accepts them and does not answer: stopped with
SIGSTOP, stuck), never Celery's own errors; the task is then not published, except that a
broker which timed out may still run the publish it had buffered when it wakes
(``BrokerUnavailable.maybe_published``).
"""

from __future__ import annotations

import functools
import logging
import math
import sys
import time
import uuid
from typing import Any

import redis
from celery import Task, signals
from celery.backends.redis import RedisBackend
from celery.exceptions import Ignore, Reject, WorkerShutdown
from celery.result import task_join_will_block
from celery.utils.quorum_queues import detect_quorum_queues
from kombu.exceptions import OperationalError

from polyv_sms import background, metrics, routing
from polyv_sms.config import DEFAULT_ACCOUNT_DAILY_LIMIT, Settings
from polyv_sms.errors import BrokerUnavailable, InvalidRequest, LedgerBroken, LedgerUnavailable
from polyv_sms.ledger.ratelimit import RATE_LIMIT_PAUSE_S
from polyv_sms.polyv.phones import mask
from polyv_sms.runtime import get_runtime
from polyv_sms.validation import validate_request
from polyv_sms.worker import REDIS_SOCKET_TIMEOUT_S, TASK_NAME, app

__all__ = ["ENQUEUE_BOUND_S", "SendSmsTask", "enqueue_again", "send_sms"]

log = logging.getLogger("polyv_sms.tasks")

_SHOWN_NUMBERS = 10
#: A producer reconnects to an unreachable result backend this often before ``delay()`` gives
#: up (Celery's own policy, 20 tries a second apart, made ``delay()`` hang for 20 s); no retry
#: begins more than ``timeout`` seconds after the first try, so a backend that timed out
#: (``REDIS_SOCKET_TIMEOUT_S``: it accepts and does not answer) is not tried again.
RESULT_RECONNECT_POLICY = {
    "max_retries": 3,
    "interval_start": 0,
    "interval_step": 0.5,
    "interval_max": 1.0,
    "timeout": 2.0,
}
#: ``delay()`` raises BrokerUnavailable within this many seconds when the result backend
#: (about 2 s, RESULT_RECONNECT_POLICY) or the broker (about 6.5 s, PUBLISH_RETRY_POLICY)
#: refuses connections, or either accepts connections and does not answer (3 to 6 s,
#: REDIS_SOCKET_TIMEOUT_S). tests/test_edges.py checks it against a stopped and a frozen
#: redis-server.
ENQUEUE_BOUND_S = 10.0
#: Past the holder's lease and takeover grace (or Polyv's block), how much longer a run whose
#: retry could not be published waits in place.
_BUSY_WAIT_MARGIN_S = 5.0
#: Why a run may end without a result that it can wait out in place (see the task).
_WAIT_IN_PLACE = frozenset({"busy", "rate", "paused"})


def masked_kwargs_repr(kwargs: dict[str, Any]) -> str:
    """What Celery logs and Flower shows of a task's arguments: numbers masked, values hidden."""
    numbers = [mask(str(n)) for n in kwargs["phone_numbers"][:_SHOWN_NUMBERS]]
    extra = len(kwargs["phone_numbers"]) - _SHOWN_NUMBERS
    if extra > 0:
        numbers.append(f"...+{extra}")
    shown = {
        "phone_numbers": numbers,
        "template_param_names": kwargs["template_param_names"],
        "template_param_values": ["***"] * len(kwargs["template_param_values"]),
        "message_id": kwargs["message_id"],
    }
    shown |= {key: kwargs[key] for key in ("account", "lane") if key in kwargs}
    return repr(shown)


class SendSmsTask(Task):  # type: ignore[misc]
    """Validates a request in the producer before it is published."""

    def apply_async(  # noqa: PLR0917 - Celery's signature
        self,
        args: Any = None,
        kwargs: Any = None,
        task_id: str | None = None,
        producer: Any = None,
        link: Any = None,
        link_error: Any = None,
        shadow: str | None = None,
        **options: Any,
    ) -> Any:
        """Validate and normalise the arguments, then publish (see :meth:`celery.Task.apply_async`).

        Raises:
            InvalidRequest: the request is malformed; nothing was published.
            BrokerUnavailable: the broker or the result backend could not be reached within
                ENQUEUE_BOUND_S (``variable`` says which); nothing was published, unless the
                broker timed out (``maybe_published``).
        """
        limit = self.app.conf.get("polyv_sms_account_daily_limit") or DEFAULT_ACCOUNT_DAILY_LIMIT
        request = validate_request(args, kwargs, account_daily_limit=limit)
        checked = request.as_kwargs()
        routing.route(self.app.conf, request, options)
        options.setdefault("argsrepr", "()")
        options.setdefault("kwargsrepr", masked_kwargs_repr(checked))
        task_id = task_id or str(uuid.uuid4())
        if not options.get("ignore_result", self.ignore_result):
            self._listen_for_result(task_id)
        try:
            return super().apply_async(
                (), checked, task_id, producer, link, link_error, shadow, **options
            )
        except OperationalError as exc:
            cause = exc.__cause__
            # A Redis broker's timeout past the connect (redis-py's "Timeout connecting to
            # server" sent nothing): the publish may sit in the frozen server's input buffer
            # and run when it wakes; it and an enqueue again under the same key (the ledger's)
            # are sent once.
            if isinstance(cause, redis.TimeoutError) and "connecting" not in str(cause):
                key = request.message_id or task_id
                raise BrokerUnavailable(
                    f"the broker (SMS_BROKER_URL) did not answer within {REDIS_SOCKET_TIMEOUT_S:g}"
                    f" s ({_reason(exc)}); the task may still reach the queue if the broker "
                    f"wakes: enqueue again with message_id={key!r} and it is sent once",
                    variable="SMS_BROKER_URL",
                    maybe_published=True,
                    message_id=key,
                ) from exc
            raise BrokerUnavailable(
                f"cannot reach the broker (SMS_BROKER_URL): {_reason(exc)}; the task was not "
                "published",
                variable="SMS_BROKER_URL",
            ) from exc

    def _listen_for_result(self, task_id: str) -> None:
        """Subscribe to the task's result before publishing, within a bounded time.

        Celery subscribes inside ``apply_async`` (then finds this subscription and skips it);
        doing it here tells a result-backend failure from a broker failure, before anything
        is published.

        Raises:
            BrokerUnavailable: the result backend did not answer; nothing was published.
        """
        backend = self.backend
        if task_join_will_block() or not isinstance(backend, RedisBackend):
            return  # in a worker (retries, the reconciler); or no backend that subscribes
        consumer = backend.result_consumer
        if not getattr(consumer, "_polyv_sms_bounded", False):
            # Celery's ResultConsumer reconnects with ``_ensure``: bound it (see above).
            consumer._ensure = functools.partial(backend.ensure, **RESULT_RECONNECT_POLICY)
            consumer._polyv_sms_bounded = True
        try:
            backend.on_task_call(None, task_id)
        except (RuntimeError, redis.RedisError, OperationalError) as exc:
            cause = exc.__cause__ or exc
            raise BrokerUnavailable(
                f"cannot reach the result backend (SMS_RESULT_BACKEND): {_reason(cause)}; the "
                "task was not published",
                variable="SMS_RESULT_BACKEND",
            ) from exc


def _reason(exc: BaseException) -> str:
    return str(exc).strip().rstrip(".") or type(exc).__name__


def _retry_cap(settings: Settings) -> int:
    """Task retries after which the pending numbers are given up (a safety net: attempts are
    bounded by the ledger, waits for another run's lease by that run's progress)."""
    return 4 * settings.max_attempts + 20


@app.task(
    bind=True,
    base=SendSmsTask,
    name=TASK_NAME,
    max_retries=None,
    acks_late=True,
    reject_on_worker_lost=True,
    throws=(InvalidRequest, LedgerBroken),
)
def send_sms(self: SendSmsTask, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """Send one SMS notification to up to ``SMS_ACCOUNT_DAILY_LIMIT`` numbers.

    The arguments, by position or by name, are ``phone_numbers``, ``template_param_names``,
    ``template_param_values`` and ``message_id``; they are bound here, like a call would bind
    them, so that a producer enqueueing by name with a wrong call (an unknown keyword, too many
    arguments) gets an :class:`~polyv_sms.errors.InvalidRequest`, not a ``TypeError``.

    Args:
        phone_numbers: mobile numbers (strings or ints); duplicates are sent once.
        template_param_names: the Aliyun template's parameter names.
        template_param_values: one value per name.
        message_id: idempotency key; the task id when omitted. Enqueueing the same id again
            sends nothing that was accepted and reports the stored outcomes.
        account: keyword only; the account that sends it (``default``: ``POLYV_APP_ID``;
            others from ``SMS_ACCOUNTS_FILE``). Never sent through another one.
        lane: keyword only; ``urgent``, ``standard`` or ``bulk`` (queues ``sms.urgent``,
            ``sms``, ``sms.bulk``); bulk stops ``SMS_BULK_HEADROOM`` units short of the
            account's daily limit.

    Returns:
        ``{"message_id", "results": [per number], "counts": {outcome: n}, "account",
        "lane"}``.
    """
    try:
        runtime = get_runtime()
    except LedgerUnavailable as exc:
        # The ledger did not answer while the worker built its client: like any outage.
        countdown = Settings.from_env().retry_backoff_max_s
        log.warning("%s; retrying the task in %.1fs", exc, countdown)
        raise self.retry(countdown=_broker_countdown(self, countdown)) from None
    except LedgerBroken as exc:
        log.error("task %s failed: %s", self.request.id, exc)
        raise
    settings = runtime.settings
    limit = self.app.conf.get("polyv_sms_account_daily_limit") or settings.account_daily_limit
    request = validate_request(args, kwargs, account_daily_limit=limit)
    # The account it was enqueued for, or a clear failure: never another account.
    dispatcher = routing.account_for(runtime, request, self.request).dispatcher
    task_id = str(self.request.id)
    key = request.message_id or task_id
    # Runs put off by the rate guard consumed no attempt: they do not count towards giving up.
    retries = int(self.request.retries or 0) - routing.rate_waits(self.request)
    give_up = None
    if retries >= _retry_cap(settings):
        give_up = f"gave up after {retries} task retries"
    try:
        outcome = dispatcher.run(request, message_id=key, task_id=task_id, give_up=give_up)
    except LedgerBroken as exc:
        # Retrying would loop forever (MOVED to a plain client, WRONGTYPE, a script that keeps
        # missing, a refused password): the task fails with the error. What the ledger already
        # holds of the message stays; its pending entry, if any, brings it back through the
        # reconciler once the ledger is fixed.
        log.error("message %s failed: %s", key, exc)
        raise
    except (LedgerUnavailable, redis.RedisError) as exc:
        # Retried through the broker like any transient failure: failing the task would drop
        # the message (acks_late acknowledges a failed task).
        countdown = dispatcher.backoff(retries + 1)
        log.warning("message %s: %s; retrying in %.1fs", key, exc, countdown)
        outcome_reason = "ledger"
    else:
        if outcome.result is not None:
            return outcome.result
        assert outcome.retry_in is not None
        countdown = outcome.retry_in
        outcome_reason = outcome.reason
    metrics.TASK_RETRIES.labels(outcome_reason).inc()
    try:
        raise self.retry(
            countdown=_broker_countdown(self, countdown),
            **routing.retry_options(self.request, outcome_reason),
        )
    except Reject as exc:
        # Celery rejects a task whose retry it could not publish without requeueing: the
        # broker deletes the message and the result says FAILURE, though the message is not
        # done. Once the ledger has seen the message, its ``pending`` entry is what keeps it:
        # drop the broker's copy without a result (Ignore) and let the reconciler enqueue it
        # again when it is overdue. Before that - the ledger was unreachable - the broker's
        # copy is the only one: requeue it (or, if the broker refuses even that, it stays
        # unacknowledged until the visibility timeout).
        metrics.TASK_RETRIES.labels("publish_failed").inc()
        if outcome_reason in _WAIT_IN_PLACE:
            # Another run holds the message, and it may finish every number: then nothing in
            # the ledger would bring this task (and its caller's result) back. Or the rate
            # guard put the run off before it reserved anything: then only the pending entry
            # the put-off left brings it back, after the wait, a lease and the reconciler's
            # grace. Requeueing through a broker that refuses writes ends the worker (and its
            # in-flight sends), so wait here instead: the holder's lease and takeover grace,
            # or the pause, bound it.
            log.error(
                "message %s: the retry could not be published (%s); waiting here (%s)",
                key,
                type(exc.reason).__name__,
                outcome_reason,
            )
            waited, outcome_reason = _wait_in_place(
                dispatcher,
                settings,
                request,
                key,
                task_id,
                give_up=give_up,
                first_wait_s=countdown,
                reason=outcome_reason,
            )
            if waited is not None:
                return waited
            if outcome_reason == "busy":
                outcome_reason = "pending"  # (the request was stored before "busy")
        # Put off by the rate guard, the run reserved nothing: its pending entry comes due
        # only after a lease and the reconciler's grace; the broker's copy is sooner.
        known = outcome_reason not in ("ledger", "rate", "paused")
        log.error(
            "message %s: the retry could not be published (%s); %s",
            key,
            type(exc.reason).__name__,
            "the reconciler enqueues it again once it is overdue"
            if known
            else "the message goes back to the broker",
        )
        if known:
            raise Ignore() from None
        raise Reject(exc.reason, requeue=True) from None


def _broker_countdown(task: SendSmsTask, countdown: float) -> float:
    """``countdown`` as the broker can honour it.

    RabbitMQ's native delayed delivery (quorum queues) delays by whole seconds and kombu rounds
    down, refusing a countdown that rounds to 0 ("countdown must be a positive number"): there
    a countdown is rounded up, to 1 s at least.
    """
    broker = str(task.app.conf.broker_url or "")
    if broker.startswith(("amqp", "pyamqp")) and detect_quorum_queues(task.app, "amqp")[0]:
        return float(max(1, math.ceil(countdown)))
    return countdown


def _wait_in_place(
    dispatcher: Any,
    settings: Settings,
    request: Any,
    key: str,
    task_id: str,
    *,
    give_up: str | None,
    first_wait_s: float,
    reason: str,
) -> tuple[dict[str, Any] | None, str]:
    """Run the message again in place while another run holds it, or while the rate guard
    puts it off (the broker refused the retry). Bounded by the holder's lease plus the
    takeover grace, or by Polyv's block (:data:`RATE_LIMIT_PAUSE_S`), plus a margin.

    Returns:
        ``(result, reason)``: the result, or ``None`` and why the last run did not finish
        (``"pending"``: the ledger's ``pending`` entry and this task's stored request let the
        reconciler bring it back; ``"rate"``/``"paused"``: still put off; ``"ledger"``: the
        ledger could not be reached).
    """
    longest = max(settings.lease_s + settings.takeover_grace_s, RATE_LIMIT_PAUSE_S)
    deadline = time.monotonic() + longest + _BUSY_WAIT_MARGIN_S
    wait = first_wait_s
    while time.monotonic() + wait < deadline:
        time.sleep(wait)
        try:
            outcome = dispatcher.run(request, message_id=key, task_id=task_id, give_up=give_up)
        except (LedgerUnavailable, redis.RedisError):
            return None, "ledger"
        if outcome.result is not None:
            return outcome.result, outcome.reason
        reason = outcome.reason
        if reason not in _WAIT_IN_PLACE:
            return None, reason
        wait = outcome.retry_in or 1.0
    return None, reason


def enqueue_again(message_id: str, task_id: str, kwargs: dict[str, Any]) -> None:
    """Publish a message again under its original task id (used by the reconciler)."""
    send_sms.apply_async(kwargs=kwargs, task_id=task_id)


#: A worker whose background parts could not start exits with this status.
EXIT_BACKGROUND_FAILED = 70  # EX_SOFTWARE


@signals.worker_ready.connect
def _start_background(**_: Any) -> None:
    try:
        background.start(enqueue_again)
    except background.BackgroundError as exc:
        # Celery logs and swallows a signal handler's Exception; a SystemExit (WorkerShutdown)
        # gets through and stops the worker, warm: nothing was taken from the queue yet.
        log.critical("polyv-sms worker: %s; stopping the worker", exc)
        sys.stderr.write(f"polyv-sms worker: {exc}; stopping the worker\n")
        sys.stderr.flush()
        raise WorkerShutdown(EXIT_BACKGROUND_FAILED) from None


@signals.worker_process_init.connect
def _start_in_pool_child(**_: Any) -> None:
    # Sent in each child of a prefork pool only (the threads pool, the project's, has none).
    background.start_in_pool_child()


@signals.worker_shutting_down.connect
def _stop_background(**_: Any) -> None:
    background.stop()
