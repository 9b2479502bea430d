"""Normalise and validate mainland China mobile numbers.

Accepted input: ``str`` or ``int`` (never ``bool``). Spaces, dashes, dots and parentheses are
tolerated, as is a ``+86``, ``0086`` or ``86`` country prefix. The result is 11 ASCII digits
starting with ``1`` and a second digit 3-9 (every mainland mobile range). Anything else is
rejected with a reason in words.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["PhoneCheck", "check_phone", "mask"]

_SEPARATORS = re.compile(r"[\s\-.()]+")
_MOBILE = re.compile(r"1[3-9][0-9]{9}")
_DIGITS = re.compile(r"[0-9]+")
_MAX_INPUT_CHARS = 64
_MOBILE_SECOND_DIGITS = frozenset("3456789")


@dataclass(frozen=True, slots=True)
class PhoneCheck:
    """The verdict on one input number.

    Attributes:
        raw: the input as text (what the result reports for an invalid number).
        number: the normalised 11-digit number, or ``None`` when invalid.
        reason: why it is invalid, or ``None``.
    """

    raw: str
    number: str | None
    reason: str | None = None


#: Digits of an int shown at most (Python refuses to turn an int of over 4300 digits into
#: text, and no number has more than 15).
_MAX_INT_DIGITS = 64


def _int_text(value: int) -> str | None:
    """The int as text, or ``None`` when it has more than ``_MAX_INT_DIGITS`` digits."""
    if abs(value).bit_length() > _MAX_INT_DIGITS * 3.33:  # 2**213 > 10**64: too long anyway
        return None
    text = str(value)
    return text if len(text.lstrip("-")) <= _MAX_INT_DIGITS else None


def _as_text(value: object) -> str:
    if isinstance(value, str):
        return value[:_MAX_INPUT_CHARS]
    if isinstance(value, int) and not isinstance(value, bool):
        return _int_text(value) or f"<an integer of {value.bit_length()} bits>"
    return repr(value)[:_MAX_INPUT_CHARS]


def check_phone(value: object) -> PhoneCheck:
    """Normalise one number and say whether it can be sent to.

    Args:
        value: a number as given by the caller.

    Returns:
        The verdict; ``number`` is set when the number is valid.
    """
    if (  # the common case, without the regular expressions: 11 ASCII digits, 1[3-9]...
        type(value) is str
        and len(value) == 11
        and value.isascii()
        and value.isdigit()
        and value[0] == "1"
        and value[1] in _MOBILE_SECOND_DIGITS
    ):
        return PhoneCheck(value, value)
    raw = _as_text(value)
    if isinstance(value, bool) or not isinstance(value, str | int):
        return PhoneCheck(raw, None, f"must be a string or an integer, not {type(value).__name__}")
    if isinstance(value, str) and len(value) > _MAX_INPUT_CHARS:
        return PhoneCheck(raw, None, f"is {len(value)} characters long; a number has 11 digits")
    if isinstance(value, int) and _int_text(value) is None:
        return PhoneCheck(raw, None, "is an integer far longer than a number's 11 digits")
    if str(value).strip().startswith("-"):
        # A dash separates digits; a leading one is a minus sign, not part of a number.
        return PhoneCheck(raw, None, "is negative (starts with a minus sign)")
    text = _SEPARATORS.sub("", str(value))
    if not text:
        return PhoneCheck(raw, None, "is empty")
    if text.startswith("+86"):
        text = text[3:]
    elif text.startswith("0086") and len(text) == 15:
        text = text[4:]
    elif text.startswith("86") and len(text) == 13:
        text = text[2:]
    if not _DIGITS.fullmatch(text):
        if text.isdigit():  # str.isdigit: full-width and other scripts' digits too
            return PhoneCheck(raw, None, "has digits other than ASCII 0-9 (full-width, say)")
        return PhoneCheck(raw, None, "contains characters other than digits")
    if len(text) != 11:
        digits = "digit" if len(text) == 1 else "digits"
        return PhoneCheck(raw, None, f"has {len(text)} {digits}; a mobile number has 11")
    if not _MOBILE.fullmatch(text):
        return PhoneCheck(raw, None, "is not a mainland China mobile number (1[3-9]xxxxxxxxx)")
    return PhoneCheck(raw, text)


def mask(number: str) -> str:
    """Mask a number for logs: ``17680476163`` -> ``176****6163``."""
    if len(number) >= 8:
        return f"{number[:3]}****{number[-4:]}"
    return "*" * len(number)
