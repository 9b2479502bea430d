"""Reading Polyv's answer: the envelope, the per-number entries, the errors they stand for."""

from __future__ import annotations

from typing import Any

import requests

from polyv_sms.errors import PermanentError, PolyvUnavailable, RateLimited, UnexpectedResponse
from polyv_sms.polyv.response import KNOWN_STATUSES, PhoneResult, PolyvResponse

__all__ = ["json_body", "parse_answer"]

_RATE_LIMIT_MARKERS = ("qps", "exceeds number of calls", "rate limit", "too many requests")
_SHOWN_MALFORMED = 3


def parse_answer(http: requests.Response, elapsed: float) -> PolyvResponse:
    """Polyv's answer (every byte already read), or the error it stands for.

    Args:
        http: the answer, its body read.
        elapsed: seconds the exchange took (kept in the response).

    Returns:
        The per-number results.

    Raises:
        PolyvUnavailable: HTTP 5xx.
        RateLimited: Polyv's rate limiting.
        PermanentError: any other error envelope, with Polyv's code and desc.
        UnexpectedResponse: a body that is not the documented JSON; with the entries that
            parsed in ``response`` when only some per-number entries are malformed or carry an
            unknown status.
    """
    status = http.status_code
    body = json_body(http)
    if not isinstance(body, dict):
        kind = http.headers.get("Content-Type") or "no content type"
        if status >= 500:
            raise PolyvUnavailable(f"Polyv answered HTTP {status} ({kind})")
        raise UnexpectedResponse(
            f"Polyv answered HTTP {status} with a body that is not a JSON object "
            f"({kind}, {len(http.content)} bytes)"
        )
    request_id = str(body.get("requestId") or "")
    if status != 200 or body.get("code") != 200 or body.get("success") is False:
        raise _envelope_error(status, body, request_id)
    data = body.get("data")
    if not isinstance(data, list):
        raise UnexpectedResponse(f"Polyv's answer has no data list (requestId {request_id})")
    # Each entry on its own: one malformed entry must not throw away the others (a
    # status-12 entry lost here would be sent again). The numbers of malformed entries
    # are missing from the results, which the dispatcher treats as ambiguous.
    results = []
    unknown = set()
    malformed = []
    for index, entry in enumerate(data):
        result = _parse_entry(entry)
        if isinstance(result, str):
            malformed.append(f"entry {index} {result}")
            continue
        results.append(result)
        if result.status not in KNOWN_STATUSES:
            unknown.add(result.status)
    response = PolyvResponse(request_id, tuple(results), elapsed)
    if unknown or malformed:
        problems = []
        if unknown:
            problems.append(f"unknown per-number status(es) {sorted(unknown)}")
        if malformed:
            shown = "; ".join(malformed[:_SHOWN_MALFORMED])
            more = len(malformed) - _SHOWN_MALFORMED
            shown += f"; +{more} more" if more > 0 else ""
            problems.append(f"{len(malformed)} malformed data entr(y/ies) ({shown})")
        raise UnexpectedResponse(
            f"Polyv answered {' and '.join(problems)} (requestId {request_id})",
            response=response,
        )
    return response


def _parse_entry(entry: object) -> PhoneResult | str:
    """One per-number entry, or what is wrong with it (never quoting the entry: PII)."""
    if not isinstance(entry, dict):
        return "is not an object"
    number = entry.get("phoneNumber")
    status = entry.get("status")
    serial = entry.get("serialNo")
    if isinstance(number, int) and not isinstance(number, bool):
        number = str(number)
    if not isinstance(number, str):
        return "lacks a phoneNumber"
    if not isinstance(status, int) or isinstance(status, bool):
        return "lacks an integer status"
    if serial is not None and not isinstance(serial, str):
        return "has a serialNo that is not a string"
    return PhoneResult(number, status, serial or None)


def json_body(http: requests.Response) -> Any:
    """The answer's JSON, decoded as requests does (the charset the Content-Type declares,
    else UTF-8 for JSON); ``None`` when it is not JSON."""
    try:
        return http.json()
    except ValueError:  # not JSON, or not text in that charset
        return None


def _envelope_error(status: int, body: dict[str, Any], request_id: str) -> Exception:
    raw_error = body.get("error")
    error: dict[str, Any] = raw_error if isinstance(raw_error, dict) else {}
    code = error.get("code")
    code = code if isinstance(code, int) and not isinstance(code, bool) else None
    desc = str(error.get("desc") or body.get("message") or "").strip()
    where = f"HTTP {status}, requestId {request_id or '-'}"
    if status == 429 or any(marker in desc.lower() for marker in _RATE_LIMIT_MARKERS):
        return RateLimited(f"Polyv rate limiting: {desc or 'too many requests'} ({where})")
    if status >= 500:
        return PolyvUnavailable(f"Polyv answered HTTP {status}: {desc or 'server error'}")
    if code is None and not desc:
        return UnexpectedResponse(f"Polyv answered an error without code or desc ({where})")
    return PermanentError(
        f"Polyv refused the request: error {code}: {desc} ({where})",
        code=code,
        desc=desc,
        request_id=request_id or None,
        http_status=status,
    )
