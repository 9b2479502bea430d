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
import errno
import fcntl
import hashlib
import itertools
import json
import logging
import mmap
import os
import re
import secrets
import struct
import sys
import threading
import time
import weakref
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from polyv_sms import metrics
from polyv_sms.errors import LedgerBroken, LedgerUnavailable
from polyv_sms.ledger.records import Settlement
from polyv_sms.ledger.store import Ledger

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

#: How often a worker's replayer looks for answers the ledger has not taken.
DEFAULT_REPLAY_INTERVAL_S = 1.0
#: An entry takes whole slots, each starting on a page of its own (x86/arm64 4 KiB pages):
#: flushing one entry flushes only its pages.
SLOT_SIZE = 4096
#: Slots per segment: 1 MiB. A one-number entry takes one slot; 200 numbers take about 8.
DEFAULT_SEGMENT_SLOTS = 256
SEGMENT_SUFFIX = ".seg"
_VERSION = 1
#: 0xFF never occurs in UTF-8, so no byte of an entry's JSON can look like a header.
_MAGIC = b"\xffPSJ"
#: The state byte (offset 4). JSON escapes control characters: 0x01/0x02 never occur in it.
_FREE, _OPEN, _DONE = 0, 1, 2
_STATE = 4
#: version, slots, length, sequence, time written (offset 5), then the CRC (offset 33).
_META = struct.Struct("<B3xIIQd")
_CRC = struct.Struct("<I")
_META_AT = 5
_CRC_AT = _META_AT + _META.size
_HEADER = 64
#: An abandoned temporary segment (its creator died before renaming it) older than this goes.
_STALE_TEMPORARY_S = 60.0
#: How a settle the script itself refused reads (its own error, or a Lua runtime error).
_SCRIPT_ERRORS = ("settle.lua", "user_script", "Error running script")
_SAFE_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
#: In-memory states of an entry.
_IN_FLIGHT, _LEFT, _GONE = "in flight", "left", "gone"


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


def _msync(segment: _Segment, offset: int, size: int) -> None:
    """Flush pages of a segment to disk (a function of its own so that tests can watch it)."""
    if segment.map is not None:
        segment.map.flush(offset, size)


class _Segment:
    """One segment file, mapped and locked by this process."""

    __slots__ = ("detached", "fd", "free", "identity", "live", "map", "own", "path", "slots")

    def __init__(
        self, path: Path, fd: int, mapped: mmap.mmap, slots: int, *, own: bool, identity: Any
    ) -> None:
        self.path = path
        self.fd = fd
        self.map: mmap.mmap | None = mapped
        self.slots = slots
        self.own = own
        self.identity = identity
        #: Own segments: the free slots, a stack (lowest on top, so that the same few pages
        #: are reused). ``list.pop`` and ``list.append`` are atomic under the GIL: a one-slot
        #: entry of the primary segment takes and gives back its slot without a lock.
        self.free = list(range(slots - 1, -1, -1)) if own else None
        #: Taken-over segments: entries not done.
        self.live = 0
        #: Own, but its file was removed from the directory: no new entries go in.
        self.detached = False

    def empty(self) -> bool:
        if self.free is not None:
            return len(self.free) >= self.slots
        return self.live <= 0

    def in_use(self) -> int:
        """Slots (own) or entries (taken over) in use."""
        return self.slots - len(self.free) if self.free is not None else self.live

    def close(self) -> None:
        """Unmap and close (the lock goes with the last descriptor)."""
        if self.map is not None:
            with contextlib.suppress(BufferError, ValueError):
                self.map.close()
            self.map = None
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1


