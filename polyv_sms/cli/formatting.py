"""How ``polyv-sms`` shows things: plain-text tables for people, JSON for scripts.

Every renderer takes the plain dicts that :class:`~polyv_sms.ledger.receipts.Receipts` and the task
return, so the JSON output (``--json``) and the tables always show the same data. Tables show
full phone numbers: they answer an operator's own look-up in a terminal, not a log file.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = [
    "cell",
    "render_dead",
    "render_message",
    "render_phone",
    "render_quota",
    "render_receipt",
    "render_result",
    "table",
    "to_json",
]

_MAX_CELL_CHARS = 60


def to_json(data: object) -> str:
    """``data`` as indented JSON (non-ASCII kept readable)."""
    return json.dumps(data, indent=2, ensure_ascii=False, sort_keys=False)


def cell(value: object, limit: int | None = _MAX_CELL_CHARS) -> str:
    """One table cell on one line: ``-`` for nothing, texts over ``limit`` characters cut."""
    if value is None or value == "":
        return "-"
    text = " ".join(str(value).split())
    if limit is not None and len(text) > limit:
        text = text[: limit - 3] + "..."
    return text


def table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A left-aligned plain-text table with a header line; ``(none)`` when there are no rows.

    Long cells are cut, except in the last column (usually an error message), which is whole.
    """
    last = len(headers) - 1
    lines = [
        [cell(value, None if i == last else _MAX_CELL_CHARS) for i, value in enumerate(row)]
        for row in rows
    ]
    if not lines:
        return "(none)"
    widths = [len(h) for h in headers]
    for line in lines:
        widths = [max(w, len(c)) for w, c in zip(widths, line, strict=True)]
    out = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    out += [
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines
    ]
    return "\n".join(out)


def _pairs(pairs: Sequence[tuple[str, object]]) -> str:
    width = max(len(label) for label, _ in pairs)
    return "\n".join(f"{label.ljust(width)}  {cell(value)}" for label, value in pairs)


def _counts(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{name} {count}" for name, count in counts.items() if count) or "none"


def render_result(result: Mapping[str, Any]) -> str:
    """The task's result (``send --wait``): one line per number."""
    rows = [
        (r["phone_number"], r["outcome"], r["status"], r["attempts"], r["serial_no"], r["error"])
        for r in result["results"]
    ]
    headers = ("NUMBER", "OUTCOME", "STATUS", "ATTEMPTS", "SERIAL NO", "ERROR")
    summary = f"message {result['message_id']}: {_counts(result['counts'])}"
    if (
        result.get("account", "default") != "default"
        or result.get("lane", "standard") != "standard"
    ):
        summary += f" (account {result.get('account', 'default')}, lane {result.get('lane')})"
    return f"{summary}\n{table(headers, rows)}"


def render_message(message: Mapping[str, Any]) -> str:
    """A message record (``status``): per-number state, attempts, serialNos."""
    head = _pairs(
        [
            ("message", message["message_id"]),
            ("task", message["task_id"]),
            ("created", message["created_at"]),
            ("pending", message["pending"]),
            ("states", _counts(message["counts"])),
        ]
    )
    rows = [
        (
            n["phone_number"],
            n["state"],
            n["status"],
            n["attempts"],
            n["serial_no"],
            n["updated_at"],
            n["error"],
        )
        for n in message["numbers"]
    ]
    headers = ("NUMBER", "STATE", "STATUS", "ATTEMPTS", "SERIAL NO", "UPDATED", "ERROR")
    return f"{head}\n\n{table(headers, rows)}"


def render_receipt(receipt: Mapping[str, Any]) -> str:
    """One receipt (``receipt``)."""
    return _pairs(
        [
            ("serial no", receipt["serial_no"]),
            ("number", receipt["phone_number"]),
            ("message", receipt["message_id"]),
            ("accepted at", receipt["accepted_at"]),
            ("attempt", receipt["attempt"]),
            ("day", receipt["day"]),
        ]
    )


def render_phone(phone: Mapping[str, Any]) -> str:
    """A number's receipts and today's count (``phone``)."""
    today = phone["today"]
    head = (
        f"{phone['phone_number']}: {today['count']} of {today['limit']} SMS today ({today['day']})"
    )
    rows = [
        (r["serial_no"], r.get("message_id"), r.get("accepted_at"), r.get("attempt"))
        if not r.get("expired")
        else (r["serial_no"], "(expired)", None, None)
        for r in phone["receipts"]
    ]
    return f"{head}\n\n{table(('SERIAL NO', 'MESSAGE', 'ACCEPTED AT', 'ATTEMPT'), rows)}"


def render_quota(quota: Mapping[str, Any]) -> str:
    """The account's use of a day and its busiest numbers (``quota``)."""
    account = quota["account"]
    head = _pairs(
        [
            ("day", f"{quota['day']} ({quota['timezone']})"),
            ("account", f"{account['used']} of {account['limit']} SMS"),
            ("numbers", f"{quota['numbers']} numbers, at most {quota['phone_limit']} SMS each"),
        ]
    )
    rows = [(t["phone_number"], t["count"]) for t in quota["top"]]
    return f"{head}\n\n{table(('NUMBER', 'SMS TODAY'), rows)}"


def render_dead(entries: Sequence[Mapping[str, Any]]) -> str:
    """Messages with failed numbers (``dead``): one line per failed number."""
    rows = [
        (entry["message_id"], entry["failed_at"], failed["phone_number"], failed["error"])
        for entry in entries
        for failed in entry["failed"] or [{"phone_number": None, "error": None}]
    ]
    return table(("MESSAGE", "FAILED AT", "NUMBER", "ERROR"), rows)
