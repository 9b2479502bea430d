"""The Redis ledger: daily quotas, per-message outcomes, receipts.

All keys of one account share the hash tag ``{appId}`` so that each Lua script touches one
Redis Cluster slot::

    polyv_sms:{appId}:quota:<YYYYMMDD>   hash: a count per number, "_total" for the account
    polyv_sms:{appId}:msg:<message_id>   hash: the message record (see lua/reserve.lua)
    polyv_sms:{appId}:receipts:<YYYYMMDD> hash: the day's receipts, serialNo ->
                                         "number|message id|accepted at (ms)|attempt|unit day"
    polyv_sms:{appId}:phones:<YYYYMMDD>  hash: the day's receipts by number, number -> JSON
                                         array of serialNos in the order accepted
    polyv_sms:{appId}:dead               zset: message ids with numbers that ended failed
    polyv_sms:{appId}:pending            zset: message ids with numbers still reserved (or a
                                         run put off by the rate guard before it reserved
                                         any), scored by when the reconciler may re-enqueue
                                         them
    polyv_sms:{appId}:rate, :paused      the shared rate guard (see ``ratelimit.py``)

``reserve`` and ``settle`` are one Lua script each, one round trip per Polyv request;
``reserve`` also takes the request's slot of the shared rate guard. Every
call rides out a short Redis outage (a restart) with a bounded in-place retry, so that a
settle after Polyv accepted the numbers is not lost.

Receipts live in one hash per day (by acceptance day in the configured time zone), kept until
the end of that day plus ``SMS_RECEIPT_TTL_DAYS``: a settle of any number of accepted numbers
writes them with a few commands (a key per receipt and a sorted set per number cost five Redis
commands per number). Look-ups by serialNo or number read the retained days in one pipeline.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from importlib import resources
from typing import Any, TypeVar
from zoneinfo import ZoneInfo

import redis

from polyv_sms.config import DEFAULT_TAKEOVER_GRACE_S, Settings
from polyv_sms.errors import LedgerBroken, LedgerUnavailable
from polyv_sms.ledger.connection import (
    DEFAULT_REDIS_CONNECT_TIMEOUT_S,
    DEFAULT_REDIS_SOCKET_TIMEOUT_S,
    LedgerClient,
    connect_redis,
)
from polyv_sms.ledger.records import (
    REQUEST_PREFIX,
    Keys,
    NumberState,
    RateLimit,
    Reservation,
    Settlement,
    Slot,
    content_fingerprint,
    parse_record,
    parse_states,
)

__all__ = [
    "DEFAULT_REDIS_CONNECT_TIMEOUT_S",
    "DEFAULT_REDIS_SOCKET_TIMEOUT_S",
    "Ledger",
    "build_ledger",
    "connect_redis",
    "load_script",
]

log = logging.getLogger("polyv_sms.ledger")

_T = TypeVar("_T")
#: A UTF-16 surrogate on its own: not text Redis's client can encode.
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
#: The helper files prepended to a script: ``_record.lua`` (a number's record) and
#: ``_gcra.lua`` (the shared rate guard).
_HELPERS = {"reserve": ("_record", "_gcra"), "settle": ("_record",), "ratelimit": ("_gcra",)}
#: Errors a Redis restart, failover or a full Redis produce; they pass, so the call is retried
#: (the scripts are safe to replay, and Redis rejects a script's first write when full, never a
#: later one, so nothing is half-applied).
_REDIS_OUTAGE_ERRORS = (
    redis.ConnectionError,
    redis.TimeoutError,
    redis.BusyLoadingError,
    redis.exceptions.OutOfMemoryError,
    redis.exceptions.ReadOnlyError,
    # A Redis Cluster while slots move or a master fails over; a Sentinel's master lost.
    redis.exceptions.TryAgainError,
    redis.exceptions.ClusterDownError,
    redis.exceptions.MasterDownError,
    redis.exceptions.SlotNotCoveredError,
)
#: Errors retrying will not clear: a wrong password or missing permission, a redirection the
#: client cannot follow (a cluster node behind a plain client), a key of the wrong type, a
#: script error. Any other ``ResponseError`` is one too; ``BUSY`` (a long script) is not.
_BROKEN_ERRORS = (
    redis.AuthenticationError,
    redis.exceptions.AuthorizationError,
    redis.exceptions.NoPermissionError,
    redis.exceptions.ResponseError,
    redis.DataError,
)
_OUTAGE_WAIT_FIRST_S = 0.05
_OUTAGE_WAIT_MAX_S = 1.0


def load_script(name: str) -> str:
    """Return the source of ``polyv_sms/ledger/lua/<name>.lua`` (shipped in the wheel).

    ``reserve`` and ``settle`` come with ``_record.lua`` (their shared helpers) prepended,
    ``reserve`` and ``ratelimit`` with ``_gcra.lua`` (the rate guard's).
    """
    lua = resources.files("polyv_sms.ledger").joinpath("lua")
    parts = [*_HELPERS.get(name, ()), name]
    return "".join(lua.joinpath(f"{part}.lua").read_text("utf-8") for part in parts)


@functools.lru_cache(maxsize=16)  # strptime is slow, and a day is asked for all day
def _days_after(tz: ZoneInfo, day: str, days: int) -> int:
    """The start of ``day`` (``YYYYMMDD`` in ``tz``) plus ``days`` days, in unix seconds."""
    start = datetime.strptime(day, "%Y%m%d").replace(tzinfo=tz)
    return int((start + timedelta(days=days)).timestamp())


class Ledger:
    """Quota reservation and settlement for one Polyv account.

    Args:
        client: a Redis, Redis Cluster or Sentinel-managed client with
            ``decode_responses=True`` (see :func:`connect_redis`).
        app_id: the account; it is the keys' hash tag.
        phone_daily_limit: accepted sends per number per day.
        account_daily_limit: accepted sends per account per day.
        max_attempts: Polyv requests per number per message, the first included.
        receipt_ttl_days: how long message records and receipts are kept.
        timezone: what "a day" means.
        lease_s: how long one run holds a message's pending numbers.
        reconcile_grace_s: how long after a retry is due the reconciler re-enqueues it.
        outage_s: how long a call keeps retrying while Redis is unreachable.
        takeover_grace_s: how long an expired lease is left to its holder before another run
            takes its numbers over (see ``lua/reserve.lua``).
        clock: the current time in seconds.
    """

    def __init__(
        self,
        client: LedgerClient,
        app_id: str,
        *,
        phone_daily_limit: int,
        account_daily_limit: int,
        max_attempts: int,
        receipt_ttl_days: int,
        timezone: str,
        lease_s: float,
        reconcile_grace_s: float,
        outage_s: float = 30.0,
        takeover_grace_s: float = DEFAULT_TAKEOVER_GRACE_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.redis = client
        self.app_id = app_id
        self.keys = Keys(app_id)
        self.phone_daily_limit = phone_daily_limit
        self.account_daily_limit = account_daily_limit
        self.max_attempts = max_attempts
        self.ttl_days = receipt_ttl_days
        self.ttl_s = receipt_ttl_days * 86400
        self.tz = ZoneInfo(timezone)
        self.lease_s = lease_s
        self.reconcile_grace_s = reconcile_grace_s
        self.clock = clock
        self.outage_s = outage_s
        self.takeover_grace_s = takeover_grace_s
        self._today: tuple[float, float, str] = (0.0, 0.0, "")
        self._reserve = client.register_script(load_script("reserve"))
        self._settle = client.register_script(load_script("settle"))
        self._requeue = client.register_script(load_script("requeue"))

    def __repr__(self) -> str:
        return f"Ledger(app_id={self.app_id!r})"

    def call(
        self,
        fn: Callable[..., _T],
        *args: Any,
        on_outage: Callable[[], object] | None = None,
        **kwargs: Any,
    ) -> _T:
        """Run one Redis call, riding out a short outage.

        A connection or timeout error, Redis loading its data, a read-only replica (failover)
        or a full Redis (``maxmemory`` with ``noeviction``) is retried after 50 ms, doubling up
        to 1 s apart, until ``outage_s`` have passed since the first attempt. (A plain loop,
        not tenacity: this is on every message's path, and tenacity's bookkeeping costs more
        than the loop.) ``on_outage`` is called once, when the first attempt fails (the
        dispatcher makes its journal entry durable then).

        An error that retrying will not clear (see :class:`~polyv_sms.errors.LedgerBroken`)
        is raised at once: retried through the broker, it would loop forever.

        Raises:
            LedgerUnavailable: Redis stayed unreachable for the whole outage budget.
            LedgerBroken: Redis answered with an error that will not clear.
        """
        started = time.monotonic()
        attempt = 1
        while True:
            try:
                return fn(*args, **kwargs)
            except (*_REDIS_OUTAGE_ERRORS, *_BROKEN_ERRORS) as exc:
                if _never_clears(exc):
                    raise LedgerBroken(
                        f"ledger Redis (SMS_REDIS_URL): {type(exc).__name__}: {exc}"
                    ) from exc
                if on_outage is not None and attempt == 1:
                    try:
                        on_outage()
                    except Exception:
                        log.exception("ledger: the outage callback failed")
                if time.monotonic() - started >= self.outage_s:
                    kind = type(exc).__name__
                    raise LedgerUnavailable(f"ledger Redis unavailable: {kind}") from exc
                log.warning(
                    "ledger Redis unavailable (%s); retrying, attempt %d",
                    type(exc).__name__,
                    attempt,
                )
            time.sleep(min(_OUTAGE_WAIT_FIRST_S * 2 ** (attempt - 1), _OUTAGE_WAIT_MAX_S))
            attempt += 1

    def day(self, now: float | None = None) -> str:
        """The day (``YYYYMMDD`` in the configured time zone) of a moment."""
        moment = self.clock() if now is None else now
        start, end, day = self._today
        if start <= moment < end:  # a day is asked for all day: skip the time-zone maths
            return day
        local = datetime.fromtimestamp(moment, self.tz)
        day = local.strftime("%Y%m%d")
        midnight = local.replace(hour=0, minute=0, second=0, microsecond=0)
        start = midnight.timestamp()
        end = (midnight + timedelta(days=1)).timestamp()
        if start <= moment < end:  # (a day with a DST jump is simply not cached)
            self._today = (start, end, day)
        return day

    def day_expireat(self, day: str) -> int:
        """When a day's quota hash expires: the end of that day plus one day of grace."""
        return _days_after(self.tz, day, 2)

    def receipts_expireat(self, day: str) -> int:
        """When a day's receipts expire: the end of that day plus ``SMS_RECEIPT_TTL_DAYS``."""
        return _days_after(self.tz, day, 1 + self.ttl_days)

    def receipt_days(self, now: float | None = None) -> list[str]:
        """The days whose receipts may still be kept, newest first."""
        moment = self.clock() if now is None else now
        today = datetime.fromtimestamp(moment, self.tz).date()
        return [
            (today - timedelta(days=back)).strftime("%Y%m%d") for back in range(self.ttl_days + 1)
        ]

    def reserve(
        self,
        message_id: str,
        numbers: Sequence[str],
        invalid: Iterable[tuple[str, str]] = (),
        *,
        token: str,
        meta: Mapping[str, object] | None = None,
        account_limit: int | None = None,
        resend_unsettled: bool = True,
        rate: RateLimit | None = None,
    ) -> Reservation:
        """Take a quota unit for each new number and grant this attempt to reserved ones.

        Args:
            message_id: the message.
            numbers: valid, normalised, distinct numbers (at most one Polyv request's worth).
            invalid: ``(input text, reason)`` of numbers that failed validation; recorded as
                ``invalid`` unless the message already has an outcome for them.
            token: this run's lease token.
            meta: the request (with its ``task_id`` and its input as given: ``phone_numbers``,
                ``template_param_names``, ``template_param_values``), stored once per task,
                for the reconciler and ``dead --requeue``. Its content is the message's: a
                message id first reserved with another content is refused.
            account_limit: the account's daily count new numbers may take it up to (its
                lane's limit: less than the account's limit for bulk); the account's limit
                when ``None``.
            resend_unsettled: ``False`` at most once: a number whose last attempt's run was
                lost before it settled gets the verdict ``unsettled`` instead of an attempt.
            rate: the shared rate guard's parameters (``RateGuard.limit``): the same round
                trip books a slot for the request, or reserves nothing when Polyv blocks us
                or no slot is near enough (see ``lua/reserve.lua``); ``None``: no guard.

        Returns:
            The decision for each number, in order; ``conflict`` is set (and nothing was
            written) when the message id was used with another content; ``slot`` is the
            guard's verdict when it was asked.
        """
        now = self.clock()
        now_ms = int(now * 1000)
        day = self.day(now)
        invalid = list(invalid)
        rate_args: tuple[Any, ...] = ("", "", "")
        if rate is not None:
            rate_args = (f"{rate.interval_ms:.6f}", f"{rate.tolerance_ms:.3f}", rate.max_wait_ms)
        args: list[Any] = [
            now_ms,
            day,
            self.day_expireat(day),
            self.ttl_s,
            self.phone_daily_limit,
            self.account_daily_limit if account_limit is None else account_limit,
            self.max_attempts,
            token,
            int(self.lease_s * 1000),
            now_ms + int((self.lease_s + self.reconcile_grace_s) * 1000),
            message_id,
            f"{REQUEST_PREFIX}{meta['task_id']}" if meta else "",
            json.dumps(meta, separators=(",", ":"), ensure_ascii=False) if meta else "",
            len(numbers),
            len(invalid),
            content_fingerprint(meta) if meta else "",
            int(self.takeover_grace_s * 1000),
            "" if resend_unsettled else "1",
            now_ms,
            *rate_args,
            *numbers,
        ]
        for text, reason in invalid:
            args += [text, reason]
        keys = [self.keys.message(message_id), self.keys.quota(day), self.keys.pending]
        if rate is not None:
            keys += [self.keys.rate, self.keys.paused]
        due_ms = int((self.lease_s + self.reconcile_grace_s) * 1000)

        def attempt() -> Any:
            # The lease counts from this attempt, not from the first (see ARGV[19]).
            fresh_ms = max(now_ms, int(self.clock() * 1000))
            args[9] = fresh_ms + due_ms
            args[18] = fresh_ms
            return self._reserve(keys=keys, args=args)

        reply = self.call(attempt)
        if reply[0] == "conflict":
            return Reservation(None, 0, (), conflict=True)
        verdict = reply[0]
        if verdict == "busy":
            return Reservation(int(reply[1]) / 1000, 0, ())
        if verdict in ("rate", "paused"):
            refused = Slot(False, int(reply[1]) / 1000, paused=verdict == "paused")
            return Reservation(None, 0, (), slot=refused)
        asked = [*numbers, *(text for text, _ in invalid)]
        slot = Slot(True, int(reply[2]) / 1000) if reply[2] else None
        return Reservation(None, int(reply[1]), parse_states(asked, reply[3:]), slot=slot)

    def settle(
        self,
        message_id: str,
        items: Sequence[Settlement],
        *,
        days: Mapping[str, str],
        token: str,
        retry_at: float,
        now: float | None = None,
        on_outage: Callable[[], object] | None = None,
    ) -> tuple[int, tuple[NumberState, ...]]:
        """Record Polyv's answers for the numbers of one request.

        Args:
            message_id: the message.
            items: what to record per number.
            days: for each reserved number, the day its unit was taken from.
            token: this run's lease token (released).
            retry_at: when a retry of the numbers left reserved is due (seconds).
            now: when the answer was read (a journal replay gives the original time, so
                that a receipt keeps its day); the clock when omitted.
            on_outage: called once if the first attempt finds Redis unavailable.

        Returns:
            ``(pending, states)``: numbers of the message still reserved, and the state of
            each number settled, in order.
        """
        now = self.clock() if now is None else now
        today = self.day(now)
        keys = [
            self.keys.message(message_id),
            self.keys.pending,
            self.keys.dead,
            self.keys.receipts(today),
            self.keys.phones(today),
        ]
        index: dict[str, int] = {}
        args: list[Any] = [
            int(now * 1000),
            token,
            self.ttl_s,
            self.max_attempts,
            self.phone_daily_limit,
            int((retry_at + self.reconcile_grace_s) * 1000),
            message_id,
            self.receipts_expireat(today),
            len(items),
        ]

        def key_index(day: str) -> int:
            quota_key = self.keys.quota(day)
            found = index.get(quota_key, 0)
            if not found:
                keys.append(quota_key)
                found = index[quota_key] = len(keys)
            return found

        for item in items:
            day = days.get(item.number)
            quota: int | str = 0
            if day:
                quota = key_index(day)
                if item.action == "quota" and day != today:
                    # Polyv's -1 is about today's limit: raise today's counter, not the
                    # reservation day's (an answer read after midnight).
                    quota = f"{quota}:{key_index(today)}"
            status = "" if item.status is None else item.status
            attempt = "" if item.attempt is None else item.attempt
            # Three values per number, not seven: redis-py packs each value on its own.
            args += [
                item.number,
                item.serial_no or "",
                f"{item.action}|{status}|{quota}|{attempt}|{item.error}",
            ]
        try:
            reply = self.call(self._settle, keys=keys, args=args, on_outage=on_outage)
        except UnicodeEncodeError:
            # Polyv's text is JSON: a desc or serialNo may carry a lone surrogate (an emoji
            # cut in two), which Redis's client cannot encode as UTF-8. Nothing was sent (the
            # command is encoded whole before it is written): again, each one replaced.
            args = [_LONE_SURROGATE.sub("\ufffd", a) if isinstance(a, str) else a for a in args]
            reply = self.call(self._settle, keys=keys, args=args, on_outage=on_outage)
        return int(reply[0]), parse_states((item.number for item in items), reply[1:])

    def requeue(self, message_id: str) -> list[str]:
        """Forget the failed outcomes of a message so it can be sent again.

        Returns:
            The numbers that will be sent again.
        """
        keys = [self.keys.message(message_id), self.keys.dead]
        reply = self.call(self._requeue, keys=keys, args=[message_id])
        return [str(number) for number in reply]

    def lease_holder(self, message_id: str) -> str | None:
        """The token of the run whose lease is left on a message (live or expired), if any:
        a run that took an attempt and has not settled it."""
        value = self.call(self.redis.hget, self.keys.message(message_id), "lease")
        return None if value is None else str(value)

    def peek(self, message_id: str, numbers: Sequence[str]) -> dict[str, NumberState]:
        """Read the stored state of some numbers of a message (one ``HMGET``).

        Returns:
            The numbers that have a state, mapped to it.
        """
        if not numbers:
            return {}
        key = self.keys.message(message_id)
        values = self.call(self.redis.hmget, key, [f"n:{n}" for n in numbers])
        found: dict[str, NumberState] = {}
        for number, value in zip(numbers, values, strict=True):
            if value:
                found[number] = parse_record(number, str(value))
        return found


def _never_clears(exc: Exception) -> bool:
    """Whether retrying ``exc`` is pointless (see ``_BROKEN_ERRORS``)."""
    if isinstance(exc, (redis.AuthenticationError, redis.exceptions.AuthorizationError)):
        return True  # (both are ConnectionErrors to redis-py)
    if isinstance(exc, _REDIS_OUTAGE_ERRORS):
        return False
    # BUSY: another script runs too long; it ends or is killed, so waiting helps.
    # NOREPLICAS: a master with min-replicas-to-write refuses writes until a replica is back.
    return not str(exc).startswith(("BUSY", "NOREPLICAS"))


def build_ledger(
    settings: Settings, client: LedgerClient, *, clock: Callable[[], float] = time.time
) -> Ledger:
    """The ledger of the configured account (no credentials needed: only the appId)."""
    if not settings.app_id:
        settings.require_credentials()
    assert settings.app_id is not None
    return Ledger(
        client,
        settings.app_id,
        phone_daily_limit=settings.phone_daily_limit,
        account_daily_limit=settings.account_daily_limit,
        max_attempts=settings.max_attempts,
        receipt_ttl_days=settings.receipt_ttl_days,
        timezone=settings.timezone,
        lease_s=settings.lease_s,
        reconcile_grace_s=settings.reconcile_grace_s,
        outage_s=settings.redis_outage_s,
        takeover_grace_s=settings.takeover_grace_s,
        clock=clock,
    )
