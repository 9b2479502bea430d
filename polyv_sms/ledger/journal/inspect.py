"""Looking into journal directories without taking anything over: :func:`on_disk` and
``python -m polyv_sms.ledger.journal DIRECTORY...`` (:func:`main`). Part of
:mod:`polyv_sms.ledger.journal`, whose docstring gives the design."""

from __future__ import annotations

import fcntl
import json
import mmap
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from polyv_sms.ledger.journal.segment import SEGMENT_SUFFIX, SLOT_SIZE, _scan


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
