"""One run of a message: validate, reserve, send, settle. No Celery in here.

The Celery task (:mod:`polyv_sms.tasks`) calls :meth:`Dispatcher.run` and either returns the
result or schedules a retry; tests and the CLI can call it directly.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from polyv_sms import metrics
from polyv_sms.answers import send_and_read
from polyv_sms.backoff import backoff_delay
from polyv_sms.config import POLYV_MAX_NUMBERS_PER_REQUEST
from polyv_sms.errors import (
    InvalidRequest,
    PermanentError,
)
from polyv_sms.lanes import DEFAULT_LANE, lane_account_limit
from polyv_sms.ledger import Ledger, NumberState, Settlement, Slot
from polyv_sms.ledger.journal import Journal
from polyv_sms.ledger.ratelimit import BULK_RATE_WAIT_MAX_S, RATE_LIMIT_PAUSE_S, RateGuard
from polyv_sms.polyv.client import (
    STATUS_UPSTREAM_FAILED,
    PolyvClient,
)
from polyv_sms.polyv.phones import PhoneCheck, check_phone, mask
from polyv_sms.results import SmsResult
from polyv_sms.validation import SmsRequest

__all__ = ["OUTCOMES", "Dispatcher", "RunOutcome"]

log = logging.getLogger("polyv_sms.dispatch")

#: The final outcomes of a number, in the order the result's ``counts`` lists them.
OUTCOMES = ("accepted", "invalid", "quota_exceeded", "account_quota_exceeded", "failed")
_BUSY_JITTER_S = 0.5


@dataclass(frozen=True, slots=True)
class RunOutcome:
    """What one run achieved.

    Attributes:
        result: the result dict when every number has its final outcome, else ``None``.
        retry_in: seconds until the next run when numbers are still pending.
        reason: why a retry is needed (``"status 11"``, ``"busy"``, an error), for logs.
    """

    result: SmsResult | None
    retry_in: float | None = None
    reason: str = ""


@dataclass
class _Run:
    message_id: str
    token: str
    checks: list[PhoneCheck]
    states: dict[str, NumberState] = field(default_factory=dict)
    abort: PermanentError | None = None
    give_up: str | None = None
    retry_in: float | None = None
    account: str = "default"
    lane: str = DEFAULT_LANE


#: Where run tokens come from: a generator of this module's own, seeded by the OS at import
#: and again in each forked child (a prefork pool's children must not share it), and out of
#: reach of an application's ``random.seed(...)``.
_TOKENS = random.Random()
os.register_at_fork(after_in_child=_TOKENS.seed)


def _token() -> str:
    """A run's lease token: 128 bits from :data:`_TOKENS`. Not ``uuid4()``: its
    ``os.urandom`` is a system call that releases the GIL, a hand-off between a worker's busy
    threads per message. The token names a run to the ledger; nothing is protected by
    guessing it."""
    return f"{_TOKENS.getrandbits(128):032x}"


def _chunks(items: Sequence[str], size: int) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class Dispatcher:
    """Send messages through Polyv under the ledger's quotas.

    Args:
        ledger: the Redis ledger of the account.
        client: the Polyv client of the same account.
        max_attempts: Polyv requests per number, the first included.
        retry_backoff_s: delay before the first retry.
        retry_backoff_max_s: the longest delay.
        retry_ambiguous: retry a request whose answer never came (at-least-once); when
            ``False`` such numbers end ``failed`` instead (at-most-once).
        rng: jitter source.
        clock: the current time in seconds.
        account: the account's name (results, metrics and the stored request carry it).
        bulk_headroom: units of the account's daily limit bulk messages may not use.
        guard: the shared rate guard, consulted by each ``reserve`` (one round trip for
            both); its ``sleep`` waits for a slot. ``None`` sends without one (tests).
        journal: where Polyv's answers are kept until the ledger has them (see
            :mod:`polyv_sms.ledger.journal`); ``None``: no journal.
    """

    def __init__(
        self,
        ledger: Ledger,
        client: PolyvClient,
        *,
        max_attempts: int,
        retry_backoff_s: float,
        retry_backoff_max_s: float,
        retry_ambiguous: bool = True,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.time,
        account: str = "default",
        bulk_headroom: int = 0,
        guard: RateGuard | None = None,
        journal: Journal | None = None,
    ) -> None:
        self.journal = journal
        self.account = account
        self.bulk_headroom = bulk_headroom
        self.guard = guard
        self.ledger = ledger
        self.client = client
        self.max_attempts = max_attempts
        self.retry_backoff_s = retry_backoff_s
        self.retry_backoff_max_s = retry_backoff_max_s
        self.retry_ambiguous = retry_ambiguous
        self.rng = rng or random.Random()
        self.clock = clock

    def backoff(self, attempt: int) -> float:
        """Seconds to wait after ``attempt`` attempts."""
        return backoff_delay(attempt, self.retry_backoff_s, self.retry_backoff_max_s, self.rng)

    def run(
        self,
        request: SmsRequest,
        *,
        message_id: str,
        task_id: str,
        give_up: str | None = None,
    ) -> RunOutcome:
        """Drive every number of a message as far as one run can.

        Args:
            request: a validated request.
            message_id: the idempotency key.
            task_id: the Celery task id (stored for the reconciler).
            give_up: when set, numbers still pending end ``failed`` with this reason instead
                of being sent again (the task's safety net against endless retries).

        Returns:
            The result, or when to run again.

        Raises:
            InvalidRequest: the message id was used before with another content; nothing
                was sent.
            LedgerUnavailable: the ledger could not be reached (nothing was sent).
        """
        if self.journal is not None:
            # An answer of this message still in this host's journal goes to the ledger
            # first: the numbers it answers must not be sent again from here.
            self.journal.replay(self.ledger, message_id)
        checks = [check_phone(n) for n in request.phone_numbers]
        lane = request.lane
        run = _Run(message_id, _token(), checks, give_up=give_up, account=self.account, lane=lane)
        account_limit = lane_account_limit(
            lane, self.ledger.account_daily_limit, self.bulk_headroom
        )
        # A dict keeps the first occurrence's order and checks membership in O(1) (a list
        # made deduplicating 2000 numbers quadratic).
        distinct: dict[str, None] = {}
        invalid: dict[str, str] = {}
        for check in run.checks:
            if check.number is not None:
                distinct.setdefault(check.number)
            elif check.raw not in invalid and check.reason:
                invalid[check.raw] = check.reason
        valid = list(distinct)
        meta = {
            "task_id": task_id,
            # The input as given, not the checks' display text: a re-enqueued message must be
            # the same request (a cut text could normalise to a valid number).
            "phone_numbers": list(request.phone_numbers),
            "template_param_names": list(request.template_param_names),
            "template_param_values": list(request.template_param_values),
            "created_at": round(self.clock(), 3),
            "account": self.account,
            "lane": lane,
        }
        chunks = list(_chunks(valid, POLYV_MAX_NUMBERS_PER_REQUEST)) or [[]]
        for index, chunk in enumerate(chunks):
            if run.give_up is not None:
                self._give_up(run, chunk, invalid if index == 0 else {})
                continue
            if run.abort is not None:
                self._fail_unsent(run, chunk)
                continue
            first = index == 0
            # The shared rate guard rides on the reserve (one round trip for both). Bulk books
            # only slots close by: urgent work arriving behind it finds the next ones.
            rate = None
            if self.guard is not None and chunk:
                rate = self.guard.limit(BULK_RATE_WAIT_MAX_S if lane == "bulk" else None)
            reservation = self.ledger.reserve(
                message_id,
                chunk,
                invalid.items() if first else (),
                token=run.token,
                meta=meta if first else None,
                account_limit=account_limit,
                resend_unsettled=self.retry_ambiguous,
                rate=rate,
            )
            if reservation.conflict:
                raise InvalidRequest(
                    f"message_id {message_id!r} was already used for another content (numbers, "
                    "template names or values); one message id is one request: use a new "
                    "message id"
                )
            if reservation.busy_for_s is not None:
                # The holder usually settles within one HTTP timeout; look again then.
                wait = min(reservation.busy_for_s, self.client.timeout)
                delay = wait + self.rng.uniform(0, _BUSY_JITTER_S)
                log.info(
                    "message %s is being sent by another run; again in %.1fs", message_id, delay
                )
                return RunOutcome(None, delay, "busy")
            slot = reservation.slot
            if slot is not None and not slot.granted:
                return self._put_off(message_id, slot)  # nothing was reserved
            run.states.update((s.number, s) for s in reservation.states)
            self._count_refusals(run, reservation.states)
            held = self._wait_for_slot(slot)
            self._send_and_settle(run, request, reservation.states, held=held)
            if held is not None:
                return self._put_off(message_id, held)
        pending = [n for n in valid if run.states.get(n) is None or not run.states[n].final]
        if pending:
            # The delay this run already promised the ledger (the reconciler waits for it), or
            # a fresh one when nothing was sent (another run's lease kept them, say).
            if run.retry_in is None:
                attempts = (run.states[n].attempts for n in pending if n in run.states)
                run.retry_in = self.backoff(max(attempts, default=1))
            return RunOutcome(None, run.retry_in, "pending")
        result = self.result(run)
        metrics.count_outcomes(result["counts"], run.account, run.lane)
        return RunOutcome(result)

    def _wait_for_slot(self, slot: Slot | None) -> Slot | None:
        """Sleep until the slot ``reserve`` booked; ``None`` when the request may go, or the
        pause when Polyv blocked us meanwhile (looked at only after a wait: one more round
        trip, when the rate is the bottleneck; best effort, see ``RateGuard.paused_for``)."""
        if slot is None or slot.wait_s <= 0 or self.guard is None:
            return None
        self.guard.sleep(slot.wait_s)
        left = self.guard.paused_for(ride_out=False)
        return Slot(False, left, paused=True) if left > 0 else None

    def _put_off(self, message_id: str, slot: Slot) -> RunOutcome:
        """The run the rate guard refused (no slot near enough, or paused): again later."""
        reason = "paused" if slot.paused else "rate"
        metrics.count_rate_wait(self.account, reason)
        # Look again within the retry cap (SMS_RETRY_BACKOFF_MAX): a pause lifted early by an
        # operator must not leave messages asleep for its whole 5 minutes.
        delay = min(slot.wait_s, self.retry_backoff_max_s) + self.rng.uniform(0, _BUSY_JITTER_S)
        log.info("message %s: %s; again in %.1fs", message_id, reason, delay)
        return RunOutcome(None, delay, reason)

    def _send_and_settle(
        self,
        run: _Run,
        request: SmsRequest,
        reserved: Sequence[NumberState],
        *,
        held: Slot | None = None,
    ) -> None:
        """Send the numbers granted an attempt and settle them with the others to settle.

        With ``held`` (Polyv blocked us while the run waited for its slot) nothing is sent:
        each attempt granted is given back (``rate_limited``) and the lease released, through
        the journal like an answer (a give-back the ledger never took would, after the lease,
        cost the numbers an attempt - at most once, their outcome).
        """
        to_send = [s.number for s in reserved if s.state == "send"]
        journaling = bool(to_send)
        items = [
            Settlement(
                s.number,
                "fail_keep",
                s.status,
                error=f"no attempts left after {s.attempts}; the last one never reported back",
            )
            for s in reserved
            if s.state == "exhausted"
        ]
        items += [
            Settlement(
                s.number,
                "fail_keep",
                s.status,
                error="its last attempt never reported back (the run sending it was lost); "
                "Polyv may have sent it, and at most once it is not sent again",
            )
            for s in reserved
            if s.state == "unsettled"
        ]
        delay = 0.0
        journaled = None
        # The attempt each number was granted: what its answer (or give-back) is for.
        granted = {s.number: s.attempts for s in reserved}
        if to_send and held is not None:
            error = "Polyv blocks our requests (the shared pause); not sent"
            items += [
                Settlement(n, "rate_limited", error=error, attempt=granted[n]) for n in to_send
            ]
            delay = min(held.wait_s, self.retry_backoff_max_s)
            to_send = []
        if to_send:
            sent = self._send(run, request, to_send)
            sent = [item._replace(attempt=granted[item.number]) for item in sent]
            delay = self.backoff(max(run.states[n].attempts for n in to_send))
            if any(item.action == "rate_limited" for item in sent):
                # Polyv blocks an IP that exceeds its rate for 5 minutes: sooner is wasted,
                # and every worker stops sending through this account meanwhile.
                delay = max(delay, min(RATE_LIMIT_PAUSE_S, self.retry_backoff_max_s))
                if self.guard is not None:
                    self.guard.block_seen(self.account)
            run.retry_in = max(run.retry_in or 0.0, delay)
            items += sent
        if items:
            days = {s.number: s.day for s in reserved}
            now = self.clock()
            # The run's longest delay so far, not this chunk's: a later chunk must not bring
            # the reconciler's due time for the message forward of an earlier chunk's.
            retry_at = now + max(delay, run.retry_in or 0.0)
            journal = self.journal if journaling else None
            if journal is not None:
                # On disk before the settle is attempted: an answer read is never lost, even
                # if the ledger stays down or this process dies (see ledger/journal/); made
                # durable (msync) once the ledger is found unavailable.
                journaled = journal.record(
                    run.message_id,
                    items,
                    days=days,
                    token=run.token,
                    retry_at=retry_at,
                    now=now,
                )
            try:
                _, settled = self.ledger.settle(
                    run.message_id,
                    items,
                    days=days,
                    token=run.token,
                    retry_at=retry_at,
                    now=now,
                    on_outage=None if journal is None else lambda: journal.make_durable(journaled),
                )
            except BaseException:
                # The answer stays in the journal, flushed to disk, for the journal thread and
                # this message's next run (after LedgerBroken it waits for an operator to fix
                # the ledger, not for a restart: it must outlive a power cut too).
                if journal is not None:
                    journal.keep(journaled)
                raise
            Journal.done(journaled)
            run.states.update((s.number, s) for s in settled)

    def _send(self, run: _Run, request: SmsRequest, numbers: list[str]) -> list[Settlement]:
        items, refused = send_and_read(
            lambda: self.client.send(
                numbers, request.template_param_names, request.template_param_values
            ),
            numbers,
            retry_ambiguous=self.retry_ambiguous,
        )
        if refused is not None:
            run.abort = refused
        return items

    def _fail_unsent(self, run: _Run, numbers: Sequence[str]) -> None:
        """After a Polyv error envelope, end the numbers not sent yet ``failed``."""
        assert run.abort is not None
        known = self.ledger.peek(run.message_id, numbers)
        items = [Settlement(n, "fail", error=str(run.abort)) for n in numbers]
        self._settle_unsent(run, items, known)

    def _give_up(self, run: _Run, numbers: Sequence[str], invalid: dict[str, str]) -> None:
        """End the message's pending numbers ``failed`` without sending them again.

        Nothing is reserved: a number still reserved gets its unit back when its last attempt
        was a plain status 11 (Polyv did not send it) and keeps it otherwise (it may have).
        A lease left on the message means a run took an attempt and never settled it: its
        numbers' last status is from an earlier attempt, so no unit is given back then; and
        each settle names the attempt it saw, so a number that moved on meanwhile is left alone.
        """
        assert run.give_up is not None
        known = self.ledger.peek(run.message_id, [*numbers, *invalid])
        unsettled = self.ledger.lease_holder(run.message_id) is not None
        items = [Settlement(raw, "invalid", error=reason) for raw, reason in invalid.items()]
        for number in numbers:
            state = known.get(number)
            if state is None:
                items.append(Settlement(number, "fail", error=run.give_up))
            elif not state.final:
                refund = state.status == STATUS_UPSTREAM_FAILED and not unsettled
                action = "fail" if refund else "fail_keep"
                items.append(
                    Settlement(
                        number, action, state.status, error=run.give_up, attempt=state.attempts
                    )
                )
        run.states.update(known)
        if items:
            self._settle_unsent(run, items, known)

    def _settle_unsent(
        self, run: _Run, items: Sequence[Settlement], known: Mapping[str, NumberState]
    ) -> None:
        """Settle numbers this run did not send; refunds go to their reservation's day."""
        days = {n: s.day for n, s in known.items() if s.state == "reserved"}
        _, settled = self.ledger.settle(
            run.message_id, items, days=days, token=run.token, retry_at=self.clock()
        )
        run.states.update((s.number, s) for s in settled)

    @staticmethod
    def _count_refusals(run: _Run, states: Sequence[NumberState]) -> None:
        for state in states:
            if state.state in ("quota_exceeded", "account_quota_exceeded") and not state.status:
                metrics.count_quota_refusal(state.state, run.account, run.lane)

    def result(self, run: _Run) -> SmsResult:
        """The task's result dict: per-number outcomes in input order, and counts."""
        counts = dict.fromkeys(OUTCOMES, 0)
        results = []
        seen: set[str] = set()
        for check in run.checks:
            key = check.number if check.number is not None else check.raw
            if key in seen:
                continue
            seen.add(key)
            state = run.states.get(key)
            if state is None or not state.final:
                state = NumberState(key, "invalid", "", 0, None, None, check.reason)
            counts[state.state] += 1
            results.append(
                {
                    "phone_number": key,
                    "outcome": state.state,
                    "status": state.status,
                    "serial_no": state.serial_no,
                    "attempts": state.attempts,
                    "error": None if state.state == "accepted" else state.error,
                }
            )
        # DEBUG, not INFO: at INFO, Celery's "Task ... succeeded: {...}" line already carries
        # the result (numbers masked), and a log line costs ~0.1 ms of a worker's CPU.
        if log.isEnabledFor(logging.DEBUG):
            sent = [mask(str(r["phone_number"])) for r in results if r["outcome"] == "accepted"]
            log.debug(
                "message %s done: %s; accepted for %s",
                run.message_id,
                ", ".join(f"{k}={v}" for k, v in counts.items() if v) or "no numbers",
                ", ".join(sent) or "none",
            )
        return SmsResult(
            message_id=run.message_id,
            results=results,
            counts=counts,
            account=run.account,
            lane=run.lane,
        )
