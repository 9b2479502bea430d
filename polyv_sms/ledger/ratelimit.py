"""The shared rate guard: SMS_POLYV_RATE Polyv requests per second across every worker, and a
shared pause while Polyv blocks us for exceeding its rate.

Polyv blocks a caller that exceeds its rate for 5 minutes (:data:`RATE_LIMIT_PAUSE_S`). Two
keys of the account in the ledger Redis keep every worker and thread in step::

    polyv_sms:{appId}:rate     the GCRA's next "theoretical arrival time" (lua/_gcra.lua)
    polyv_sms:{appId}:paused   set with a TTL when Polyv answered "rate exceeded": nobody sends
                               until it expires (``polyv-sms pause --clear`` lifts it early)

The dispatcher takes its slot in the same round trip as the reservation: it hands
:meth:`RateGuard.limit` to ``Ledger.reserve(rate=...)``, and ``lua/reserve.lua`` consults the
guard once it knows a number will be sent, before it writes anything, so that a request put off
by the guard holds no unit and burns no attempt (a round trip of its own cost the worker
about 5 % of its CPU per 1-number message: docs/performance.md). The GCRA lives in one place,
``lua/_gcra.lua``, prepended to ``reserve.lua`` and to ``ratelimit.lua``, which is the guard on
its own (:meth:`RateGuard.try_acquire`, for tests and tools). This class also keeps the pause:
:meth:`RateGuard.block_seen`, :meth:`RateGuard.paused_for`, :meth:`RateGuard.clear`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

import redis

from polyv_sms.ledger.records import RateLimit, Slot
from polyv_sms.ledger.store import Ledger, load_script

__all__ = [
    "BULK_RATE_WAIT_MAX_S",
    "DEFAULT_RATE_WAIT_MAX_S",
    "RATE_BURST_S",
    "RATE_LIMIT_PAUSE_S",
    "RateGuard",
    "RateLimit",
    "Slot",
]

log = logging.getLogger("polyv_sms.ledger.ratelimit")

#: Polyv blocks an IP that exceeds its rate limit for 5 minutes; every worker pauses that long.
RATE_LIMIT_PAUSE_S = 300.0
#: How far ahead of the steady pace requests may go: at most ``rate * (1 + RATE_BURST_S) + 1``
#: requests start in any one-second window.
RATE_BURST_S = 0.1
#: A request waits in-process for its slot up to this long; a later slot is taken by a task
#: retry (a countdown, no attempt consumed) instead of holding a worker thread.
DEFAULT_RATE_WAIT_MAX_S = 1.0
#: Bulk messages book slots at most this far ahead, so that the schedule they fill is never
#: more than this long for an urgent or standard message arriving behind them.
BULK_RATE_WAIT_MAX_S = 0.2


class RateGuard:
    """One account's shared limiter and pause (see the module docstring).

    Args:
        ledger: the account's ledger (its Redis, keys and outage handling).
        rate: requests per second across every worker.
        max_wait_s: the longest in-process wait for a slot.
        sleep: how to wait for a slot (injected in tests); the dispatcher uses it too.
        peers: the guards of every account of the deployment (this one joins it): Polyv
            blocks an IP, not an account, so a block seen through one pauses them all.
    """

    def __init__(
        self,
        ledger: Ledger,
        rate: float,
        *,
        max_wait_s: float = DEFAULT_RATE_WAIT_MAX_S,
        sleep: Callable[[float], None] = time.sleep,
        peers: list[RateGuard] | None = None,
    ) -> None:
        if not rate > 0:
            raise ValueError("rate must be > 0")
        self.peers = peers if peers is not None else []
        self.peers.append(self)
        self.ledger = ledger
        self.rate = rate
        self.max_wait_s = max_wait_s
        self.sleep = sleep
        self.rate_key = ledger.keys.rate
        self.pause_key = ledger.keys.paused
        self._interval_ms = 1000.0 / rate
        self._tolerance_ms = 1000.0 * RATE_BURST_S
        self._script = ledger.redis.register_script(load_script("ratelimit"))

    def __repr__(self) -> str:
        return f"RateGuard(app_id={self.ledger.app_id!r}, rate={self.rate:g})"

    @property
    def burst(self) -> int:
        """Requests beyond the steady rate that may start in one second."""
        return math.floor(self.rate * RATE_BURST_S) + 1

    def limit(self, max_wait_s: float | None = None) -> RateLimit:
        """The guard's parameters for ``Ledger.reserve(rate=...)``, which books the slot in
        the reservation's round trip.

        Args:
            max_wait_s: the furthest slot to book; the guard's ``max_wait_s`` when ``None``.
        """
        wait_s = self.max_wait_s if max_wait_s is None else max_wait_s
        return RateLimit(self._interval_ms, self._tolerance_ms, int(wait_s * 1000))

    def try_acquire(self, max_wait_s: float | None = None) -> Slot:
        """Book a slot for one Polyv request, or say how long to wait (one round trip of
        ``lua/ratelimit.lua``; the dispatcher books its slots through ``reserve`` instead).

        Args:
            max_wait_s: the furthest slot to book; the guard's ``max_wait_s`` when ``None``.
        """
        rate = self.limit(max_wait_s)
        args = [f"{rate.interval_ms:.6f}", f"{rate.tolerance_ms:.3f}", rate.max_wait_ms]
        verdict, ms = self.ledger.call(
            self._script, keys=[self.rate_key, self.pause_key], args=args
        )
        wait_s = int(ms) / 1000
        if verdict == "ok":
            return Slot(True, wait_s)
        return Slot(False, wait_s, paused=verdict == "paused")

    def acquire(self, max_wait_s: float | None = None) -> Slot:
        """Book a slot and sleep until it comes; or, if it is too far off (or Polyv blocks us),
        return without sleeping: the caller retries later and has taken nothing."""
        slot = self.try_acquire(max_wait_s)
        if slot.granted and slot.wait_s > 0:
            self.sleep(slot.wait_s)
            # A rate-limit answer may have come while this one slept (one more round trip,
            # only for a request that had to wait, i.e. when the rate is the bottleneck).
            left = self.paused_for()
            if left > 0:
                return Slot(False, left, paused=True)
        return slot

    def pause(self, seconds: float = RATE_LIMIT_PAUSE_S, reason: str = "rate exceeded") -> None:
        """Stop every worker sending through this account for ``seconds``.

        A pause already longer is kept (the block started earlier ends later than ours). Two
        commands, not ``PEXPIRE GT`` (Redis 7 only): two workers racing both set about the same
        pause, which is harmless.
        """
        ms = max(1, int(seconds * 1000))
        redis = self.ledger.redis
        if int(self.ledger.call(redis.pttl, self.pause_key)) < ms:
            self.ledger.call(redis.set, self.pause_key, reason, px=ms)

    def block_seen(self, account: str) -> None:
        """Polyv answered "rate exceeded": pause every worker for :data:`RATE_LIMIT_PAUSE_S`,
        through this account and every other of the deployment (:attr:`peers`: Polyv blocks
        the IP, whatever the account). Best effort: the settle that follows matters more (the
        numbers' attempts are given back either way), so a failure is logged, not raised."""
        for guard in self.peers:
            try:
                guard.pause(RATE_LIMIT_PAUSE_S)
            except Exception:
                log.exception(
                    "could not set the shared pause of appId %s; each worker will meet the block",
                    guard.ledger.app_id,
                )
        log.warning(
            "Polyv rate limit (seen through account %s): every worker pauses sends through "
            "%d accounts for %.0fs",
            account,
            len(self.peers),
            RATE_LIMIT_PAUSE_S,
        )

    def paused_for(self, *, ride_out: bool = True) -> float:
        """Seconds left of the pause (0 when not paused).

        Args:
            ride_out: ride out a Redis outage like every ledger call. ``False``: one attempt,
                and 0 when Redis does not answer - the dispatcher's second look after waiting
                for a slot, with its numbers reserved under a lease: riding out an outage there
                would eat into the lease, and the look is best effort anyway (a request on the
                wire when the pause is set cannot be called back either).
        """
        if ride_out:
            ms = int(self.ledger.call(self.ledger.redis.pttl, self.pause_key))
        else:
            try:
                ms = int(self.ledger.redis.pttl(self.pause_key))
            except redis.RedisError as exc:
                log.warning(
                    "could not look at the shared pause of appId %s (%s); sending",
                    self.ledger.app_id,
                    type(exc).__name__,
                )
                return 0.0
        return max(0, ms) / 1000

    def clear(self) -> bool:
        """Lift the pause now (an operator who knows Polyv unblocked us). True if one was set."""
        return bool(self.ledger.call(self.ledger.redis.delete, self.pause_key))
