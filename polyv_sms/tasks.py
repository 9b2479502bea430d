"""The ``polyv_sms.send_sms`` task. Thin: validation, the dispatcher and Celery's retry.

Producers call ``send_sms.delay(...)``: the request is validated before anything is
published, so a bad request raises :class:`~polyv_sms.errors.InvalidRequest` in the caller and
nothing is enqueued. Producers that enqueue by name (``send_task``) are validated again in the
worker: the task fails at once, nothing is sent and no retry follows.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import redis
from celery import Task, signals
from celery.exceptions import Ignore, Reject

from polyv_sms import background, metrics
from polyv_sms.config import DEFAULT_ACCOUNT_DAILY_LIMIT, Settings
from polyv_sms.errors import InvalidRequest, LedgerUnavailable
from polyv_sms.polyv.phones import mask
from polyv_sms.runtime import get_runtime
from polyv_sms.validation import validate_request
from polyv_sms.worker import TASK_NAME, app

__all__ = ["SendSmsTask", "enqueue_again", "send_sms"]

log = logging.getLogger("polyv_sms.tasks")

_SHOWN_NUMBERS = 10
#: Past the holder's lease and takeover grace, how much longer a busy run waits in place.
_BUSY_WAIT_MARGIN_S = 5.0


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
        """
        limit = self.app.conf.get("polyv_sms_account_daily_limit") or DEFAULT_ACCOUNT_DAILY_LIMIT
        request = validate_request(args, kwargs, account_daily_limit=limit)
        checked = request.as_kwargs()
        options.setdefault("argsrepr", "()")
        options.setdefault("kwargsrepr", masked_kwargs_repr(checked))
        return super().apply_async(
            (), checked, task_id, producer, link, link_error, shadow, **options
        )


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
    throws=(InvalidRequest,),
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

    Returns:
        ``{"message_id", "results": [per number], "counts": {outcome: n}}``.
    """
    runtime = get_runtime()
    settings = runtime.settings
    request = validate_request(args, kwargs, account_daily_limit=settings.account_daily_limit)
    task_id = str(self.request.id)
    key = request.message_id or task_id
    retries = int(self.request.retries or 0)
    give_up = None
    if retries >= _retry_cap(settings):
        give_up = f"gave up after {retries} task retries"
    try:
        outcome = runtime.dispatcher.run(request, message_id=key, task_id=task_id, give_up=give_up)
    except (LedgerUnavailable, redis.RedisError) as exc:
        # Retried through the broker like any transient failure: failing the task would drop
        # the message (acks_late acknowledges a failed task).
        countdown = runtime.dispatcher.backoff(retries + 1)
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
        raise self.retry(countdown=countdown)
    except Reject as exc:
        # Celery rejects a task whose retry it could not publish without requeueing: the
        # broker deletes the message and the result says FAILURE, though the message is not
        # done. Once the ledger has seen the message, its ``pending`` entry is what keeps it:
        # drop the broker's copy without a result (Ignore) and let the reconciler enqueue it
        # again when it is overdue. Before that - the ledger was unreachable - the broker's
        # copy is the only one: requeue it (or, if the broker refuses even that, it stays
        # unacknowledged until the visibility timeout).
        metrics.TASK_RETRIES.labels("publish_failed").inc()
        if outcome_reason == "busy":
            # Another run holds the message, and it may finish every number: then nothing in
            # the ledger would bring this task (and its caller's result) back. Requeueing
            # through a broker that refuses writes ends the worker (and its in-flight sends),
            # so wait the holder out here instead: its lease and takeover grace bound it.
            log.error(
                "message %s: the retry could not be published (%s); waiting here for the "
                "run that holds the message",
                key,
                type(exc.reason).__name__,
            )
            waited = _wait_out_busy(
                runtime, request, key, task_id, give_up=give_up, first_wait_s=countdown
            )
            if waited is not None:
                return waited
            outcome_reason = "pending"
        known = outcome_reason != "ledger"
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


def _wait_out_busy(
    runtime: Any,
    request: Any,
    key: str,
    task_id: str,
    *,
    give_up: str | None,
    first_wait_s: float,
) -> dict[str, Any] | None:
    """Run the message again in place while another run holds it (the broker refused the
    retry). Bounded by the holder's lease plus the takeover grace.

    Returns:
        The result, or ``None`` when the message still has numbers pending (the ledger's
        ``pending`` entry and this task's stored request let the reconciler bring it back).
    """
    settings = runtime.settings
    deadline = time.monotonic() + settings.lease_s + settings.takeover_grace_s + _BUSY_WAIT_MARGIN_S
    wait = first_wait_s
    while time.monotonic() + wait < deadline:
        time.sleep(wait)
        try:
            outcome = runtime.dispatcher.run(
                request, message_id=key, task_id=task_id, give_up=give_up
            )
        except (LedgerUnavailable, redis.RedisError):
            return None
        if outcome.result is not None:
            return dict(outcome.result)
        if outcome.reason != "busy":
            return None
        wait = outcome.retry_in or 1.0
    return None


def enqueue_again(message_id: str, task_id: str, kwargs: dict[str, Any]) -> None:
    """Publish a message again under its original task id (used by the reconciler)."""
    send_sms.apply_async(kwargs=kwargs, task_id=task_id)


@signals.worker_ready.connect
def _start_background(**_: Any) -> None:
    background.start(enqueue_again)


@signals.worker_shutting_down.connect
def _stop_background(**_: Any) -> None:
    background.stop()
