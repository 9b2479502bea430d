"""The answer journal: Polyv's answers kept on local disk until the ledger has them.

Design invariant 6: an answer read from Polyv is never lost. Between reading the answer and
the ledger taking it, the worker may find the ledger's Redis down for longer than
``SMS_REDIS_OUTAGE``, or die. So before the settle is attempted, the dispatcher writes what it
is about to settle - the same arguments, with the time the answer was read - to the journal
under ``SMS_JOURNAL_DIR`` (by default ``$SMS_RUN_DIR/journal``), one directory per account,
and marks it done once the settle went through.

**On disk.** Each process keeps, per account, a *segment*: a file of fixed size
(``DEFAULT_SEGMENT_SLOTS`` slots of ``SLOT_SIZE`` bytes, 1 MiB; mode 0600: entries hold phone
numbers) named ``<pid>-<random>.seg``, created at the process's first entry (a process that
only replays creates nothing), under a temporary name, allocated (``posix_fallocate``: a full
disk fails the creation, not a write into the mapping later), locked with ``flock(LOCK_EX)``,
renamed into place and the directory fsync'd. The process maps it (``mmap``, ``MAP_SHARED``)
and holds the lock for its whole life. An entry is its JSON (the same fields as the old
one-file-per-entry journal) in whole slots, the first one starting with a 64-byte header:
magic, state, version, slot count, length, a sequence number, the time it was written and a
CRC-32 of header and JSON. :meth:`Journal.record` copies the JSON in, then the header, and
the state byte (``open``) last; :meth:`Journal.done` sets it to ``done`` and frees the slots in
memory. Neither makes a syscall (they write to the page cache through the mapping) nor, for an
entry of one slot (up to about 50 numbers), takes a lock: the slot is taken from and given
back to a list, whose ``pop`` and ``append`` are atomic under the GIL. With 8 worker threads a
contended lock would be what a syscall is: a futex and a GIL hand-off. A segment that is full
gets a sibling (removed once empty); an entry larger than a segment gets a segment of its own
size. A process that exits cleanly removes its segments that hold nothing.

**What survives what.** The mapped pages are the kernel's: an entry whose state byte was
written survives the process being killed exactly as a written, un-fsync'd file does. A
process killed before the state byte leaves no entry (as one killed before its file was
renamed did). The entry's pages are flushed to disk (``msync``, :meth:`Journal.make_durable`)
as soon as the settle's first attempt finds the ledger unavailable, or the settle fails for any
other reason (an error that never clears, ``LedgerBroken``, waits for an operator): an answer
waiting out an outage survives a power cut too. Not flushing the happy path, where the settle
follows within milliseconds, gives up an answer read in the milliseconds before a power cut of
the host, the same class of loss as the host's disk (the CRC catches an entry torn by one).
Writing through a mapping has one sharp edge: where the filesystem must find new blocks for a
write (copy-on-write filesystems such as btrfs or ZFS; the file is allocated up front for the
others), a full disk is a ``SIGBUS`` that kills the process, not an error to log.

**Whatever is left is replayed** (a replay is the settle itself, safe to repeat,
``lua/settle.lua``: a final outcome is never changed, a receipt is written once, and a
non-final action applies only while the number is still at the attempt the answer was for):

- by the next run of the same message in this process, before it reserves anything
  (:meth:`Journal.replay` with a message id: a dictionary lookup, no syscall, on the happy
  path), so a number whose answer is here is never sent again from here;
- by every worker process's replayer thread (:class:`JournalReplayer`; a child of Celery's
  prefork pool starts its own, :func:`polyv_sms.background.start_in_pool_child`), every
  second, and by the reconciler before each sweep (:meth:`Journal.replay` without a message
  id). A pass first tries ``flock(LOCK_EX | LOCK_NB)`` on every other segment of the
  directory. Got it: the segment's process is dead (the kernel dropped its lock), so this
  process takes the segment over and keeps it locked - reads its open entries (one whose
  magic, bounds or CRC do not check out is set aside as ``.bad`` and logged; a file cut short
  of a whole slot keeps its whole slots, so only an entry the cut reaches fails its bounds)
  and indexes them in memory with its own entries left by failed settles (its runs of those
  messages find them by the same lookup). Not got: the segment's process is alive, and
  replays its own. The pass then settles every
  entry indexed, oldest first, marks each done in its file, and removes a taken-over file when
  none is left in it. So two live processes never replay each other's entries, and a dead
  process's entries are taken over by one live process at a time (if that one dies too, the
  next takes them over from it).

**Why a lookup is enough before a run reserves.** A run of message M in process B does not
look at the disk for the answers of another process A of this host. It need not: if A is alive
its answer for M is either settling (A's run holds M's lease, so B's reserve answers ``busy``)
or left and replayed by A within a second of the ledger taking calls. If A died, A's lease on
M's numbers lasts until ``lease_until``, and ``reserve.lua`` then leaves an expired lease to
its holder for ``SMS_TAKEOVER_GRACE`` (10 s) more, counted from the first reserve that saw it
expired - a reserve that went through, so the ledger is up. Every live worker of the host runs
a pass every second, taking dead segments over without the ledger and settling them as soon as
it answers: A's answer reaches the ledger (or B's index, when B took A's segment) long before
any run may take the numbers over. The limit is the same as before: if no worker of this host
runs for the whole grace after the ledger is back, another run sends those numbers again.

Fork: a child process never writes its parent's mapping. ``os.register_at_fork`` makes every
journal of the child forget its parent's segments (unmapped, their descriptors closed - the
parent keeps its lock) and the child opens a segment of its own at its first entry.

An entry that cannot be read, or that the settle script itself refuses, is copied to a
``.bad`` file (mode 0600, the entry's JSON) in the account's directory for an operator, and
marked done. One the ledger refuses for a reason of its own (``LedgerBroken``), or whose
settle raises anything else, stays; either way the other entries are still replayed. A
directory that cannot be listed is logged once: this process's own entries are still
replayed (and the reconciler, which replays first, still sweeps). Entry files of the old
layout (``*.json``, one per entry) found in the directory are moved into this process's
segment and replayed.

The honest limit: the journal lives on one host. If that host is lost for good while it holds
an answer the ledger has not taken, the answer is lost, and after the lease and its takeover
grace another run sends those numbers again.

``python -m polyv_sms.ledger.journal DIRECTORY...`` prints the open entries found under the
directories, one JSON object a line (an operator's look; it takes no lock and changes nothing;
a line whose text the output cannot take - a lone surrogate, a terminal that is not UTF-8 - has
its non-ASCII characters escaped).
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import logging
import os
import threading
import time
import weakref
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from polyv_sms.ledger.journal.inspect import DiskEntry, _read_directory, on_disk
from polyv_sms.ledger.journal.replayer import (
    DEFAULT_REPLAY_INTERVAL_S,
    JournalReplayer,
    _age,
    _Replays,
)
from polyv_sms.ledger.journal.segment import (
    _CRC,
    _CRC_AT,
    _DONE,
    _GONE,
    _HEADER,
    _IN_FLIGHT,
    _LEFT,
    _MAGIC,
    _META,
    _META_AT,
    _OPEN,
    _SAFE_NAME,
    _STATE,
    _VERSION,
    DEFAULT_SEGMENT_SLOTS,
    SLOT_SIZE,
    JournalEntry,
    _claim,
    _create_segment,
    _encode,
    _key,
    _Segment,
)
from polyv_sms.ledger.journal.takeover import _Takeover
from polyv_sms.ledger.records import Settlement

__all__ = [
    "DEFAULT_REPLAY_INTERVAL_S",
    "DEFAULT_SEGMENT_SLOTS",
    "SLOT_SIZE",
    "DiskEntry",
    "Journal",
    "JournalEntry",
    "JournalReplayer",
    "on_disk",
    "stranded",
]


log = logging.getLogger("polyv_sms.ledger.journal")


def _msync(segment: _Segment, offset: int, size: int) -> None:
    """Flush pages of a segment to disk (a function of its own so that tests can watch it)."""
    if segment.map is not None:
        segment.map.flush(offset, size)


#: Every journal of this process (a forked child makes them forget their parent's files).
_JOURNALS: weakref.WeakSet[Journal] = weakref.WeakSet()


class Journal(_Takeover, _Replays):
    """The answers of one account that the ledger has not taken yet, on local disk.

    Args:
        directory: the journal's root (``SMS_JOURNAL_DIR``); created (mode 0700).
        app_id: the account; its entries live in a directory of their own.
        segment_slots: slots per segment file (of ``SLOT_SIZE`` bytes).
    """

    def __init__(
        self,
        directory: str | Path,
        app_id: str,
        *,
        segment_slots: int = DEFAULT_SEGMENT_SLOTS,
    ) -> None:
        if segment_slots < 1:
            raise ValueError("segment_slots must be at least 1")
        name = app_id if _SAFE_NAME.fullmatch(app_id) else _key(app_id)
        self.directory = Path(directory) / name
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.segment_slots = segment_slots
        self._segments: list[_Segment] = []
        self._adopted: dict[str, _Segment] = {}
        self._reset()
        _JOURNALS.add(self)
        # A journal nobody holds any more lets go of its files (for another process to take
        # over what they hold), as a process that dies does.
        # (Not at exit: _at_exit first removes the files that hold nothing.)
        weakref.finalize(self, _close_segments, self._segments, self._adopted).atexit = False

    def _reset(self) -> None:
        #: Guards the segments, their slots and the index; its condition wakes a run waiting
        #: for an entry of its message that another thread is replaying.
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        #: One pass at a time looks for dead processes' segments.
        self._scanning = threading.Lock()
        #: Own segments (the lists are kept: the finalizer closes what they hold).
        self._segments.clear()
        #: The segment one-slot entries go to without the lock.
        self._primary: _Segment | None = None
        #: Dead processes' segments this process took over, by name.
        self._adopted.clear()
        #: Entries whose settle failed, and those of dead processes' segments, by message.
        self._left: dict[str, list[JournalEntry]] = {}
        self._seq = itertools.count(1)
        self._complained: set[str] = set()

    def __repr__(self) -> str:
        return f"Journal({str(self.directory)!r})"

    # ------------------------------------------------------------------ writing

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
    ) -> JournalEntry | None:
        """Write one settle to the journal before it is attempted (an entry is whole or
        absent); flushed to disk with ``sync``, or later with :meth:`make_durable`. No
        syscall, but for the process's first entry (it creates the segment file).

        Returns:
            The entry (to :meth:`done` once the ledger took it, :meth:`keep` if the settle
            failed), or ``None`` when it could not be written (a full disk, say): sending goes
            on, and the settle is attempted as it would be without a journal.
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
        try:
            handle = self._write(message_id, entry, _encode(entry))
        except (OSError, ValueError) as exc:
            log.error(
                "message %s: the answer could not be journaled (%s); settling without it",
                message_id,
                exc,
            )
            return None
        if sync:
            self.make_durable(handle)
        return handle

    def _write(self, key: str, entry: dict[str, Any], payload: bytes) -> JournalEntry:
        length = len(payload)
        slots = -(-(_HEADER + length) // SLOT_SIZE)
        segment, slot = self._primary, -1
        if slots == 1 and segment is not None and segment.free:
            # The happy path: no lock (a contended lock is a syscall and a GIL hand-off).
            try:
                slot = segment.free.pop()
            except IndexError:  # (emptied meanwhile)
                slot = -1
            if slot >= 0 and self._primary is not segment:
                # No longer the primary meanwhile (removed at exit, or from disk): the lock's way.
                segment.free.append(slot)
                slot = -1
        if segment is None or slot < 0:
            with self._lock:
                segment, slot = self._allocate(slots)
        seq = next(self._seq)
        handle = JournalEntry(
            self,
            segment,
            slot=slot,
            slots=slots,
            length=length,
            seq=seq,
            written=time.time(),
            key=key,
            entry=entry,
            state=_IN_FLIGHT,
        )
        try:
            mapped = segment.map
            if mapped is None:
                raise ValueError("the journal was closed")
            at = slot * SLOT_SIZE
            mapped[at + _HEADER : at + _HEADER + length] = payload
            meta = _META.pack(_VERSION, slots, length, seq, handle.written)
            crc = zlib.crc32(payload, zlib.crc32(meta))
            mapped[at + _META_AT : at + _CRC_AT + _CRC.size] = meta + _CRC.pack(crc)
            mapped[at : at + 4] = _MAGIC
            mapped[at + _STATE] = _OPEN  # last: before it, there is no entry
        except BaseException:
            with self._lock:
                self._free(handle)
            raise
        return handle

    def _allocate(self, slots: int) -> tuple[_Segment, int]:
        """Free contiguous slots (under the lock), in a new segment when none has room."""
        for segment in self._segments:
            if not segment.detached and segment.slots >= slots:
                at = _claim(segment, slots)
                if at >= 0:
                    return segment, at
        segment = _create_segment(self.directory, max(self.segment_slots, slots))
        self._segments.append(segment)
        if self._primary is None and segment.slots == self.segment_slots:
            self._primary = segment
        return segment, _claim(segment, slots)

    def make_durable(self, handle: JournalEntry | None) -> None:
        """Flush an entry's pages to disk (``msync``; called when the ledger is found
        unavailable: the entry may have to outlive a power cut). The directory was fsync'd
        when the segment was created."""
        if handle is None or handle.durable:
            return
        if handle._segment.map is None or handle.state == _GONE:
            return
        try:
            _msync(handle._segment, *handle.pages())
            handle.durable = True
        except (OSError, ValueError) as exc:
            log.error("journal entry %r could not be made durable (%s)", handle, exc)

    def keep(self, handle: JournalEntry | None) -> None:
        """The settle of an entry failed: flush it to disk and keep it for a replay (by the
        replayer thread, the reconciler, and this message's next run in this process)."""
        if handle is None:
            return
        journal = handle._journal
        journal.make_durable(handle)
        with journal._lock:
            if handle.state == _IN_FLIGHT:
                handle.state = _LEFT
                journal._left.setdefault(handle.key, []).append(handle)

    @staticmethod
    def done(handle: JournalEntry | None) -> None:
        """Forget an entry the ledger has taken."""
        if handle is None:
            return
        journal, segment = handle._journal, handle._segment
        if handle.state is _IN_FLIGHT and segment is journal._primary and handle.slots == 1:
            # The happy path: no lock (see _write).
            handle.state = _GONE
            mapped = segment.map
            if mapped is not None:
                # (Not contextlib.suppress: a context manager per entry costs more.)
                try:  # noqa: SIM105
                    mapped[handle.slot * SLOT_SIZE + _STATE] = _DONE
                except ValueError:  # (closed meanwhile)
                    pass
            assert segment.free is not None
            segment.free.append(handle.slot)
            return
        journal._finish(handle)

    def _finish(self, handle: JournalEntry) -> None:
        with self._lock:
            if handle.state == _GONE:
                return
            mapped = handle._segment.map
            if mapped is not None:
                mapped[handle.slot * SLOT_SIZE + _STATE] = _DONE
            self._free(handle)

    def _free(self, handle: JournalEntry) -> None:
        """Forget an entry in memory (under the lock); retire its segment once empty."""
        segment = handle._segment
        if handle.state == _LEFT:
            siblings = self._left.get(handle.key)
            if siblings is not None:
                with contextlib.suppress(ValueError):
                    siblings.remove(handle)
                if not siblings:
                    del self._left[handle.key]
        handle.state = _GONE
        if segment.free is not None:
            segment.free.extend(range(handle.slot + handle.slots - 1, handle.slot - 1, -1))
        else:
            segment.live -= 1
        if segment.empty() and segment is not self._primary:
            self._retire(segment)

    def _retire(self, segment: _Segment) -> None:
        """Remove an empty segment (under the lock): unlinked while still locked, so that no
        other process can take it over meanwhile."""
        if segment.map is None:
            return
        if not segment.detached:
            with contextlib.suppress(OSError):
                os.unlink(segment.path)
        segment.close()
        if segment in self._segments:
            self._segments.remove(segment)
        self._adopted.pop(segment.path.name, None)

    # ------------------------------------------------------------------ reading

    def segments(self) -> list[Path]:
        """This process's segment files (for inspection and tests)."""
        with self._lock:
            return [segment.path for segment in self._segments]

    def entries(self, message_id: str | None = None) -> list[JournalEntry]:
        """The entries left (not in flight: their settle failed, or their process died),
        oldest first; only those of ``message_id`` when given. Takes dead processes'
        segments of the directory over first."""
        self._adopt()
        with self._lock:
            if message_id is None:
                found = [handle for handles in self._left.values() for handle in handles]
            else:
                found = list(self._left.get(message_id, ()))
        return sorted(found, key=_age)

    # ------------------------------------------------------------------ life

    def close(self) -> None:
        """Let go of every segment (unmapped, unlocked): their entries stay on disk for
        another process to take over, as when this process dies. The journal stays usable
        (its next entry opens a new segment)."""
        with self._lock:
            for segment in [*self._segments, *self._adopted.values()]:
                segment.close()
            self._segments.clear()
            self._adopted.clear()
            self._left.clear()
            self._primary = None

    def _close_at_exit(self) -> None:
        """At a clean exit: remove the segments that hold nothing (the others stay, for
        another process to take over)."""
        with self._lock:
            self._primary = None  # (a record now takes the lock: see _write)
            for segment in list(self._segments):
                if segment.empty():
                    self._retire(segment)

    def _forget_after_fork(self) -> None:
        """In a forked child: drop the parent's mappings and descriptors (the parent keeps its
        lock: closing a copy of a descriptor does not release it) and start afresh."""
        for segment in [*self._segments, *self._adopted.values()]:
            segment.close()
        self._reset()


def _close_segments(segments: list[_Segment], adopted: dict[str, _Segment]) -> None:
    for segment in [*segments, *adopted.values()]:
        segment.close()


def _after_fork_in_child() -> None:
    for journal in list(_JOURNALS):
        journal._forget_after_fork()


def _at_exit() -> None:
    for journal in list(_JOURNALS):
        with contextlib.suppress(Exception):
            journal._close_at_exit()


os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(_at_exit)


def stranded(root: str | Path, known: Sequence[Journal]) -> dict[str, int]:
    """Journal directories under ``root`` that no account of this worker replays, with how
    many answers each holds in files no live process holds (an account removed from the
    accounts file, or renamed to another appId, while the ledger had not taken all its
    answers)."""
    mine = {journal.directory.name for journal in known}
    found: dict[str, int] = {}
    try:
        directories = [entry for entry in os.scandir(root) if entry.is_dir()]
    except OSError:
        return found
    for directory in directories:
        if directory.name in mine:
            continue
        count = len(_read_directory(Path(directory.path), unheld_only=True))
        if count:
            found[directory.name] = count
    return found
