"""Request-level validation, shared by the producer (``send_sms.delay``) and the worker.

A request that fails here raises :class:`~polyv_sms.errors.InvalidRequest` naming the field:
nothing is enqueued (producer) or sent (worker), and no quota is taken. A single bad phone
number is not a request-level error: it becomes that number's ``invalid`` outcome.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from polyv_sms.errors import InvalidRequest
from polyv_sms.lanes import DEFAULT_LANE, LANES

__all__ = ["MAX_MESSAGE_ID_CHARS", "MAX_PARAM_CHARS", "SmsRequest", "validate_request"]

MAX_MESSAGE_ID_CHARS = 200
MAX_PARAM_CHARS = 500
MAX_PARAMS = 50
_ARG_NAMES = ("phone_numbers", "template_param_names", "template_param_values", "message_id")
#: Keyword-only arguments (issue 12): which account sends it, and in which lane.
_KEYWORDS = ("account", "lane")
DEFAULT_ACCOUNT = "default"
_ACCOUNT = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_MESSAGE_ID = re.compile(r"[^\s\x00-\x1f\x7f]+")


@dataclass(frozen=True, slots=True)
class SmsRequest:
    """A request that passed request-level validation.

    Attributes:
        phone_numbers: the numbers as given, ints turned into strings; each is still checked
            on its own by the worker.
        template_param_names: the template's parameter names.
        template_param_values: one text value per name.
        message_id: the idempotency key, or ``None`` to use the task id.
        account: the account that sends it (``default``: ``POLYV_APP_ID``).
        lane: ``urgent``, ``standard`` or ``bulk``.
    """

    phone_numbers: tuple[object, ...]
    template_param_names: tuple[str, ...]
    template_param_values: tuple[str, ...]
    message_id: str | None
    account: str = DEFAULT_ACCOUNT
    lane: str = DEFAULT_LANE

    def as_kwargs(self) -> dict[str, Any]:
        """The task's keyword arguments, JSON-safe (``account`` and ``lane`` only when not
        the defaults: a message without them runs on workers older than them)."""
        kwargs: dict[str, Any] = {
            "phone_numbers": list(self.phone_numbers),
            "template_param_names": list(self.template_param_names),
            "template_param_values": list(self.template_param_values),
            "message_id": self.message_id,
        }
        if self.account != DEFAULT_ACCOUNT:
            kwargs["account"] = self.account
        if self.lane != DEFAULT_LANE:
            kwargs["lane"] = self.lane
        return kwargs


def bind_arguments(args: Sequence[Any] | None, kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
    """Map the task's positional and keyword arguments to names, like a call would."""
    args = tuple(args or ())
    kwargs = dict(kwargs or {})
    if len(args) > len(_ARG_NAMES):
        raise InvalidRequest(f"send_sms takes at most {len(_ARG_NAMES)} arguments, got {len(args)}")
    bound = dict(zip(_ARG_NAMES, args, strict=False))
    for name, value in kwargs.items():
        if name not in _ARG_NAMES and name not in _KEYWORDS:
            raise InvalidRequest(
                f"{name}: unexpected argument; send_sms takes {', '.join(_ARG_NAMES + _KEYWORDS)}"
            )
        if name in bound:
            raise InvalidRequest(f"{name}: given both positionally and by keyword")
        bound[name] = value
    return bound