class JournalEntry:
    """One answer in the journal: what :meth:`Journal.record` returns, and what
    :meth:`Journal.entries` lists. ``entry`` is the stored JSON object."""

    __slots__ = (
        "_journal",
        "_segment",
        "busy",
        "durable",
        "entry",
        "key",
        "length",
        "seq",
        "slot",
        "slots",
        "state",
        "written",
    )

    def __init__(
        self,
        journal: Journal,
        segment: _Segment,
        *,
        slot: int,
        slots: int,
        length: int,
        seq: int,
        written: float,
        key: str,
        entry: dict[str, Any],
        state: str,
    ) -> None:
        self._journal = journal
        self._segment = segment
        self.slot = slot
        self.slots = slots
        self.length = length
        self.seq = seq
        self.written = written
        self.key = key
        self.entry = entry
        self.state = state
        self.busy = False
        self.durable = False

    @property
    def message_id(self) -> str:
        return self.key

    @property
    def token(self) -> str:
        return str(self.entry.get("token", ""))

    @property
    def segment(self) -> Path:
        """The segment file the entry is in."""
        return self._segment.path

    def pages(self) -> tuple[int, int]:
        """``(offset, size)`` of the entry's pages in its segment file."""
        start = self.slot * SLOT_SIZE
        start -= start % mmap.PAGESIZE
        return start, (self.slot + self.slots) * SLOT_SIZE - start

    def payload(self) -> bytes:
        """The entry's JSON as stored."""
        mapped = self._segment.map
        if mapped is not None:
            at = self.slot * SLOT_SIZE + _HEADER
            return bytes(mapped[at : at + self.length])
        return _encode(self.entry)

    def __repr__(self) -> str:
        return f"<journal entry of {self.key!r} in {self._segment.path.name} slot {self.slot}>"


def _claim(segment: _Segment, slots: int) -> int:
    """Take ``slots`` contiguous free slots of an own segment (under the journal's lock, but
    one-slot entries of the primary segment are taken without it meanwhile: a slot is taken
    by whoever removes it from the free list); the first one, or -1."""
    free = segment.free
    assert free is not None
    if slots == 1:
        try:
            return free.pop()
        except IndexError:
            return -1
    for _ in range(3):
        available = set(free)
        start = next(
            (s for s in sorted(available) if all(s + i in available for i in range(slots))), -1
        )
        if start < 0:
            return -1
        taken = []
        for index in range(start, start + slots):
            try:
                free.remove(index)
            except ValueError:  # taken meanwhile
                break
            taken.append(index)
        if len(taken) == slots:
            return start
        free.extend(reversed(taken))
    return -1


def _encode(entry: Mapping[str, Any]) -> bytes:
    return json.dumps(entry, ensure_ascii=False, separators=(",", ":")).encode(
        "utf-8", "surrogatepass"
    )


def _age(handle: JournalEntry) -> tuple[float, int]:
    return handle.written, handle.seq


@dataclass(frozen=True)
class _Found:
    """An open entry read from a segment: ``payload`` checked, or ``torn``."""

    slot: int
    slots: int
    seq: int
    written: float
    payload: bytes
    torn: str = ""


def _scan(buffer: Any, count: int) -> Iterator[_Found]:
    """The open entries of a segment's content (``count`` slots), in slot order."""
    slot = 0
    while slot < count:
        at = slot * SLOT_SIZE
        if buffer[at : at + 4] != _MAGIC or buffer[at + _STATE] != _OPEN:
            slot += 1
            continue
        meta = bytes(buffer[at + _META_AT : at + _CRC_AT])
        version, slots, length, seq, written = _META.unpack(meta)
        (crc,) = _CRC.unpack_from(buffer, at + _CRC_AT)
        if not 1 <= slots <= count - slot or length > slots * SLOT_SIZE - _HEADER:
            end = min(at + SLOT_SIZE, at + _HEADER + length)
            yield _Found(slot, 1, seq, written, bytes(buffer[at + _HEADER : end]), "bad bounds")
            slot += 1
            continue
        payload = bytes(buffer[at + _HEADER : at + _HEADER + length])
        if zlib.crc32(payload, zlib.crc32(meta)) != crc:
            yield _Found(slot, 1, seq, written, payload, "bad CRC (torn)")
            slot += 1
            continue
        if version != _VERSION:
            yield _Found(slot, slots, seq, written, payload, f"unknown version {version}")
        else:
            yield _Found(slot, slots, seq, written, payload)
        slot += slots


