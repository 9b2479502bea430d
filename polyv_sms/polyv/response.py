"""What Polyv answers: the per-number statuses and the parsed response.

A leaf module (it imports nothing of the package) so that :mod:`polyv_sms.errors` can name
:class:`PolyvResponse` without an import circle.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

__all__ = [
    "KNOWN_STATUSES",
    "SEND_PATH",
    "STATUS_ACCEPTED",
    "STATUS_INVALID",
    "STATUS_OVER_LIMIT",
    "STATUS_UPSTREAM_FAILED",
    "PhoneResult",
    "PolyvResponse",
]

SEND_PATH = "/live/v4/user/sms/send"
STATUS_OVER_LIMIT = -1
STATUS_INVALID = -2
STATUS_UPSTREAM_FAILED = 11
STATUS_ACCEPTED = 12
KNOWN_STATUSES = frozenset(
    {STATUS_OVER_LIMIT, STATUS_INVALID, STATUS_UPSTREAM_FAILED, STATUS_ACCEPTED}
)


class PhoneResult(NamedTuple):
    """Polyv's answer for one number (a named tuple: cheap to build 200 of).

    Attributes:
        phone_number: the number as Polyv echoed it.
        status: -1 over the daily limit, -2 invalid, 11 upstream failure, 12 accepted.
        serial_no: Aliyun's receipt id for status 12, else ``None``.
    """

    phone_number: str
    status: int
    serial_no: str | None


@dataclass(frozen=True, slots=True)
class PolyvResponse:
    """A successful answer.

    Attributes:
        request_id: Polyv's ``requestId`` (debugging only).
        results: one entry per number, in Polyv's order.
        elapsed_s: wall time of the HTTP exchange.
    """

    request_id: str
    results: tuple[PhoneResult, ...]
    elapsed_s: float = 0.0
