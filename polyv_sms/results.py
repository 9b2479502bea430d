"""The task's result dict, and the text of it Celery writes in a worker.

Celery writes a text of every task's return value, with its ``saferepr``, as soon as the task
has returned: for its ``Task ... succeeded`` log line and for the ``task-succeeded`` event
(what Flower shows), whether the line is logged or events are on at all. ``saferepr`` walks
the value in Python, token by token: for a one-number ``send_sms`` result that is about 75 µs
of a worker thread's time under the GIL, ten times a bare task's small result, on every
message. And it shows the phone numbers as they are (the worker's log filter masks its log
lines, but events are no log).

So a ``send_sms`` result is a :class:`SmsResult`, a plain ``dict`` to everyone else (JSON, the
result backend, callers; YAML and pickle too), and a worker (:func:`install`, at
``worker_init``) writes its text with :func:`result_text`: the C ``repr`` of a copy whose
``phone_number`` fields are masked like the task's arguments (:func:`~polyv_sms.polyv.phones.mask`,
whatever was typed: a rejected ``+8613900000777x`` too), the whole text masked once more, cut at
Celery's ``resultrepr_maxsize``: a seventh of Celery's time (23 µs against 153 µs for one number
on the benchmark VM). Every other value still goes to Celery's
``saferepr``. The same holds for the ``task-succeeded`` event a prefork worker sends for a task
whose child died after storing its result (Celery's ``celery.worker.request``), where the
result is the plain dict read back from the backend: it is recognised by its keys.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from polyv_sms.logs import redact
from polyv_sms.polyv.phones import mask

__all__ = ["RESULT_KEYS", "UNWRITABLE", "SmsResult", "install", "is_result", "result_text"]

#: The keys of a ``send_sms`` result.
RESULT_KEYS = frozenset({"message_id", "results", "counts", "account", "lane"})
#: Results with more numbers than this are written from a copy holding only these first ones
#: and ``...+N``: the text is cut at ``resultrepr_maxsize`` (1 024 characters, about 7 numbers)
#: anyway.
_SHOWN_RESULTS = 16
#: Characters read past the cut before masking, so that a number the cut goes through was
#: whole when it was masked (a number is 11 digits).
_MASK_MARGIN = 16
#: The text of a result whose text could not be made: never Celery's, which shows the numbers.
UNWRITABLE = "<send_sms result: its text could not be written>"
_lock = threading.Lock()


class SmsResult(dict[str, Any]):
    """A ``send_sms`` result: ``message_id``, ``results``, ``counts``, ``account``, ``lane``.

    A ``dict`` in every way (it is stored and read back as JSON, a plain dict; pickled, it
    comes back a plain dict too); only the text a worker writes of it differs
    (:func:`result_text`).
    """

    __slots__ = ()

    def __reduce__(self) -> tuple[type[dict[str, Any]], tuple[dict[str, Any]]]:
        return dict, (dict(self),)


def _register_yaml() -> None:
    """kombu's YAML serializer (``yaml.safe_dump``) refuses dict subclasses: dump it as one."""
    try:
        import yaml  # noqa: PLC0415 - optional: only when installed
    except ImportError:
        return
    yaml.SafeDumper.add_representer(SmsResult, yaml.SafeDumper.represent_dict)


_register_yaml()


def _masked(entry: object) -> object:
    if isinstance(entry, dict) and "phone_number" in entry:
        return {**entry, "phone_number": mask(str(entry["phone_number"]))}
    return entry


def result_text(result: dict[str, Any], maxlen: int | None = None) -> str:
    """The text of a result for logs and task events: ``repr``, numbers masked, at most
    ``maxlen`` characters (then ending with ``...``). Never raises."""
    try:
        shown = dict(result)
        numbers = result.get("results")
        if isinstance(numbers, list):
            kept: list[object] = [_masked(entry) for entry in numbers[:_SHOWN_RESULTS]]
            if len(numbers) > _SHOWN_RESULTS:
                kept.append(f"...+{len(numbers) - _SHOWN_RESULTS}")
            shown["results"] = kept
        text = repr(shown)
        if maxlen is None or len(text) <= maxlen:
            return redact(text)
        return redact(text[: maxlen + _MASK_MARGIN])[:maxlen] + "..."
    except Exception:  # a text must never turn a sent message into a failure
        return UNWRITABLE


def is_result(value: object) -> bool:
    """Whether ``value`` is a ``send_sms`` result: an :class:`SmsResult`, or a plain dict with
    exactly its keys (read back from the result backend)."""
    kind = type(value)
    if kind is SmsResult:
        return True
    if kind is not dict:
        return False
    keys = value.keys()  # type: ignore[attr-defined]
    return len(keys) == len(RESULT_KEYS) and keys == RESULT_KEYS


def install() -> None:
    """Make Celery write ``send_sms`` results with :func:`result_text`.

    Celery's tracer (``celery.app.trace``) and its request (``celery.worker.request``: the
    event of a task whose prefork child died after storing its result) look ``saferepr`` up as
    a module global each time; each is wrapped, once per process. A Celery without that
    global (a future release) keeps its own text: slower, and tests/test_results.py fails.
    """
    from celery.app import trace  # noqa: PLC0415 - only workers need it
    from celery.worker import request  # noqa: PLC0415

    with _lock:
        for module in (trace, request):
            original = getattr(module, "saferepr", None)
            if original is None or getattr(original, "_polyv_sms", False):
                continue
            module.saferepr = _wrap(original)


def _wrap(original: Callable[..., str]) -> Callable[..., str]:
    def saferepr(o: Any, maxlen: int | None = None, *args: Any, **kwargs: Any) -> str:
        if is_result(o):
            return result_text(o, maxlen)
        return original(o, maxlen, *args, **kwargs)

    saferepr._polyv_sms = True  # type: ignore[attr-defined]
    return saferepr
