"""The task's result dict, and the text of it Celery writes in a worker.

Celery writes a text of every task's return value, with its ``saferepr``, as soon as the task
has returned: for its ``Task ... succeeded`` log line and for the ``task-succeeded`` event
(what Flower shows), whether the line is logged or events are on at all. ``saferepr`` walks
the value in Python, token by token: for a one-number ``send_sms`` result that is about 75 µs
of a worker thread's time under the GIL, ten times a bare task's small result, on every
message. And it shows the phone numbers as they are (the worker's log filter masks its log
lines, but events are no log).

So a ``send_sms`` result is a :class:`SmsResult`, a plain ``dict`` to everyone else (JSON, the
result backend, callers), and a worker (:func:`install`, at ``worker_init``) writes its text
with :func:`result_text`: the C ``repr``, the numbers masked, cut at Celery's
``resultrepr_maxsize``. About 5 µs. Every other value still goes to Celery's ``saferepr``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from polyv_sms.logs import redact

__all__ = ["SmsResult", "install", "result_text"]

#: Results with more numbers than this are written from a copy holding only these first ones:
#: the text is cut at ``resultrepr_maxsize`` (1 024 characters, about 7 numbers) anyway.
_SHOWN_RESULTS = 16
#: Characters read past the cut before masking, so that a number the cut goes through was
#: whole when it was masked (a number is 11 digits).
_MASK_MARGIN = 16
_lock = threading.Lock()


class SmsResult(dict[str, Any]):
    """A ``send_sms`` result: ``message_id``, ``results``, ``counts``, ``account``, ``lane``.

    A ``dict`` in every way (it is stored and read back as JSON, a plain dict); only the text
    a worker writes of it differs (:func:`result_text`).
    """

    __slots__ = ()


def result_text(result: SmsResult, maxlen: int | None = None) -> str:
    """The text of a result for logs and task events: ``repr``, numbers masked, at most
    ``maxlen`` characters (then ending with ``...``)."""
    shown: dict[str, Any] = result
    numbers = result.get("results")
    if isinstance(numbers, list) and len(numbers) > _SHOWN_RESULTS:
        shown = {**result, "results": numbers[:_SHOWN_RESULTS]}
    text = repr(shown)
    if maxlen is None or len(text) <= maxlen:
        return redact(text)
    return redact(text[: maxlen + _MASK_MARGIN])[:maxlen] + "..."


def install() -> None:
    """Make Celery's tracer write :class:`SmsResult` values with :func:`result_text`.

    Celery's tracer (``celery.app.trace``) looks its ``saferepr`` up as a module global each
    time a task succeeds; it is wrapped, once per process. A Celery without that global (a
    future release) keeps its own text: slower, and tests/test_results.py fails.
    """
    from celery.app import trace  # noqa: PLC0415 - only workers need it

    with _lock:
        original = getattr(trace, "saferepr", None)
        if original is None or getattr(original, "_polyv_sms", False):
            return
        trace.saferepr = _wrap(original)


def _wrap(original: Callable[..., str]) -> Callable[..., str]:
    def saferepr(value: Any, maxlen: int | None = None, *args: Any, **kwargs: Any) -> str:
        if type(value) is SmsResult:
            return result_text(value, maxlen)
        return original(value, maxlen, *args, **kwargs)

    saferepr._polyv_sms = True  # type: ignore[attr-defined]
    return saferepr
