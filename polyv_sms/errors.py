"""The exceptions polyv-sms raises.

One root, with branches that match what the worker does about them::

    SmsError
    ├── ConfigError            a setting is missing or malformed (names the variable)
    ├── InvalidRequest         bad input; nothing is sent, no quota is taken
    │   └── BatchTooLarge      more numbers than one Polyv request may carry
    ├── TransientError         worth retrying with backoff
    │   ├── PolyvUnavailable   network error, timeout, HTTP 5xx
    │   │   └── AmbiguousSend  the request left but no answer came: Polyv may have sent it
    │   ├── RateLimited        Polyv's "qps exceeds number of calls"
    │   ├── UnexpectedResponse the body is not the documented JSON
    │   ├── LedgerUnavailable  the quota/receipt Redis could not be reached in time
    │   └── BrokerUnavailable  enqueueing: the broker or result backend could not be reached
    ├── LedgerBroken           a ledger Redis error that retrying will not clear
    ├── PermanentError         Polyv refused the request (bad appId, sign, parameters)
    └── QuotaError             a daily limit stops the send
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from polyv_sms.polyv.response import PolyvResponse

__all__ = [
    "AmbiguousSend",
    "BatchTooLarge",
    "BrokerUnavailable",
    "ConfigError",
    "InvalidRequest",
    "LedgerBroken",
    "LedgerUnavailable",
    "PermanentError",
    "PolyvUnavailable",
    "QuotaError",
    "RateLimited",
    "SmsError",
    "TransientError",
    "UnexpectedResponse",
]


class SmsError(Exception):
    """Root of every error polyv-sms raises on purpose."""


class ConfigError(SmsError):
    """A setting is missing or malformed; the message names the environment variable."""


class InvalidRequest(SmsError, ValueError):
    """The request is malformed; the message names the field and the problem."""


class BatchTooLarge(InvalidRequest):
    """More numbers than Polyv accepts in one request (200)."""


class TransientError(SmsError):
    """A failure that may go away: the worker retries it with backoff."""


class PolyvUnavailable(TransientError):
    """Polyv could not be reached, timed out, or answered with an HTTP 5xx."""


class AmbiguousSend(PolyvUnavailable):
    """The request was sent but no answer arrived: Polyv may or may not have sent the SMS."""


class RateLimited(TransientError):
    """Polyv's rate limiting ("qps exceeds number of calls")."""


class UnexpectedResponse(TransientError):
    """Polyv answered with something that is not the documented JSON.

    Attributes:
        response: when the envelope parsed but some per-number entries did not (an unknown
            status, say), the parsed response with the entries that did; otherwise ``None``.
    """

    def __init__(self, message: str, response: PolyvResponse | None = None) -> None:
        super().__init__(message)
        self.response = response


class LedgerUnavailable(TransientError):
    """The Redis that holds quotas and receipts did not answer within the retry budget."""


class BrokerUnavailable(TransientError):
    """Enqueueing failed: the broker or the result backend could not be reached in time.

    ``send_sms.delay()`` raises it within ``ENQUEUE_BOUND_S`` (see :mod:`polyv_sms.tasks`)
    instead of Celery's own errors; the task was not published, unless ``maybe_published``.

    Attributes:
        variable: the setting that names the unreachable server: ``SMS_BROKER_URL`` or
            ``SMS_RESULT_BACKEND``.
        maybe_published: the broker accepted the connection and did not answer in time: the
            publish may sit in its input buffer and run when it wakes.
        message_id: with ``maybe_published``, the message's idempotency key (the one given,
            or the task id): enqueue again with ``message_id=`` this and the SMS is sent once,
            whether the first publish ran or not. ``None`` otherwise.
    """

    def __init__(
        self,
        message: str,
        *,
        variable: str,
        maybe_published: bool = False,
        message_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.variable = variable
        self.maybe_published = maybe_published
        self.message_id = message_id


class LedgerBroken(SmsError):
    """The ledger's Redis answered with an error that retrying will not clear: a wrong password,
    ``MOVED`` to a client that cannot follow it, a key of the wrong type, a script that keeps
    missing. The message names the error; ``SMS_REDIS_URL`` is the place to look."""


class PermanentError(SmsError):
    """Polyv refused the request with an error envelope; retrying will not help.

    Attributes:
        code: Polyv's ``error.code`` (e.g. 20001), or ``None``.
        desc: Polyv's ``error.desc``.
        request_id: Polyv's ``requestId``, for support tickets.
        http_status: the HTTP status of the answer.
    """

    def __init__(
        self,
        message: str,
        *,
        code: int | None = None,
        desc: str = "",
        request_id: str | None = None,
        http_status: int | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.desc = desc
        self.request_id = request_id
        self.http_status = http_status


class QuotaError(SmsError):
    """A daily limit (per number or per account) stops the send."""
