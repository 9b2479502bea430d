"""How ``polyv-sms`` enqueues and waits: one line for an unreachable broker or result backend,
exit status 3 for a number that did not end accepted, a ping of a host's workers."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

import redis

from polyv_sms.cli.run import EXIT_NOT_ACCEPTED, CliError
from polyv_sms.errors import BrokerUnavailable

#: What Celery's result consumer says when it gives up reconnecting to the result backend.
_CELERY_GAVE_UP = "Retry limit exceeded"

__all__ = [
    "exit_if_not_accepted",
    "ping_workers",
    "publish",
    "stop_listening",
    "wait_result",
]


def wait_result(async_result: Any, timeout: float, message_id: str) -> dict[str, Any]:
    """The task's result, waited for at most ``timeout`` seconds.

    Raises:
        CliError: no result in time, the result backend lost, or the task failed; one line.
    """
    from celery.exceptions import TimeoutError as ResultTimeout  # noqa: PLC0415

    try:
        result: dict[str, Any] = async_result.get(timeout=timeout)
    except ResultTimeout:
        raise CliError(
            f"no result within {timeout:g}s; the message is queued or waiting for a retry "
            f"(see: polyv-sms status {message_id})"
        ) from None
    except (RuntimeError, redis.ConnectionError) as exc:
        if isinstance(exc, RuntimeError) and _CELERY_GAVE_UP not in str(exc):
            raise CliError(f"the task failed: RuntimeError: {exc}") from None
        raise CliError(
            "lost the result backend (SMS_RESULT_BACKEND) while waiting; the message is queued "
            f"(see: polyv-sms status {message_id})"
        ) from exc
    except Exception as exc:  # the task's own failure, re-raised by Celery
        raise CliError(f"the task failed: {type(exc).__name__}: {exc}") from None
    finally:
        stop_listening(async_result)
    return result


def stop_listening(async_result: Any) -> None:
    """Unsubscribe from the task's result now: left to ``AsyncResult.__del__`` at interpreter
    exit, the unsubscribe prints a page of ``Exception ignored in`` (sys.meta_path is None)."""
    with contextlib.suppress(Exception):  # the process is about to exit; nothing is lost
        async_result.backend.remove_pending_result(async_result)


def publish(enqueue: Callable[[], Any], hint: str = "") -> Any:
    """Run ``enqueue`` (a ``delay()`` or ``apply_async()``) and return what it returns.

    Args:
        enqueue: publishes the task.
        hint: appended to the error line (what to do about a half-done operation).

    Raises:
        CliError: the broker or the result backend could not be reached; one line naming
            the variable, nothing was published.
    """
    # Celery logs each reconnect attempt; the one line below says it all.
    logging.getLogger("celery").setLevel(logging.CRITICAL + 1)
    try:
        return enqueue()
    except BrokerUnavailable as exc:
        unset = (
            exc.variable == "SMS_RESULT_BACKEND" and not os.environ.get(exc.variable, "").strip()
        )
        # By default the broker's Redis holds the results: say which variable that is.
        where = " (not set: the results live on SMS_BROKER_URL)" if unset else ""
        raise CliError(f"{exc}{where}{hint}") from None


def exit_if_not_accepted(result: dict[str, Any]) -> None:
    """Exit 3 when some number did not end accepted (the outcome is printed already)."""
    if any(r["outcome"] != "accepted" for r in result["results"]):
        sys.exit(EXIT_NOT_ACCEPTED)


def ping_workers(processes: int, host: str, timeout: float) -> str:
    """Ping ``polyv-sms-0@host`` ... ``polyv-sms-(processes-1)@host`` over the broker.

    Returns:
        A line saying that all answered.

    Raises:
        CliError: some did not answer in ``timeout`` seconds (named), or the broker failed.
    """
    from polyv_sms.worker import app  # noqa: PLC0415 - keeps --help fast

    nodes = [f"polyv-sms-{index}@{host}" for index in range(processes)]
    logging.getLogger("celery").setLevel(logging.CRITICAL + 1)
    try:
        replies = app.control.ping(destination=nodes, timeout=timeout)
    except Exception as exc:  # any failure is "unhealthy", said in one line
        raise CliError(f"cannot ask the workers over the broker (SMS_BROKER_URL): {exc}") from None
    answered = {node for reply in replies for node in reply}
    missing = [node for node in nodes if node not in answered]
    if missing:
        raise CliError(f"no answer within {timeout:g}s from {', '.join(missing)}")
    return f"{len(nodes)} of {len(nodes)} workers answered"
