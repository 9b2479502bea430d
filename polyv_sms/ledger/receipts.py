"""Answer "did this SMS go out?": look-ups by message id, serialNo and phone number.

Everything returns plain, JSON-safe dicts. Only ``POLYV_APP_ID`` and the ledger's Redis are
needed, never the secret::

    from polyv_sms import Receipts
    receipts = Receipts.from_env()
    receipts.message("order-1234")       # per-number outcomes of a message
    receipts.receipt("605320356903663783^0")
    receipts.phone("17680476163")        # that number's receipts and today's count
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, cast

from polyv_sms.config import Settings
from polyv_sms.ledger.records import parse_record, stored_requests
from polyv_sms.ledger.store import Ledger, build_ledger, connect_redis
from polyv_sms.polyv.phones import check_phone

__all__ = ["Receipts"]


def _iso(ms: float | str | None) -> str | None:
    if ms in (None, ""):
        return None
    return datetime.fromtimestamp(float(ms) / 1000, UTC).isoformat(timespec="milliseconds")


def _receipt(serial_no: str, value: str) -> dict[str, Any]:
    """A receipt from its value in the day's hash: ``number|message id|ms|attempt|day``."""
    number, rest = value.split("|", 1)
    message_id, accepted_at, attempt, day = rest.rsplit("|", 3)  # the id may hold "|"
    return {
        "serial_no": serial_no,
        "phone_number": number,
        "message_id": message_id,
        "accepted_at": _iso(accepted_at),
        "attempt": int(attempt or 0),
        "day": day,
    }


class Receipts:
    """Read-only queries over the ledger of one account.

    Args:
        ledger: the account's ledger.
    """

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger

    @classmethod
    def from_env(cls) -> Receipts:
        """Build from ``POLYV_APP_ID``, ``SMS_REDIS_URL`` and the other settings.

        Raises:
            ConfigError: ``POLYV_APP_ID`` is not set, or ``SMS_REDIS_URL`` is not set and the
                broker is not Redis.
        """
        settings = Settings.from_env()
        client = connect_redis(settings.require_redis_url(), wait_s=settings.redis_outage_s)
        return cls(build_ledger(settings, client))

    def _hash(self, key: str) -> dict[str, str]:
        ledger = self.ledger
        return cast(dict[str, str], ledger.call(ledger.redis.hgetall, key))

    def _newest(self, key: str, limit: int) -> list[tuple[str, float]]:
        ledger = self.ledger
        found = ledger.call(ledger.redis.zrevrange, key, 0, limit - 1, withscores=True)
        return cast(list[tuple[str, float]], found)

    def message(self, message_id: str) -> dict[str, Any] | None:
        """A message's per-number states, attempts and serialNos, or ``None`` if unknown.

        Numbers still ``reserved`` are in flight or waiting for a retry.
        """
        record = self._hash(self.ledger.keys.message(message_id))
        if not record:
            return None
        requests = stored_requests(record)
        numbers = []
        counts: dict[str, int] = {}
        for field, value in record.items():
            if not field.startswith("n:"):
                continue
            state = parse_record(field[2:], value)
            updated = value.split("|", 6)[5]
            counts[state.state] = counts.get(state.state, 0) + 1
            numbers.append(
                {
                    "phone_number": state.number,
                    "state": state.state,
                    "status": state.status,
                    "serial_no": state.serial_no,
                    "attempts": state.attempts,
                    "error": state.error,
                    "day": state.day or None,
                    "updated_at": _iso(updated),
                }
            )
        # The order the numbers were asked in (normalised as the ledger keys them).
        order: dict[str, int] = {}
        for request in requests:
            for raw in request.get("phone_numbers", []):
                order.setdefault(check_phone(raw).number or str(raw)[:64], len(order))
        numbers.sort(key=lambda n: order.get(str(n["phone_number"]), len(order)))
        created = requests[0].get("created_at") if requests else None
        task_ids = [str(request.get("task_id")) for request in requests]
        return {
            "message_id": message_id,
            "task_id": task_ids[0] if task_ids else None,
            "task_ids": task_ids,
            "created_at": _iso(created * 1000) if created else None,
            "pending": int(record.get("pending") or 0),
            "numbers": numbers,
            "counts": counts,
        }

    def _hgets(self, lookups: Sequence[tuple[str, str]]) -> list[str | None]:
        """``HGET key field`` for each ``(key, field)``, in one pipelined round trip."""
        ledger = self.ledger

        def read() -> list[str | None]:
            pipe = ledger.redis.pipeline(transaction=False)
            for key, field in lookups:
                pipe.hget(key, field)
            return cast(list[str | None], pipe.execute())

        return ledger.call(read) if lookups else []

    def _each_day(self, key_of_day: Callable[[str], str], field: str) -> list[tuple[str, str]]:
        """``field`` of ``key_of_day(day)`` for every retained day, newest first: the days that
        have a value, with it."""
        days = self.ledger.receipt_days()
        values = self._hgets([(key_of_day(day), field) for day in days])
        return [(day, value) for day, value in zip(days, values, strict=True) if value is not None]

    def receipt(self, serial_no: str) -> dict[str, Any] | None:
        """One receipt: number, message id, when it was accepted, on which attempt."""
        found = self._each_day(self.ledger.keys.receipts, serial_no)
        if not found:
            return None
        return _receipt(serial_no, found[0][1])

    def phone(self, number: str, limit: int = 20) -> dict[str, Any]:
        """A number's latest receipts (newest first) and today's count against its limit."""
        ledger = self.ledger
        normalised = check_phone(number).number or number
        wanted: list[tuple[str, str]] = []  # (day, serialNo), newest first
        for day, serials in self._each_day(ledger.keys.phones, normalised):
            wanted += [(day, serial) for serial in reversed(json.loads(serials))]
            if len(wanted) >= limit:
                break
        wanted = wanted[:limit]
        values = self._hgets([(ledger.keys.receipts(day), serial) for day, serial in wanted])
        receipts = [
            _receipt(serial, value) if value else {"serial_no": serial, "expired": True}
            for (_, serial), value in zip(wanted, values, strict=True)
        ]
        day = ledger.day()
        used = ledger.call(ledger.redis.hget, ledger.keys.quota(day), normalised)
        return {
            "phone_number": normalised,
            "receipts": receipts,
            "today": {
                "day": day,
                "count": int(used or 0),
                "limit": ledger.phone_daily_limit,
            },
        }

    def quota(self, day: str | None = None, top: int = 10) -> dict[str, Any]:
        """The account's use of a day (today by default) and the busiest numbers."""
        ledger = self.ledger
        day = day or ledger.day()
        counts = self._hash(ledger.keys.quota(day))
        total = int(counts.pop("_total", 0) or 0)
        busiest = sorted(((int(v), k) for k, v in counts.items()), reverse=True)[:top]
        return {
            "day": day,
            "timezone": str(ledger.tz),
            "account": {"used": total, "limit": ledger.account_daily_limit},
            "phone_limit": ledger.phone_daily_limit,
            "numbers": len(counts),
            "top": [{"phone_number": k, "count": v} for v, k in busiest],
        }

    def dead(self, limit: int = 50) -> list[dict[str, Any]]:
        """Messages with numbers that ended ``failed``, newest first."""
        entries = self._newest(self.ledger.keys.dead, limit)
        out = []
        for message_id, score in entries:
            status = self.message(message_id)
            failed = [
                {"phone_number": n["phone_number"], "error": n["error"]}
                for n in (status or {}).get("numbers", [])
                if n["state"] == "failed"
            ]
            out.append({"message_id": message_id, "failed_at": _iso(score), "failed": failed})
        return out