def _write_bad(directory: Path, name: str, data: bytes) -> Path:
    """A file ``name`` (``.bad``, mode 0600) holding ``data``, fsync'd with its directory."""
    stem = name.removesuffix(".bad")
    for index in itertools.count():
        path = directory / (name if index == 0 else f"{stem}-{index}.bad")
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            continue
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        _fsync_directory(directory)
        return path
    raise AssertionError("unreachable")  # pragma: no cover


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _allocate_file(fd: int, size: int) -> None:
    """Give the file its blocks now (writing into a hole of a full disk through a mapping
    would be a SIGBUS, not an error)."""
    try:
        os.posix_fallocate(fd, 0, size)
        return
    except AttributeError:  # (not on macOS)
        pass
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
    zeros = bytes(64 * 1024)
    for offset in range(0, size, len(zeros)):
        os.pwrite(fd, zeros[: size - offset], offset)


#: Every journal of this process (a forked child makes them forget their parent's files).
_JOURNALS: weakref.WeakSet[Journal] = weakref.WeakSet()


class Journal:
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
        segment = self._create_segment(max(self.segment_slots, slots))
        self._segments.append(segment)
        if self._primary is None and segment.slots == self.segment_slots:
            self._primary = segment
        return segment, _claim(segment, slots)

    def _create_segment(self, slots: int) -> _Segment:
        """A new segment file: allocated and locked under a temporary name, then renamed into
        place (no other process ever sees it unlocked) and the directory fsync'd."""
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        name = f"{os.getpid()}-{secrets.token_hex(6)}{SEGMENT_SUFFIX}"
        path = self.directory / name
        temporary = self.directory / f".{name}.tmp"
        size = slots * SLOT_SIZE
        fd = os.open(temporary, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            _allocate_file(fd, size)
            os.fsync(fd)
            mapped = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            try:
                os.rename(temporary, path)
                _fsync_directory(self.directory)
            except BaseException:
                mapped.close()
                raise
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                temporary.unlink()
            raise
        status = os.fstat(fd)
        log.info("journal: new segment %s (%d slots)", path, slots)
        return _Segment(path, fd, mapped, slots, own=True, identity=(status.st_dev, status.st_ino))

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

    # ------------------------------------------------------------------ other processes

    def _adopt(self) -> None:
        """Take over the segments of dead processes, move entries of the old layout in, and
        check that this process's own segments are still on disk."""
        if not self._scanning.acquire(blocking=False):
            return  # another thread of this process is at it
        try:
            try:
                names = os.listdir(self.directory)
            except OSError as exc:
                # (Unreadable - permissions, an I/O error: this process's own entries are
                # still replayed, and the reconciler, which replays first, still sweeps.)
                if not isinstance(exc, FileNotFoundError):
                    where = self.directory
                    self._complain(where, "journal directory %s cannot be read (%s)", where, exc)
                names = []
            with self._lock:
                mine = {s.path.name for s in self._segments} | set(self._adopted)
            for name in sorted(names):
                path = self.directory / name
                if name.endswith(SEGMENT_SUFFIX) and name not in mine:
                    self._adopt_segment(path)
                elif name.endswith(".json") and not name.startswith("."):
                    self._import_old(path)
                elif name.startswith(".") and name.endswith(SEGMENT_SUFFIX + ".tmp"):
                    self._remove_stale_temporary(path)
            self._check_own()
        finally:
            self._scanning.release()

    def _complain(self, path: Path, message: str, *args: object) -> None:
        if str(path) not in self._complained:
            self._complained.add(str(path))
            log.error(message, *args)

    def _adopt_segment(self, path: Path) -> None:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            return
        except OSError as exc:
            self._complain(path, "journal segment %s cannot be opened (%s)", path, exc)
            return
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)  # its process is alive and replays its own
                return
            status = os.fstat(fd)
            try:
                current = os.stat(path)
            except FileNotFoundError:
                current = None
            if current is None or (current.st_dev, current.st_ino) != (
                status.st_dev,
                status.st_ino,
            ):
                os.close(fd)  # taken over and removed meanwhile
                return
            size = status.st_size
            # A file cut short of a whole slot (a copy or a restore that stopped early) keeps
            # its whole slots: an entry the cut reaches fails its bounds and is set aside.
            if size < SLOT_SIZE:
                bad = path.with_suffix(".bad")
                os.rename(path, bad)
                os.close(fd)
                log.error(
                    "journal file %s is not a segment (%d bytes); set aside as %s", path, size, bad
                )
                return
            mapped = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.close(fd)
            self._complain(path, "journal segment %s cannot be taken over (%s)", path, exc)
            return
        segment = _Segment(
            path, fd, mapped, size // SLOT_SIZE, own=False, identity=(status.st_dev, status.st_ino)
        )
        handles: list[JournalEntry] = []
        torn: list[_Found] = []
        for scanned in _scan(mapped, segment.slots):
            found, entry = scanned, None
            if not found.torn:
                try:
                    entry = json.loads(found.payload.decode("utf-8", "surrogatepass"))
                    key = str(entry["message_id"])
                except (ValueError, KeyError, TypeError) as exc:
                    found = _Found(found.slot, found.slots, 0, 0.0, found.payload, f"{exc}")
                    entry = None
            if entry is None:
                torn.append(found)
                continue
            handles.append(
                JournalEntry(
                    self,
                    segment,
                    slot=found.slot,
                    slots=found.slots,
                    length=len(found.payload),
                    seq=found.seq,
                    written=found.written,
                    key=key,
                    entry=entry,
                    state=_LEFT,
                )
            )
        for found in torn:
            name = f"{path.stem}-{found.slot}.bad"
            try:
                bad = _write_bad(self.directory, name, found.payload)
            except OSError as exc:
                log.error(
                    "journal entry in %s slot %d cannot be read (%s) nor set aside (%s)",
                    path,
                    found.slot,
                    found.torn,
                    exc,
                )
                segment.live += 1  # stays: the file is kept
                continue
            mapped[found.slot * SLOT_SIZE + _STATE] = _DONE
            log.error(
                "journal entry in %s slot %d cannot be read (%s); set aside as %s",
                path,
                found.slot,
                found.torn,
                bad,
            )
        with self._lock:
            segment.live += len(handles)
            for handle in handles:
                self._left.setdefault(handle.key, []).append(handle)
            if segment.empty():
                self._retire(segment)
                return
            self._adopted[path.name] = segment
        if handles:
            log.warning(
                "journal: took over %d answers a dead process left in %s", len(handles), path
            )

    def _import_old(self, path: Path) -> None:
        """An entry file of the one-file-per-entry layout: into this process's segment."""
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return
        except OSError as exc:
            self._complain(path, "journal entry %s cannot be read (%s)", path, exc)
            return
        try:
            entry = json.loads(data.decode("utf-8", "surrogatepass"))
            key = str(entry["message_id"])
        except (ValueError, KeyError, TypeError) as exc:
            log.error("journal entry %s cannot be read (%s); set aside as .bad", path, exc)
            with contextlib.suppress(OSError):
                path.rename(path.with_suffix(".bad"))
            return
        try:
            handle = self._write(key, entry, data)
        except (OSError, ValueError) as exc:
            self._complain(path, "journal entry %s cannot be moved in (%s)", path, exc)
            return
        self.keep(handle)
        with contextlib.suppress(OSError):
            path.unlink()
        log.warning("journal: entry %s moved into %s", path, handle.segment)

    def _remove_stale_temporary(self, path: Path) -> None:
        """A segment whose creator died before renaming it into place (it holds no entry)."""
        try:
            if time.time() - path.stat().st_mtime < _STALE_TEMPORARY_S:
                return
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            path.unlink()
        except OSError:
            pass
        finally:
            os.close(fd)

    def _check_own(self) -> None:
        """An own segment whose file was removed (an operator clearing the directory) no
        longer keeps anything across a crash: no new entry goes in, and it says so."""
        with self._lock:
            own = [s for s in self._segments if not s.detached]
        for segment in own:
            try:
                status = os.stat(segment.path)
                same = (status.st_dev, status.st_ino) == segment.identity
            except FileNotFoundError:
                same = False
            except OSError:
                continue
            if same:
                continue
            log.error(
                "journal segment %s was removed from disk while in use; its entries (%d "
                "slots) now live only in memory; new entries go to a new segment",
                segment.path,
                segment.in_use(),
            )
            with self._lock:
                segment.detached = True
                if segment is self._primary:
                    self._primary = None
                if segment.empty():
                    self._retire(segment)

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


