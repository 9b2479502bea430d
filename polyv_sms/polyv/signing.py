"""Polyv's request signature ("签名生成规则").

The rule, as Polyv publishes it and as ``docs/polyv-sms-api.md`` restates it:

1. take every signed parameter except ``sign``; drop those whose value is null or blank;
2. sort them by name, ascending ASCII order;
3. concatenate ``name1value1name2value2...`` with no separators;
4. put the app secret at both ends;
5. hash the UTF-8 bytes with MD5 (or SHA-256 when ``signatureMethod=SHA256`` is used) and
   render the digest as upper-case hex.

Values are rendered as text the way Polyv's Java SDK renders them: integers in decimal,
booleans as ``true``/``false``, lists and dicts as compact JSON.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping

__all__ = ["SIGN_METHODS", "render_value", "sign", "signing_string"]

#: Digest names Polyv accepts, mapped to :mod:`hashlib` constructors.
SIGN_METHODS = {"MD5": hashlib.md5, "SHA256": hashlib.sha256}


def render_value(value: object) -> str | None:
    """Render one parameter value as the text that is signed.

    Args:
        value: the parameter value.

    Returns:
        The text, or ``None`` when the value is null or blank and must be left out.
    """
    if value is None:
        return None
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, str):
        text = value
    elif isinstance(value, list | tuple | dict):
        text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    else:
        text = str(value)
    return text if text.strip() else None


def signing_string(params: Mapping[str, object], secret: str) -> str:
    """Build the string that is hashed: ``secret + name1value1... + secret``.

    It contains the secret: never log it. Exposed for tests and for debugging a sign
    mismatch with Polyv's support on a machine that already holds the secret.

    Args:
        params: the signed parameters (``sign`` itself is ignored).
        secret: the account's app secret.

    Returns:
        The concatenated string.
    """
    rendered = []
    for name, value in params.items():
        if name == "sign":
            continue
        text = render_value(value)
        if text is not None:
            rendered.append((name, text))
    rendered.sort(key=lambda item: item[0].encode("utf-8"))
    return secret + "".join(name + text for name, text in rendered) + secret


def sign(params: Mapping[str, object], secret: str, method: str = "MD5") -> str:
    """Compute Polyv's ``sign`` for a set of request parameters.

    Args:
        params: the signed parameters, e.g. ``{"appId": ..., "timestamp": ...}``. When the
            request carries ``signatureMethod``, include it here: it is signed like any
            other parameter.
        secret: the account's app secret.
        method: ``"MD5"`` (the default, 32 hex characters) or ``"SHA256"`` (64).

    Returns:
        The digest as upper-case hex.

    Raises:
        ValueError: ``method`` is not one Polyv knows, or ``secret`` is empty.
    """
    digest = SIGN_METHODS.get(method.upper())
    if digest is None:
        known = ", ".join(sorted(SIGN_METHODS))
        raise ValueError(f"method: unknown sign method {method!r}; expected one of {known}")
    if not secret:
        raise ValueError("secret: the app secret is empty")
    payload = signing_string(params, secret).encode("utf-8")
    return digest(payload).hexdigest().upper()
