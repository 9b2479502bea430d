"""The answer journal: Polyv's answers kept on local disk until the ledger has them.

Design invariant 6: an answer read from Polyv is never lost. Between reading the answer and
the ledger taking it, the worker may find the ledger's Redis down for longer than
``SMS_REDIS_OUTAGE``, or die. So before the settle is attempted, the dispatcher writes what it
is about to settle - the same arguments, with the time the answer was read - to a file of its
own under ``SMS_JOURNAL_DIR`` (by default ``$SMS_RUN_DIR/journal``), and removes the file once
the settle went through. The write survives the worker process dying (the page cache is the
kernel's); it is fsync'd (file and directory) as soon as the settle's first attempt finds the
ledger unavailable, so that a long outage is also survived by a power cut. Not fsyncing the
happy path, where the settle follows within milliseconds, saves about 0.5 ms of CPU and 1-2 ms
of latency per Polyv request (measured: 15 % of a worker's throughput for one-number messages);
what it gives up is an answer read in the milliseconds before a power cut of the host, the same
class of loss as the host's disk. Whatever is left is replayed:

- by the next run of the same message on this host, before it reserves anything (so a number
  whose answer is here is never sent again from here);
- by every worker's replayer thread, every second while entries are left, from its start (so
  a worker that died with answers in the journal settles them when it is started again);
- by the reconciler, before each sweep.

A replay is the settle itself, which is safe to repeat (``lua/settle.lua``): a final outcome
is never changed, a receipt is written once, and a non-final action applies only while the
number is still at the attempt the answer was for.

One file per settle, written to a temporary name and renamed (a file is complete or absent),
named ``<message key>-<run token>-<time>.json`` so that the entries of one message are found
by prefix. Several worker processes of one host may share the directory; two replaying the
same entry settle it twice, which changes nothing.

The honest limit: the journal lives on one host. If that host is lost for good while it holds
an answer the ledger has not taken, the answer is lost, and after the lease and its takeover
grace another run sends those numbers again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import redis

from polyv_sms import metrics
from polyv_sms.errors import LedgerBroken, LedgerUnavailable
from polyv_sms.ledger.records import Settlement
from polyv_sms.ledger.store import Ledger

__all__ = ["DEFAULT_REPLAY_INTERVAL_S", "Journal", "JournalReplayer", "stranded"]

log = logging.getLogger("polyv_sms.ledger.journal")

#: How often a worker's replayer looks for answers the ledger has not taken.
DEFAULT_REPLAY_INTERVAL_S = 1.0
_VERSION = 1
#: How a settle the script itself refused reads (its own error, or a Lua runtime error).
_SCRIPT_ERRORS = ("settle.lua", "user_script", "Error running script")
_SAFE_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def _key(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8", "surrogatepass"), usedforsecurity=False).hexdigest()[
        :20
    ]


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


class Journal:
    """The answers of one account that the ledger has not taken yet, on local disk.

    Args:
        directory: the journal's root (``SMS_JOURNAL_DIR``); created (mode 0700).
        app_id: the account; its entries live in a directory of their own.
    """

    def __init__(self, directory: str | Path, app_id: str) -> None:
        name = app_id if _SAFE_NAME.fullmatch(app_id) else _key(app_id)
        self.directory = Path(directory) / name
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)

    def __repr__(self) -> str:
        return f"Journal({str(self.directory)!r})"

    def record(
        self,
        message_id: str,
        items: Sequence[Settlement],
        *,
        days: Mapping[str, str],
        token: str,
        retry_at: float,
        now: float,
        sync: bool = False,
    ) -> Path | None:
        """Write one settle to disk before it is attempted (atomically: a reader sees all of
        it or nothing); fsync'd with ``sync``, or later with :meth:`make_durable`.

        Returns:
            The entry (to :meth:`done` once the ledger took it), or ``None`` when it could not
            be written (a full disk, say): sending goes on, and the settle is attempted as it
            would be without a journal.
        """
        entry = {
            "v": _VERSION,
            "message_id": message_id,
            "token": token,
            "now": now,
            "retry_at": retry_at,
            "days": {item.number: days[item.number] for item in items if item.number in days},
            "items": [list(item) for item in items],
        }
        name = f"{_key(message_id)}-{token}-{time.time_ns()}.json"
        path = self.directory / name
        temporary = self.directory / f".{name}.tmp"
        try:
            data = json.dumps(entry, ensure_ascii=False, separators=(",", ":"))
            # 0600: an entry holds phone numbers.
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as handle:
                handle.write(data.encode("utf-8", "surrogatepass"))
            os.replace(temporary, path)
            if sync:
                self.make_durable(path)
        except (OSError, ValueError) as exc:
            log.error(
                "message %s: the answer could not be journaled (%s); settling without it",
                message_id,
                exc,
            )
            with contextlib.suppress(OSError):
                temporary.unlink()
            return None
        return path

    def make_durable(self, path: Path | None) -> None:
        """fsync an entry and the directory that names it (called when the ledger is found
        unavailable: the entry may have to outlive a power cut)."""
        if path is None:
            return
        try:
            for target in (path, self.directory):
                fd = os.open(target, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        except FileNotFoundError:
            return  # settled (and removed) meanwhile
        except OSError as exc:
            log.error("journal entry %s could not be made durable (%s)", path, exc)

    @staticmethod
    def done(path: Path | None) -> None:
        """Forget an entry the ledger has taken."""
        if path is not None:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def entries(self, message_id: str | None = None) -> list[Path]:
        """The entries left, oldest first; only those of ``message_id`` when given."""
        prefix = "" if message_id is None else _key(message_id) + "-"
        try:
            names = [
                entry.name
                for entry in os.scandir(self.directory)
                if entry.name.endswith(".json") and entry.name.startswith(prefix)
            ]
        except FileNotFoundError:
            return []
        names.sort(key=lambda name: int(name.rsplit("-", 1)[1][:-5] or 0))
        return [self.directory / name for name in names]

    def replay(self, ledger: Ledger, message_id: str | None = None) -> int:
        """Settle the entries left (of one message, or all), oldest first.

        An entry the settle script itself refuses is set aside as ``.bad`` (replaying it
        would fail again). An entry the ledger refuses for a reason of its own that retrying
        does not clear (a message record of the wrong type, say: ``LedgerBroken``) stays, and
        the other entries are still replayed: one poisoned message must not keep every other
        message's answers (and the reconciler's sweep) waiting.

        Returns:
            How many entries the ledger took.

        Raises:
            LedgerUnavailable: the ledger could not be reached; the entries stay.
            LedgerBroken: an entry stays because the ledger refused it; raised after every
                other entry was tried.
        """
        replayed = 0
        broken: LedgerBroken | None = None
        for path in self.entries(message_id):
            try:
                entry = json.loads(path.read_bytes().decode("utf-8", "surrogatepass"))
                items = [Settlement(*item) for item in entry["items"]]
                target = str(entry["message_id"])
            except FileNotFoundError:
                continue  # another process replayed it meanwhile
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.error("journal entry %s cannot be read (%s); set aside as .bad", path, exc)
                with contextlib.suppress(OSError):
                    path.rename(path.with_suffix(".bad"))
                continue
            try:
                ledger.settle(
                    target,
                    items,
                    days=entry.get("days") or {},
                    token=str(entry["token"]),
                    retry_at=float(entry["retry_at"]),
                    now=float(entry["now"]),
                )
            except (redis.ResponseError, LedgerBroken) as exc:
                # (The ledger raises LedgerBroken from the script's ResponseError.)
                cause = exc.__cause__ if isinstance(exc, LedgerBroken) else exc
                if not _refused_by_script(cause):
                    # A cluster, permission or wrong-type error: not the entry's fault; it
                    # stays for when the ledger is fixed, and the next entries are tried.
                    log.error("journal entry %s: %s; kept, trying the next ones", path, exc)
                    if broken is None:
                        broken = (
                            exc
                            if isinstance(exc, LedgerBroken)
                            else LedgerBroken(f"ledger Redis (SMS_REDIS_URL): {exc}")
                        )
                    continue
                # Refused by the script itself: replaying it again would fail again and block
                # the message's next runs. Set aside for an operator (outages still propagate).
                log.error(
                    "journal entry %s refused by the ledger (%s); set aside as .bad", path, exc
                )
                with contextlib.suppress(OSError):
                    path.rename(path.with_suffix(".bad"))
                continue
            self.done(path)
            replayed += 1
            metrics.JOURNAL_REPLAYED.inc()
            log.warning(
                "message %s: an answer kept in the journal reached the ledger (%d numbers)",
                target,
                len(items),
            )
        if broken is not None:
            raise broken
        return replayed


def stranded(root: str | Path, known: Sequence[Journal]) -> dict[str, int]:
    """Journal directories under ``root`` that no account of this worker replays, with how
    many answers each holds (an account removed from the accounts file, or renamed to another
    appId, while the ledger had not taken all its answers)."""
    mine = {journal.directory.name for journal in known}
    found: dict[str, int] = {}
    try:
        directories = [entry for entry in os.scandir(root) if entry.is_dir()]
    except OSError:
        return found
    for directory in directories:
        if directory.name in mine:
            continue
        try:
            count = sum(1 for e in os.scandir(directory.path) if e.name.endswith(".json"))
        except OSError:
            continue
        if count:
            found[directory.name] = count
    return found


class JournalReplayer:
    """Replays a journal every ``interval_s`` in a daemon thread while entries are left.

    Args:
        journal: the journal.
        ledger: the ledger its entries go to.
        interval_s: seconds between looks.
    """

    def __init__(
        self, journal: Journal, ledger: Ledger, *, interval_s: float = DEFAULT_REPLAY_INTERVAL_S
    ) -> None:
        self.journal = journal
        self.ledger = ledger
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def replay_once(self) -> int:
        """One pass; an unreachable ledger is logged, and the entries wait for the next."""
        left = len(self.journal.entries())
        metrics.JOURNAL_PENDING.set(left)
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
            metrics.JOURNAL_PENDING.set(len(self.journal.entries()))

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


def entry_summary(path: Path) -> dict[str, Any]:
    """An entry as stored (for ``polyv-sms`` inspection and tests)."""
    return dict(json.loads(path.read_bytes().decode("utf-8", "surrogatepass")))