# ---------------------------------------------------------------------- looking in


@dataclass(frozen=True)
class DiskEntry:
    """An open entry found on disk: its file, its slot (``None``: a file of the old layout),
    and the stored JSON object (``None`` with ``problem`` when it cannot be read)."""

    path: Path
    slot: int | None
    entry: dict[str, Any] | None
    problem: str = ""


def _read_segment(path: Path, *, unheld_only: bool) -> list[DiskEntry] | None:
    """The open entries of one segment file; ``None`` when ``unheld_only`` and a live
    process holds it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return []
    try:
        if unheld_only:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return None
        size = os.fstat(fd).st_size
        if size < SLOT_SIZE:
            return [DiskEntry(path, None, None, f"not a segment ({size} bytes)")]
        with mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ) as mapped:
            found = list(_scan(mapped, size // SLOT_SIZE))
    except OSError as exc:
        return [DiskEntry(path, None, None, str(exc))]
    finally:
        os.close(fd)
    entries = []
    for item in found:
        entry, problem = None, item.torn
        if not problem:
            try:
                entry = dict(json.loads(item.payload.decode("utf-8", "surrogatepass")))
            except (ValueError, TypeError) as exc:
                problem = str(exc)
        entries.append(DiskEntry(path, item.slot, entry, problem))
    return entries


def _read_directory(directory: Path, *, unheld_only: bool) -> list[DiskEntry]:
    found: list[DiskEntry] = []
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return found
    for name in names:
        path = directory / name
        if name.endswith(SEGMENT_SUFFIX) and not name.startswith("."):
            found.extend(_read_segment(path, unheld_only=unheld_only) or ())
        elif name.endswith(".json") and not name.startswith("."):
            try:
                found.append(DiskEntry(path, None, dict(json.loads(path.read_bytes()))))
            except (OSError, ValueError, TypeError) as exc:
                found.append(DiskEntry(path, None, None, str(exc)))
    return found


def on_disk(root: str | Path) -> list[DiskEntry]:
    """Every open entry under ``root`` (a journal root, one account's directory or one
    segment file), whether its process is alive or not (for an operator's look and for tests;
    it takes no lock and changes nothing, so an entry being written may be missing)."""
    root = Path(root)
    if root.is_file():
        return _read_segment(root, unheld_only=False) or []
    directories = [root, *sorted(p for p in root.rglob("*") if p.is_dir())] if root.is_dir() else []
    return [entry for d in directories for entry in _read_directory(d, unheld_only=False)]


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
        journal: Journal,
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


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m polyv_sms.ledger.journal DIRECTORY...``: the open entries, as JSON lines."""
    paths = list(sys.argv[1:] if argv is None else argv)
    if not paths:
        print("usage: python -m polyv_sms.ledger.journal DIRECTORY...", file=sys.stderr)
        return 2
    for path in paths:
        for found in on_disk(path):
            line: dict[str, Any] = {"file": str(found.path), "slot": found.slot}
            if found.problem:
                line["problem"] = found.problem
            line["entry"] = found.entry
            try:
                print(json.dumps(line, ensure_ascii=False))
            except UnicodeEncodeError:
                # Polyv's text with a lone surrogate, or an output that is not UTF-8: the
                # same JSON with its non-ASCII characters escaped (encoded whole: nothing of
                # the first attempt was written).
                print(json.dumps(line))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
