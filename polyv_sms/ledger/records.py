"""The ledger's records: key names, per-number states and the stored requests.

A message record (``polyv_sms:{appId}:msg:<message_id>``) holds one ``n:<number>`` field per
number (``state|day|attempts|status|serialNo|updated|error``, see ``lua/_record.lua``) and
one ``req:<task id>`` field per task that enqueued the message (its request, as JSON).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

__all__ = [
    "FINAL_STATES",
    "REQUEST_PREFIX",
    "Keys",
    "NumberState",
    "RateLimit",
    "Reservation",
    "Settlement",
    "Slot",
    "content_fingerprint",
    "parse_record",
    "parse_states",
    "stored_requests",
]

FINAL_STATES = frozenset(
    {"accepted", "invalid", "quota_exceeded", "account_quota_exceeded", "failed"}
)
#: Message-record fields holding each task's request: ``req:<task id>``.
REQUEST_PREFIX = "req:"


class Keys:
    """Key names of one account."""

    def __init__(self, app_id: str, prefix: str = "polyv_sms") -> None:
        self.base = f"{prefix}:{{{app_id}}}:"
        self.pending = self.base + "pending"
        self.dead = self.base + "dead"
        self.reconcile_lock = self.base + "reconcile-lock"
        #: The shared rate guard's GCRA state and pause (see ``ledger/ratelimit.py``).
        self.rate = self.base + "rate"
        self.paused = self.base + "paused"

    def quota(self, day: str) -> str:
        """The quota hash of a day (``YYYYMMDD``)."""
        return f"{self.base}quota:{day}"

    def message(self, message_id: str) -> str:
        """The record of one message."""
        return f"{self.base}msg:{message_id}"

    def receipts(self, day: str) -> str:
        """The receipts of a day (``YYYYMMDD``), by serialNo."""
        return f"{self.base}receipts:{day}"

    def phones(self, day: str) -> str:
        """The serialNos of a day (``YYYYMMDD``), by number."""
        return f"{self.base}phones:{day}"


class NumberState(NamedTuple):
    """One number's state in a message, as the ledger holds it (immutable; a named tuple
    rather than a frozen dataclass: a 200-number message builds 400 of them, and a frozen
    dataclass's ``__init__`` costs three times as much).

    Attributes:
        number: the normalised number (or the input text of an invalid one).
        state: ``reserved``, a final outcome, or (from ``reserve`` only) ``send`` when this
            attempt is granted, ``exhausted`` when no attempt is left and ``unsettled`` (at
            most once) when the run that sent its last attempt was lost before it settled.
        day: the day (``YYYYMMDD``) the quota unit was taken from.
        attempts: Polyv requests that carried this number for this message.
        status: Polyv's last per-number status, if any.
        serial_no: the receipt id when accepted.
        error: why a number is not accepted (or why the last attempt failed).
    """

    number: str
    state: str
    day: str
    attempts: int
    status: int | None
    serial_no: str | None
    error: str | None

    @property
    def final(self) -> bool:
        """True when the number has its final outcome."""
        return self.state in FINAL_STATES


@dataclass(frozen=True, slots=True)
class Slot:
    """The shared rate guard's answer for one Polyv request.

    Attributes:
        granted: a slot is booked; send after sleeping ``wait_s``.
        wait_s: seconds until the booked slot, or until trying again makes sense.
        paused: Polyv blocks us; ``wait_s`` is what is left of the pause.
    """

    granted: bool
    wait_s: float
    paused: bool = False


class RateLimit(NamedTuple):
    """The shared rate guard's parameters for one ``reserve`` (``RateGuard.limit`` makes them).

    Attributes:
        interval_ms: the emission interval, 1000 / SMS_POLYV_RATE.
        tolerance_ms: how far ahead of the steady pace a request may go (the burst).
        max_wait_ms: the furthest slot to book; a later one puts the run off.
    """

    interval_ms: float
    tolerance_ms: float
    max_wait_ms: int


@dataclass(frozen=True, slots=True)
class Reservation:
    """What ``reserve`` decided.

    Attributes:
        busy_for_s: set when another run holds the message's pending numbers; try again
            after this many seconds. ``states`` is empty then.
        pending: numbers of the message still reserved (in flight or waiting for a retry).
        states: one entry per number asked about, in the order asked.
        conflict: the message id was used with another content; nothing was reserved.
        slot: the rate guard's verdict, when it was asked (``reserve(rate=...)``) and a
            number was to be sent: granted (sleep ``wait_s``, then send), or refused (no
            slot near enough, or ``paused``): then nothing was reserved and ``states`` is
            empty. ``None``: no guard, or nothing to send (no slot booked).
    """

    busy_for_s: float | None
    pending: int
    states: tuple[NumberState, ...]
    conflict: bool = False
    slot: Slot | None = None


class Settlement(NamedTuple):
    """What to record for one number after a Polyv request (see lua/settle.lua).

    ``attempt`` is the attempt the answer is for (the reservation's count); ``None`` for a
    number this run did not send. It makes replays safe: a non-final action applies only while
    the number is still at that attempt.
    """

    number: str
    action: str
    status: int | None = None
    serial_no: str | None = None
    error: str = ""
    attempt: int | None = None


#: The parts of a request that are its content (the task id and creation time are not).
CONTENT_FIELDS = ("phone_numbers", "template_param_names", "template_param_values")


def content_fingerprint(request: Mapping[str, Any]) -> str:
    """The fingerprint of a request's content: its numbers, names and values as given.

    One message id is one content: ``reserve`` refuses a message id first seen with another
    fingerprint. (JSON keeps each value's type, so ``"1"`` and ``1`` differ.)
    """
    content = [request[name] for name in CONTENT_FIELDS]
    text = json.dumps(content, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def parse_states(numbers: Iterable[str], records: Sequence[Any]) -> tuple[NumberState, ...]:
    """Parse the scripts' reply: one ``state|day|attempts|status|serial|updated|error`` string
    per number, in the order asked (redis-py parses each value of a reply on its own: one
    string per number instead of seven fields makes a 200-number reply 200 values, not 1400).
    """
    out = []
    for number, record in zip(numbers, records, strict=True):
        state, day, attempts, status, serial, _updated, error = record.split("|", 6)
        out.append(
            NumberState(
                number,
                state,
                day,
                int(attempts) if attempts else 0,
                int(status) if status else None,
                serial or None,
                error or None,
            )
        )
    return tuple(out)


def parse_record(number: str, value: str) -> NumberState:
    """Parse a message record's ``n:<number>`` field (``state|day|attempts|status|...``)."""
    state, day, attempts, status, serial, _updated, error = value.split("|", 6)
    return NumberState(
        number=number,
        state=state,
        day=day,
        attempts=int(attempts or 0),
        status=int(status) if status else None,
        serial_no=serial or None,
        error=error or None,
    )


def stored_requests(record: Mapping[str, str]) -> list[dict[str, Any]]:
    """The requests stored in a message record (``HGETALL`` of it), oldest first.

    A message id enqueued again by another task (with other numbers, say) has one per task.
    """
    found = [
        json.loads(value) for field, value in record.items() if field.startswith(REQUEST_PREFIX)
    ]
    return sorted(found, key=lambda request: float(request.get("created_at") or 0))