def _encodable(text: str, field: str) -> None:
    """Refuse text that is not valid Unicode (a lone surrogate such as ``"\\ud83d"``): it
    cannot be sent as UTF-8, and would crash the task instead of failing here."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidRequest(
            f"{field}: is not valid Unicode text (a lone surrogate at character {exc.start})"
        ) from None


def _number_text(value: int, field: str) -> str:
    """An int as text; an int too long to turn into text (over 4300 digits) is refused."""
    try:
        return str(value)
    except ValueError:
        raise InvalidRequest(f"{field}: the integer has far too many digits") from None


def _list(bound: Mapping[str, Any], name: str) -> list[Any]:
    if name not in bound or bound[name] is None:
        raise InvalidRequest(f"{name}: missing; give a list")
    value = bound[name]
    if not isinstance(value, list | tuple):
        raise InvalidRequest(f"{name}: must be a list, not {type(value).__name__}")
    if not value:
        raise InvalidRequest(f"{name}: is empty")
    return list(value)


def validate_request(
    args: Sequence[Any] | None, kwargs: Mapping[str, Any] | None, *, account_daily_limit: int
) -> SmsRequest:
    """Check a ``send_sms`` call.

    Args:
        args: positional arguments of the call.
        kwargs: keyword arguments of the call.
        account_daily_limit: a message may not hold more numbers than this.

    Returns:
        The normalised request.

    Raises:
        InvalidRequest: the message names the field and the problem.
    """
    bound = bind_arguments(args, kwargs)
    numbers = _list(bound, "phone_numbers")
    if len(numbers) > account_daily_limit:
        raise InvalidRequest(
            f"phone_numbers: {len(numbers)} numbers is more than the account's daily limit "
            f"of {account_daily_limit}"
        )
    numbers = [
        _number_text(n, f"phone_numbers[{i}]")
        if isinstance(n, int) and not isinstance(n, bool)
        else n
        for i, n in enumerate(numbers)
    ]
    for i, number in enumerate(numbers):
        if isinstance(number, str):
            _encodable(number, f"phone_numbers[{i}]")
    names = _list(bound, "template_param_names")
    values = _list(bound, "template_param_values")
    if len(names) > MAX_PARAMS:
        raise InvalidRequest(f"template_param_names: {len(names)} names; at most {MAX_PARAMS}")
    for i, name in enumerate(names):
        if not isinstance(name, str):
            raise InvalidRequest(
                f"template_param_names[{i}]: must be a string, not {type(name).__name__}"
            )
        if not name.strip() or len(name) > MAX_PARAM_CHARS:
            raise InvalidRequest(
                f"template_param_names[{i}]: must be 1 to {MAX_PARAM_CHARS} characters"
            )
        _encodable(name, f"template_param_names[{i}]")
    if len(set(names)) != len(names):
        raise InvalidRequest("template_param_names: names repeat")
    if len(values) != len(names):
        raise InvalidRequest(
            f"template_param_values: {len(values)} values for {len(names)} names; "
            "give one value per name, in the same order"
        )
    texts = []
    for i, value in enumerate(values):
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise InvalidRequest(
                f"template_param_values[{i}]: must be a string or a number, "
                f"not {type(value).__name__}"
            )
        field = f"template_param_values[{i}]"
        if isinstance(value, int) and not isinstance(value, str):
            text = _number_text(value, field)
        else:
            text = value if isinstance(value, str) else str(value)
        _encodable(text, field)
        if not text.strip():
            # An SMS with an empty code or name is always a bug of the caller, never intended.
            raise InvalidRequest(
                f"template_param_values[{i}]: the value of {names[i]!r} is empty; give one "
                "that is not blank"
            )
        if len(text) > MAX_PARAM_CHARS:
            raise InvalidRequest(
                f"template_param_values[{i}]: {len(text)} characters; at most {MAX_PARAM_CHARS}"
            )
        texts.append(text)
    message_id = bound.get("message_id")
    if message_id is not None:
        if not isinstance(message_id, str):
            raise InvalidRequest(f"message_id: must be a string, not {type(message_id).__name__}")
        if len(message_id) > MAX_MESSAGE_ID_CHARS or not _MESSAGE_ID.fullmatch(message_id):
            raise InvalidRequest(
                f"message_id: must be 1 to {MAX_MESSAGE_ID_CHARS} characters without spaces "
                "or control characters"
            )
    account = bound.get("account", DEFAULT_ACCOUNT)
    if not isinstance(account, str) or not _ACCOUNT.fullmatch(account):
        raise InvalidRequest(
            f"account: {account!r} is not an account name (1 to 64 letters, digits, '_', '.' "
            "or '-')"
        )
    lane = bound.get("lane", DEFAULT_LANE)
    if lane not in LANES:
        raise InvalidRequest(f"lane: {lane!r} is not one of {', '.join(LANES)}")
    if message_id is not None:
        _encodable(message_id, "message_id")
    return SmsRequest(tuple(numbers), tuple(names), tuple(texts), message_id, account, lane)
