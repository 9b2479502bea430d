"""Log hygiene: phone numbers masked, the app secret never shown.

:class:`RedactingFilter` is installed on the worker's log handlers, so that lines written by
Celery itself (``Task ... succeeded in 0.1s: {...}`` carries the result dict) are masked too.
"""

from __future__ import annotations

import logging
import re

__all__ = ["RedactingFilter", "install", "redact"]

#: A mainland mobile number, with the country code or not (``+86``, ``86``, ``0086``), not part
#: of a longer run of digits.
_MOBILE = re.compile(r"(?<![0-9])((?:0086|86)?1[3-9][0-9])[0-9]{4}([0-9]{4})(?![0-9])")
#: A hexadecimal id (a Polyv requestId, a uuid4().hex message id): its digits are no number,
#: and an operator greps for it whole.
_HEX_ID = re.compile(r"[0-9A-Fa-f]{20,}")
_HEX_ID_EDGE = re.compile(r"[0-9A-Za-z]")
_SECRET_MASK = "**********"  # noqa: S105 - the mask, not a secret


def _masked(match: re.Match[str]) -> str:
    text, start, end = match.string, match.start(), match.end()
    # Widen to the whole word; a long run of hex characters is an id, left as it is.
    while start > 0 and _HEX_ID_EDGE.match(text, start - 1):
        start -= 1
    while end < len(text) and _HEX_ID_EDGE.match(text, end):
        end += 1
    if _HEX_ID.fullmatch(text, start, end):
        return match.group(0)
    return f"{match.group(1)}****{match.group(2)}"


def redact(text: str, secrets: tuple[str, ...] = ()) -> str:
    """Mask mainland mobile numbers (``176****6163``, ``+86176****6163``) and any of
    ``secrets`` in ``text``; hexadecimal ids of 20 characters or more are left whole."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, _SECRET_MASK)
    return _MOBILE.sub(_masked, text)


class RedactingFilter(logging.Filter):
    """Rewrites each record's message with numbers masked and secrets removed.

    Args:
        secrets: strings that must never be logged (the app secret).
    """

    def __init__(self, secrets: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.secrets = tuple(s for s in secrets if s)

    def filter(self, record: logging.LogRecord) -> bool:
        """Format the message once, redact it, and keep the record."""
        try:
            message = record.getMessage()
        except Exception:
            return True
        record.msg = redact(message, self.secrets)
        record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = redact(
                logging.Formatter().formatException(record.exc_info), self.secrets
            )
        elif record.exc_text:
            record.exc_text = redact(record.exc_text, self.secrets)
        return True


def install(logger: logging.Logger | None = None, secrets: tuple[str, ...] = ()) -> None:
    """Add a :class:`RedactingFilter` to every handler of ``logger`` (the root by default)."""
    target = logger or logging.getLogger()
    for handler in target.handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter(secrets))
