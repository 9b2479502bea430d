"""What one Polyv request's outcome means for each of its numbers: the settle items.

Split from :mod:`polyv_sms.dispatch`: the dispatcher sends, this module reads the answer (or
the failure) and says, per number, what the ledger records - accepted, invalid, over the
limit, retried, or failed - with the delivery mode (at least once / at most once) deciding
what happens to an answer that may mean Polyv sent the SMS.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from polyv_sms import metrics
from polyv_sms.errors import (
    AmbiguousSend,
    PermanentError,
    PolyvUnavailable,
    RateLimited,
    TransientError,
    UnexpectedResponse,
)
from polyv_sms.ledger import Settlement
from polyv_sms.polyv.client import (
    KNOWN_STATUSES,
    STATUS_ACCEPTED,
    STATUS_INVALID,
    STATUS_OVER_LIMIT,
    PhoneResult,
    PolyvResponse,
)

__all__ = ["AT_MOST_ONCE", "map_statuses", "send_and_read"]

#: Appended to the error of a number that ends failed at most once though it may have gone out.
AT_MOST_ONCE = "; Polyv may have sent it, and at most once it is not sent again"


def send_and_read(
    send: Callable[[], PolyvResponse], numbers: Sequence[str], *, retry_ambiguous: bool
) -> tuple[list[Settlement], PermanentError | None]:
    """Make one Polyv request and turn its outcome into settle items.

    Args:
        send: makes the request (``PolyvClient.send`` bound to its arguments).
        numbers: the numbers it carries.
        retry_ambiguous: at least once (``True``) or at most once.

    Returns:
        The items, in the order of ``numbers``, and Polyv's refusal (an error envelope) when
        there was one: the numbers not sent yet end failed with it.
    """
    started = time.perf_counter()
    count = len(numbers)
    response: PolyvResponse
    try:
        response = send()
    except PermanentError as exc:
        metrics.observe_request(time.perf_counter() - started, "refused", count)
        return [Settlement(n, "fail", error=str(exc)) for n in numbers], exc
    except UnexpectedResponse as exc:
        metrics.observe_request(time.perf_counter() - started, "unexpected", count)
        if exc.response is None:
            # An answer we cannot read may still mean Polyv sent it: keep the unit (and at
            # most once, send it no more).
            return _maybe_sent(numbers, str(exc), "retry_keep", retry_ambiguous), None
        response = exc.response
    except RateLimited as exc:
        metrics.observe_request(time.perf_counter() - started, "transient", count)
        return _retry_all(numbers, "rate_limited", str(exc)), None
    except AmbiguousSend as exc:
        metrics.observe_request(time.perf_counter() - started, "ambiguous", count)
        action = "retry_keep" if retry_ambiguous else "fail_keep"
        return _retry_all(numbers, action, str(exc)), None
    except TransientError as exc:
        metrics.observe_request(time.perf_counter() - started, "transient", count)
        if _answered_server_error(exc):
            # An HTTP 5xx is an answer: Polyv may have processed the request first. At least
            # once it is retried like any transient failure (its unit refunded if it ends
            # failed, as before); at most once it is not sent again.
            return _maybe_sent(numbers, str(exc), "retry", retry_ambiguous), None
        return _retry_all(numbers, "retry", str(exc)), None
    else:
        metrics.observe_request(time.perf_counter() - started, "answered", count)
    return map_statuses(numbers, response, retry_ambiguous=retry_ambiguous), None


def _answered_server_error(exc: TransientError) -> bool:
    """True for an HTTP 5xx answer (the request reached Polyv), not a connect failure.

    The client raises :class:`PolyvUnavailable` for both; only the answer's names its HTTP
    status ("Polyv answered HTTP 503 ...").
    """
    return (
        isinstance(exc, PolyvUnavailable)
        and not isinstance(exc, AmbiguousSend)
        and str(exc).startswith("Polyv answered HTTP")
    )


def _maybe_sent(
    numbers: Sequence[str], error: str, retry: str, retry_ambiguous: bool
) -> list[Settlement]:
    """Numbers that Polyv may have sent: retried (``retry``) at least once; at most once they
    end ``failed``, their unit kept, and are never sent again."""
    if retry_ambiguous:
        return _retry_all(numbers, retry, error)
    return _retry_all(numbers, "fail_keep", error + AT_MOST_ONCE)


def _retry_all(numbers: Sequence[str], action: str, error: str) -> list[Settlement]:
    metrics.count_retries("transport", len(numbers))
    return [Settlement(n, action, error=error) for n in numbers]


def map_statuses(
    numbers: Sequence[str], response: PolyvResponse, *, retry_ambiguous: bool
) -> list[Settlement]:
    """Polyv's per-number statuses as settle items (a number the answer does not mention, or
    whose entry did not parse, may have been sent)."""
    answers: dict[str, PhoneResult] = {}
    for result in response.results:
        answers.setdefault(result.phone_number, result)
    items = []
    retried = 0
    for number in numbers:
        answer = answers.get(number)
        if answer is None:
            error = "Polyv's answer did not mention it (or its entry did not parse)"
            if retry_ambiguous:
                items.append(Settlement(number, "retry_keep", error=error))
            else:
                items.append(Settlement(number, "fail_keep", error=error + AT_MOST_ONCE))
            retried += 1
            continue
        status = answer.status
        if status == STATUS_ACCEPTED:
            items.append(Settlement(number, "accepted", status, answer.serial_no))
        elif status == STATUS_INVALID:
            items.append(Settlement(number, "invalid", status, error="Polyv: invalid number"))
        elif status == STATUS_OVER_LIMIT:
            error = "Polyv: this number reached its daily limit"
            items.append(Settlement(number, "quota", status, error=error))
        elif status in KNOWN_STATUSES:
            error = "Polyv status 11: the call to Aliyun failed"
            items.append(Settlement(number, "retry", status, error=error))
            retried += 1
        else:
            error = f"Polyv answered unknown status {status}; not retried to avoid a duplicate"
            items.append(Settlement(number, "fail_keep", status, error=error))
    if retried:
        metrics.count_retries("status_11", retried)
    return items
