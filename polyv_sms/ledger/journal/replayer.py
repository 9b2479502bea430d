"""Settling the entries a journal holds: :meth:`Journal.replay` and the thread that calls it
every second, :class:`JournalReplayer` (part of :mod:`polyv_sms.ledger.journal`, whose
docstring gives the design)."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import redis

from polyv_sms import metrics
from polyv_sms.errors import LedgerBroken, LedgerUnavailable
from polyv_sms.ledger.journal.segment import (
    _IN_FLIGHT,
    _LEFT,
    _SAFE_NAME,
    JournalEntry,
    _key,
    _write_bad,
)
from polyv_sms.ledger.records import Settlement
from polyv_sms.ledger.store import Ledger

log = logging.getLogger("polyv_sms.ledger.journal")

#: How often a worker's replayer looks for answers the ledger has not taken.
DEFAULT_REPLAY_INTERVAL_S = 1.0
#: How a settle the script itself refused reads (its own error, or a Lua runtime error).
_SCRIPT_ERRORS = ("settle.lua", "user_script", "Error running script")


def _refused_by_script(exc: BaseException | None) -> bool:
    """Whether the settle script itself refused an entry (its own error, or a Lua runtime
    error on the entry's arguments), not Redis: a command inside the script that Redis
    refused (``WRONGTYPE``, ``NOPERM``, ``OOM`` ...) carries Redis's error code first, and is
    the ledger's fault, not the entry's (the entry must wait for the ledger to be fixed)."""
    if not isinstance(exc, redis.ResponseError):
        return False
    text = str(exc)
    if "settle.lua:" in text:
        return True
    code = text.split(" ", 1)[0]
    if code.isalpha() and code.isupper() and code != "ERR":
        return False
    return any(mark in text for mark in _SCRIPT_ERRORS)


def _age(handle: JournalEntry) -> tuple[float, int]:
    return handle.written, handle.seq


class _Replays:
    """The half of :class:`~polyv_sms.ledger.journal.Journal` that settles the entries left
    (:meth:`replay`). A mixin: its state is the journal's."""

    if TYPE_CHECKING:
        directory: Path
        _lock: threading.Lock
        _changed: threading.Condition
        _left: dict[str, list[JournalEntry]]

        def entries(self, message_id: str | None = None) -> list[JournalEntry]: ...

        def _adopt(self) -> None: ...

        def _finish(self, handle: JournalEntry) -> None: ...

    def replay(self, ledger: Ledger, message_id: str | None = None) -> int:
        """Settle the entries left (of one message, or all), oldest first.

        With a message id (a run, before it reserves) this is a dictionary lookup when the
        message has no entry left; it waits for an entry of the message that another thread
        is replaying. Without one (the replayer thread, the reconciler) it first takes dead
        processes' segments over.

        An entry the settle script itself refuses is set aside as ``.bad`` (replaying it
        would fail again). An entry the ledger refuses for a reason of its own that retrying
        does not clear (a message record of the wrong type, say: ``LedgerBroken``) stays, and
        the other entries are still replayed: one poisoned message must not keep every other
        message's answers (and the reconciler's sweep) waiting.

        Returns:
            How many entries the ledger took.

        Raises:
            LedgerUnavailable: the ledger could not be reached; the entries stay.
            LedgerBroken: an entry stays because the ledger refused it, or its settle raised
                anything else; raised after every other entry was tried.
        """
        if message_id is None:
            self._adopt()
        elif message_id not in self._left:
            return 0
        with self._lock:
            if message_id is None:
                pending = [handle for handles in self._left.values() for handle in handles]
            else:
                pending = list(self._left.get(message_id, ()))
        pending.sort(key=_age)
        replayed = 0
        broken: LedgerBroken | None = None
        for handle in pending:
            if not self._take(handle, wait=message_id is not None):
                continue
            try:
                outcome = self._replay_one(ledger, handle)
            except LedgerUnavailable:
                raise
            except Exception as exc:
                # Anything else the settle of this one entry raised (an argument the client
                # cannot send, say): it stays, like an entry the ledger refuses, and the
                # next ones are tried - it must not hold up every later answer and every
                # sweep of the account's reconciler (which replays first).
                log.error(
                    "journal entry %r could not be settled (%s: %s); kept, trying the next ones",
                    handle,
                    type(exc).__name__,
                    exc,
                )
                outcome = LedgerBroken(f"journal entry of {handle.key!r}: {type(exc).__name__}")
            finally:
                with self._changed:
                    handle.busy = False
                    self._changed.notify_all()
            if isinstance(outcome, LedgerBroken):
                broken = broken or outcome
            elif outcome:
                replayed += 1
        if broken is not None:
            raise broken
        return replayed

    def _take(self, handle: JournalEntry, *, wait: bool) -> bool:
        """Mark an entry busy for this thread's replay; ``False`` when it is gone, or busy in
        another thread's replay and ``wait`` is false. (A run waits: it must not reserve
        before its message's answers reached the ledger.)"""
        with self._changed:
            while wait and handle.busy:
                self._changed.wait()
            if handle.busy or handle.state != _LEFT:
                return False
            handle.busy = True
            return True

    def _replay_one(self, ledger: Ledger, handle: JournalEntry) -> bool | LedgerBroken:
        """Settle one entry: whether the ledger took it, or the error it stays for."""
        entry = handle.entry
        try:
            items = [Settlement(*item) for item in entry["items"]]
            target = str(entry["message_id"])
            token = str(entry["token"])
            retry_at = float(entry["retry_at"])
            now = float(entry["now"])
            days = dict(entry.get("days") or {})
        except (ValueError, KeyError, TypeError) as exc:
            self._set_aside(handle, f"cannot be read ({exc})")
            return False
        try:
            ledger.settle(target, items, days=days, token=token, retry_at=retry_at, now=now)
        except (redis.ResponseError, LedgerBroken) as exc:
            # (The ledger raises LedgerBroken from the script's ResponseError.)
            cause = exc.__cause__ if isinstance(exc, LedgerBroken) else exc
            if not _refused_by_script(cause):
                # A cluster, permission or wrong-type error: not the entry's fault; it
                # stays for when the ledger is fixed, and the next entries are tried.
                log.error("journal entry %r: %s; kept, trying the next ones", handle, exc)
                return (
                    exc
                    if isinstance(exc, LedgerBroken)
                    else LedgerBroken(f"ledger Redis (SMS_REDIS_URL): {exc}")
                )
            # Refused by the script itself: replaying it again would fail again and block
            # the message's next runs. Set aside for an operator (outages still propagate).
            self._set_aside(handle, f"refused by the ledger ({exc})")
            return False
        self._finish(handle)
        metrics.JOURNAL_REPLAYED.inc()
        log.warning(
            "message %s: an answer kept in the journal reached the ledger (%d numbers)",
            target,
            len(items),
        )
        return True

    def _set_aside(self, handle: JournalEntry, why: str) -> None:
        """Copy an entry to a ``.bad`` file for an operator, and mark it done."""
        token = handle.token if _SAFE_NAME.fullmatch(handle.token) else _key(handle.token)
        name = f"{_key(handle.key)}-{token}-{time.time_ns()}.bad"
        try:
            path = _write_bad(self.directory, name, handle.payload())
        except OSError as exc:
            log.error(
                "journal entry %r %s, and could not be set aside (%s): it stays in %s",
                handle,
                why,
                exc,
                handle.segment,
            )
            with self._lock:  # not replayed again by this process; still open on disk
                if handle.state == _LEFT:
                    self._left[handle.key].remove(handle)
                    if not self._left[handle.key]:
                        del self._left[handle.key]
                    handle.state = _IN_FLIGHT
            return
        log.error("journal entry %r %s; set aside as %s", handle, why, path)
        self._finish(handle)


class JournalReplayer:
    """Replays a journal every ``interval_s`` in a daemon thread while entries are left.

    Args:
        journal: the journal.
        ledger: the ledger its entries go to.
        interval_s: seconds between looks.
        account: the account's name: the ``account`` label of the entries gauge
            (``polyv_sms_journal_entries``), one series per account (one gauge for all was
            set by each account's thread in turn: a scrape saw whichever looked last).
    """

    def __init__(
        self,
        journal: _Replays,
        ledger: Ledger,
        *,
        interval_s: float = DEFAULT_REPLAY_INTERVAL_S,
        account: str = "default",
    ) -> None:
        self.journal = journal
        self.ledger = ledger
        self.interval_s = interval_s
        self._gauge = metrics.JOURNAL_PENDING.labels(account)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def replay_once(self) -> int:
        """One pass (dead processes' segments taken over first); an unreachable ledger is
        logged, and the entries wait for the next."""
        left = len(self.journal.entries())
        self._gauge.set(left)
        if not left:
            return 0
        try:
            return self.journal.replay(self.ledger)
        except LedgerUnavailable as exc:
            log.warning("journal: %s; answers kept on disk, trying again", exc)
            return 0
        except LedgerBroken:
            return 0  # (each entry it refused is logged; the others were replayed)
        finally:
            self._gauge.set(len(self.journal.entries()))

    def start(self) -> None:
        """Replay now and then every ``interval_s`` until :meth:`stop`."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._loop, name="polyv-sms-journal", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread (it ends after its current pass)."""
        self._stop.set()

    def _loop(self) -> None:
        while True:
            try:
                self.replay_once()
            except Exception:
                log.exception("journal replay failed; trying again in %.0fs", self.interval_s)
            if self._stop.wait(self.interval_s):
                return
