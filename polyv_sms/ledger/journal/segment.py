"""The journal's on-disk format: segment files of fixed-size slots, an entry's header and CRC,
scanning a segment for its open entries, allocating and fsyncing files, ``.bad`` files.

(Part of :mod:`polyv_sms.ledger.journal`, whose docstring gives the design.)
"""

from __future__ import annotations

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
import threading
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger("polyv_sms.ledger.journal")

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
_SAFE_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
#: In-memory states of an entry.
_IN_FLIGHT, _LEFT, _GONE = "in flight", "left", "gone"


def _key(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8", "surrogatepass"), usedforsecurity=False).hexdigest()[
        :20
    ]


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


class _Owner(Protocol):
    """What an entry knows of its :class:`~polyv_sms.ledger.journal.Journal` (a protocol, not
    the class: the package imports this module)."""

    _lock: threading.Lock
    _left: dict[str, list[JournalEntry]]
    _primary: _Segment | None

    def make_durable(self, handle: JournalEntry | None) -> None: ...

    def _finish(self, handle: JournalEntry) -> None: ...


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
        journal: _Owner,
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


def _create_segment(directory: Path, slots: int) -> _Segment:
    """A new segment file: allocated and locked under a temporary name, then renamed into
    place (no other process ever sees it unlocked) and the directory fsync'd."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    name = f"{os.getpid()}-{secrets.token_hex(6)}{SEGMENT_SUFFIX}"
    path = directory / name
    temporary = directory / f".{name}.tmp"
    size = slots * SLOT_SIZE
    fd = os.open(temporary, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        _allocate_file(fd, size)
        os.fsync(fd)
        mapped = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        try:
            os.rename(temporary, path)
            _fsync_directory(directory)
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
