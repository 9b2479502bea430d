"""The reconciler: re-enqueue messages whose retry never ran.

A message with numbers still ``reserved`` sits in the ledger's ``pending`` set, scored by the
time its retry is due plus a grace period; so does a message whose run the rate guard put off
before it reserved anything (its numbers have no record yet; ``lua/reserve.lua`` keeps the
task's request and the entry). Normally the retry (a broker message published by
``self.retry``) runs first and moves or removes the entry. When it cannot - Celery drops a
task whose retry could not be published while the broker was down, a worker that loses its
broker connection drops the countdown retries it holds, or a worker holding the retry was
killed - the entry becomes overdue and the reconciler publishes the message again, with the
same task id and message id. The ledger makes a second copy harmless: accepted numbers
are never sent again and a lease keeps two runs from sending the same numbers at once.

Every worker runs a reconciler thread (``SMS_RECONCILE_INTERVAL``; 0 turns it off); a Redis lock
lets one sweep at a time. ``polyv-sms reconcile`` runs one sweep by hand.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable
from typing import Any, cast

from polyv_sms import metrics
from polyv_sms.errors import LedgerBroken
from polyv_sms.ledger.journal import Journal
from polyv_sms.ledger.records import stored_requests
from polyv_sms.ledger.store import Ledger
from polyv_sms.polyv.phones import check_phone

__all__ = ["Reconciler"]

log = logging.getLogger("polyv_sms.ledger.reconcile")

#: Delete the lock only if this sweep still holds it.
_RELEASE_LOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

#: ``enqueue(message_id, task_id, kwargs)`` publishes ``polyv_sms.send_sms`` again.
Enqueue = Callable[[str, str, dict[str, Any]], None]


class Reconciler:
    """Finds overdue messages in the ledger and enqueues them again.

    Args:
        ledger: the account's ledger.
        enqueue: publishes the task.
        interval_s: seconds between sweeps (the lock lives this long).
        batch: messages handled per sweep at most.
        journal: this host's answer journal, replayed before each sweep (an answer waiting
            there must reach the ledger before its message is judged overdue).
    """

    def __init__(
        self,
        ledger: Ledger,
        enqueue: Enqueue,
        *,
        interval_s: float,
        batch: int = 100,
        journal: Journal | None = None,
    ) -> None:
        self.ledger = ledger
        self.journal = journal
        self.enqueue = enqueue
        self.interval_s = interval_s
        self.batch = batch
        self._release = ledger.redis.register_script(_RELEASE_LOCK)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sweep(self) -> list[str]:
        """One pass: re-enqueue overdue messages.

        Returns:
            The message ids enqueued again.
        """
        ledger, keys = self.ledger, self.ledger.keys
        client = ledger.redis
        if self.journal is not None:
            try:
                self.journal.replay(ledger)
            except LedgerBroken as exc:
                # An entry the ledger refuses stays in the journal (logged); the sweep goes
                # on: a message it re-enqueues replays its entries first and fails, unsent.
                log.error("reconciler: a journal entry was refused (%s); sweeping anyway", exc)
        now = ledger.clock()
        # The lock keeps sweeps of several workers from overlapping; it expires on its own if
        # a sweeper dies, and is released when the sweep ends.
        token = uuid.uuid4().hex
        lock_ms = max(1000, int(self.interval_s * 1000))
        if not ledger.call(client.set, keys.reconcile_lock, token, nx=True, px=lock_ms):
            return []
        try:
            return self._sweep_locked(now)
        finally:
            ledger.call(self._release, keys=[keys.reconcile_lock], args=[token])

    def _sweep_locked(self, now: float) -> list[str]:
        ledger, keys = self.ledger, self.ledger.keys
        client = ledger.redis
        due = ledger.call(
            client.zrange,
            keys.pending,
            "-inf",
            int(now * 1000),
            byscore=True,
            offset=0,
            num=self.batch,
        )
        enqueued = []
        later_ms = int((now + ledger.lease_s + ledger.reconcile_grace_s) * 1000)
        for member in due:
            message_id = str(member)
            try:
                if self._revive(message_id, now):
                    enqueued.append(message_id)
            except Exception:
                # One bad record must not block the others: look at it again later.
                log.exception("message %s: could not be enqueued again", message_id)
            ledger.call(client.zadd, keys.pending, {message_id: later_ms}, xx=True)
        return enqueued

    def _revive(self, message_id: str, now: float) -> bool:
        """Enqueue again the requests of an overdue message that still have pending numbers
        (reserved, or never reserved: a run the rate guard put off).

        Returns:
            True when something was enqueued.
        """
        ledger, keys = self.ledger, self.ledger.keys
        record = cast(dict[str, str], ledger.call(ledger.redis.hgetall, keys.message(message_id)))
        if not int(record.get("pending") or 0) and not _put_off(record):
            ledger.call(ledger.redis.zrem, keys.pending, message_id)
            return False
        lease_until = int(record.get("lease_until") or 0)
        if lease_until > now * 1000:
            return False  # a run is sending it right now
        stale = int(record.get("lease_stale") or 0)
        if stale >= lease_until and stale + ledger.takeover_grace_s * 1000 > now * 1000:
            return False  # its run's lease ran out; the run still has its takeover grace
        pending = {
            field[2:]
            for field, value in record.items()
            if field.startswith("n:") and value.startswith("reserved|")
        }
        # Each task that enqueued this message id gets its own request back (with its own
        # task id, so that its caller's AsyncResult.get() returns), if it has pending numbers
        # (reserved, or none of its runs got as far as reserving them).
        revived = False
        for request in stored_requests(record):
            numbers = _valid(request)
            if not numbers & pending and not _unreserved(record, numbers):
                continue
            kwargs = {
                "phone_numbers": request["phone_numbers"],
                "template_param_names": request["template_param_names"],
                "template_param_values": request["template_param_values"],
                "message_id": message_id,
            }
            # The account and lane it was enqueued with (stored only when not the defaults,
            # like the task's own keywords): never another account.
            for key, default in (("account", "default"), ("lane", "standard")):
                if request.get(key, default) != default:
                    kwargs[key] = request[key]
            self.enqueue(message_id, str(request["task_id"]), kwargs)
            metrics.RECONCILED.inc()
            log.warning(
                "message %s: its retry never ran; enqueued again (task %s)",
                message_id,
                request["task_id"],
            )
            revived = True
        return revived

    def start(self) -> None:
        """Sweep every ``interval_s`` in a daemon thread until :meth:`stop`."""
        if self._thread is not None or self.interval_s <= 0:
            return
        self._thread = threading.Thread(target=self._loop, name="polyv-sms-reconciler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread (returns at once; the thread ends after its current sweep)."""
        self._stop.set()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.sweep()
            except Exception:
                log.exception("reconciler sweep failed; trying again in %.0fs", self.interval_s)


def _valid(request: dict[str, Any]) -> set[str]:
    """The valid numbers of a stored request, normalised as the ledger keys them."""
    checked = (check_phone(raw).number for raw in request["phone_numbers"])
    return {number for number in checked if number is not None}


def _unreserved(record: dict[str, str], numbers: set[str]) -> set[str]:
    """Numbers the message's runs never reserved: the rate guard put the run off first."""
    return {number for number in numbers if f"n:{number}" not in record}


def _put_off(record: dict[str, str]) -> bool:
    """A stored request has numbers no run reserved yet (see ``lua/reserve.lua``: a run the
    rate guard puts off leaves its request and a pending entry, nothing else)."""
    return any(_unreserved(record, _valid(request)) for request in stored_requests(record))
