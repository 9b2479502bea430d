"""Taking over what other processes left in a journal directory (part of
:mod:`polyv_sms.ledger.journal`, whose docstring gives the design)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import mmap
import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from polyv_sms.ledger.journal.segment import (
    _DONE,
    _LEFT,
    _STATE,
    SEGMENT_SUFFIX,
    SLOT_SIZE,
    JournalEntry,
    _Found,
    _scan,
    _Segment,
    _write_bad,
)

log = logging.getLogger("polyv_sms.ledger.journal")

#: An abandoned temporary segment (its creator died before renaming it) older than this goes.
_STALE_TEMPORARY_S = 60.0


class _Takeover:
    """The half of :class:`~polyv_sms.ledger.journal.Journal` that looks at the other
    processes' files of its directory: takes over the segments of dead processes (setting
    aside as ``.bad`` what cannot be read), moves entries of the old one-file-per-entry layout
    into this process's segment, removes abandoned temporary segments, and checks that this
    process's own segments are still on disk. A mixin: its state is the journal's."""

    if TYPE_CHECKING:
        directory: Path
        _lock: threading.Lock
        _scanning: threading.Lock
        _segments: list[_Segment]
        _adopted: dict[str, _Segment]
        _left: dict[str, list[JournalEntry]]
        _primary: _Segment | None
        _complained: set[str]

        def make_durable(self, handle: JournalEntry | None) -> None: ...

        def keep(self, handle: JournalEntry | None) -> None: ...

        def _finish(self, handle: JournalEntry) -> None: ...

        def _retire(self, segment: _Segment) -> None: ...

        def _write(self, key: str, entry: dict[str, Any], payload: bytes) -> JournalEntry: ...

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
