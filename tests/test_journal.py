"""The answer journal's segment files (``polyv_sms/ledger/journal/``): what a process leaves on
disk, who takes it over, and what is set aside. A real redis-server for the ledger; other
processes are real processes (a subprocess, a fork) where the claim is about processes; a
second ``Journal`` on the same directory stands for another worker process elsewhere (each
opens its own files, so the kernel's locks tell them apart as they tell processes apart).

The same with real worker processes: ``tests/reliability/test_journal.py``.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import redis
from helpers import CannedServer, record_accepted
from test_dispatch import make

from polyv_sms.ledger import Ledger, Settlement
from polyv_sms.ledger.journal import (
    SLOT_SIZE,
    Journal,
    JournalEntry,
    JournalReplayer,
    on_disk,
    stranded,
)

N1, N2, N3 = "13900003001", "13900003002", "13900003003"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def ledger(client, account, clock) -> Ledger:
    return make(client, account, "http://127.0.0.1:9", clock).ledger


def answer(
    journal: Journal, ledger: Ledger, message_id: str, number: str, serial: str
) -> JournalEntry:
    """Reserve ``number`` for a run, and journal Polyv's 12 for it (before the settle)."""
    reserved, entry = record_accepted(
        journal, ledger, message_id, number, serial, token=f"run-{message_id}", now=time.time()
    )
    assert reserved.states[0].state == "send"
    assert entry is not None
    return entry


def _meta(numbers: list[str]) -> dict[str, Any]:
    return {
        "task_id": "t",
        "phone_numbers": numbers,
        "template_param_names": ["code"],
        "template_param_values": ["1"],
        "created_at": 0,
    }


def state(ledger: Ledger, message_id: str, number: str) -> str:
    return ledger.peek(message_id, [number])[number].state


def files(directory: Path) -> list[str]:
    return sorted(p.suffix for p in directory.iterdir())


# --------------------------------------------------------------------------- the happy path


def test_a_process_that_only_replays_creates_nothing(tmp_path: Path, ledger: Ledger) -> None:
    journal = Journal(tmp_path, "appOnlyReplays")
    assert journal.replay(ledger) == 0
    assert journal.replay(ledger, "m") == 0
    assert journal.entries() == []
    assert list(journal.directory.iterdir()) == []


def test_record_and_done_leave_one_reused_slot_and_no_entry(tmp_path: Path, ledger) -> None:
    journal = Journal(tmp_path, "appHappy")
    first = answer(journal, ledger, "h1", N1, "s-h1^0")
    (segment,) = journal.segments()
    assert oct(segment.stat().st_mode & 0o777) == "0o600"
    assert oct(journal.directory.stat().st_mode & 0o777) == "0o700"
    assert segment.stat().st_size == journal.segment_slots * SLOT_SIZE
    # On disk (the page cache) as soon as recorded, though nobody flushed it.
    assert [d.entry["message_id"] for d in on_disk(tmp_path)] == ["h1"]
    assert journal.entries() == []  # in flight, not left
    Journal.done(first)
    assert on_disk(tmp_path) == []
    second = answer(journal, ledger, "h2", N2, "s-h2^0")
    assert (second.segment, second.slot) == (first.segment, first.slot)  # the same page again
    Journal.done(second)
    assert journal.segments() == [segment]  # the process keeps its file


# --------------------------------------------------------------------------- segments


def test_a_full_segment_gets_a_sibling_removed_once_empty(tmp_path: Path, ledger) -> None:
    journal = Journal(tmp_path, "appFull", segment_slots=4)
    held = [answer(journal, ledger, f"f{i}", f"1390000400{i}", f"s-f{i}^0") for i in range(4)]
    (first,) = journal.segments()
    extra = answer(journal, ledger, "f4", "13900004004", "s-f4^0")
    assert extra.segment != first
    assert sorted(journal.segments()) == sorted([first, extra.segment])
    assert files(journal.directory) == [".seg", ".seg"]
    assert len(on_disk(tmp_path)) == 5
    Journal.done(extra)
    assert not extra.segment.exists()
    assert journal.segments() == [first]
    for entry in held:
        Journal.done(entry)
    assert journal.segments() == [first]
    assert on_disk(tmp_path) == []


def test_an_entry_larger_than_a_segment_gets_a_segment_of_its_size(
    tmp_path: Path, ledger: Ledger
) -> None:
    journal = Journal(tmp_path, "appLarge", segment_slots=2)
    numbers = [f"1390001{i:04d}" for i in range(200)]
    reserved = ledger.reserve("big", numbers, token="run-big")
    days = {s.number: s.day for s in reserved.states}
    items = [Settlement(n, "accepted", 12, f"s-big-{n}^0", attempt=1) for n in numbers]
    entry = journal.record("big", items, days=days, token="run-big", retry_at=0, now=time.time())
    assert entry is not None
    assert entry.slots > 2
    assert entry.segment.stat().st_size == entry.slots * SLOT_SIZE
    journal.keep(entry)  # its settle failed
    assert journal.replay(ledger, "big") == 1
    assert not entry.segment.exists()
    assert {state(ledger, "big", n) for n in numbers} == {"accepted"}


def test_a_run_waits_for_its_answer_being_replayed_by_another_thread(
    tmp_path: Path, ledger: Ledger
) -> None:
    """The journal thread is settling the message's answer when a run of the message looks:
    the run waits for that settle (it must not reserve before), and nothing is settled twice."""
    journal = Journal(tmp_path, "appBusy")
    journal.keep(answer(journal, ledger, "busy", N1, "s-busy^0"))
    entered, release = threading.Event(), threading.Event()
    calls: list[str] = []

    class SlowLedger:
        def settle(self, message_id: str, *args: Any, **kwargs: Any) -> Any:
            calls.append(message_id)
            entered.set()
            release.wait(10)
            return ledger.settle(message_id, *args, **kwargs)

    thread = threading.Thread(target=journal.replay, args=(SlowLedger(),))
    thread.start()
    assert entered.wait(10)
    looked: list[float] = []
    run = threading.Thread(target=lambda: looked.append(journal.replay(ledger, "busy")))
    run.start()
    run.join(0.3)
    assert run.is_alive()  # waiting for the journal thread's settle
    release.set()
    run.join(10)
    thread.join(10)
    assert looked == [0]
    assert calls == ["busy"]
    assert state(ledger, "busy", N1) == "accepted"


# --------------------------------------------------------------------------- dead processes


def test_a_dead_processs_entries_are_taken_over_and_its_file_removed(
    tmp_path: Path, ledger: Ledger
) -> None:
    dead, alive = Journal(tmp_path, "appDead"), Journal(tmp_path, "appDead")
    answer(dead, ledger, "d1", N1, "s-d1^0")
    settled = answer(dead, ledger, "d2", N2, "s-d2^0")
    Journal.done(settled)  # this one reached the ledger before the process died
    (segment,) = dead.segments()
    assert alive.entries() == []  # alive: its entries are its own
    dead.close()  # dies
    assert [e.message_id for e in alive.entries()] == ["d1"]
    assert alive.replay(ledger) == 1
    assert state(ledger, "d1", N1) == "accepted"
    assert state(ledger, "d2", N2) == "reserved"  # never replayed: it was done
    assert not segment.exists()
    assert alive.segments() == []  # taking over creates nothing of its own


def test_a_run_finds_the_answers_of_a_dead_process_taken_over_while_the_ledger_was_down(
    tmp_path: Path, ledger: Ledger, client, account, clock
) -> None:
    """The replayer's pass takes the dead process's file over without the ledger; the run of
    the message then finds the answer by message id and settles it before it reserves."""
    from helpers import free_port
    from test_dispatch import request

    from polyv_sms.polyv.simulator import PolyvSimulator

    dead, alive = Journal(tmp_path, account[0]), Journal(tmp_path, account[0])
    record_accepted(
        dead, ledger, "t1", N1, "s-t1^0", token="run-t1", now=clock.now, meta=_meta([N1])
    )
    dead.close()
    unreachable = redis.Redis(port=free_port(), socket_connect_timeout=0.2)
    down = make(unreachable, account, "http://127.0.0.1:9", clock).ledger
    down.outage_s = 0.1
    assert JournalReplayer(alive, down).replay_once() == 0  # taken over, not settled
    unreachable.close()
    clock.now += ledger.lease_s + ledger.takeover_grace_s + 60
    with PolyvSimulator(*account, clock=clock) as sim:
        d = make(client, account, sim.url, clock, journal=alive)
        result = d.run(request([N1], "t1"), message_id="t1", task_id="t").result
        assert sim.received(N1) == 0
    assert result is not None
    assert (result["results"][0]["outcome"], result["results"][0]["serial_no"]) == (
        "accepted",
        "s-t1^0",
    )
    assert alive.entries() == []
    assert list(alive.directory.iterdir()) == []


def test_a_torn_entry_is_set_aside_not_replayed(
    tmp_path: Path, ledger: Ledger, caplog: pytest.LogCaptureFixture
) -> None:
    dead, alive = Journal(tmp_path, "appTorn"), Journal(tmp_path, "appTorn")
    torn = answer(dead, ledger, "torn", N1, "s-torn^0")
    answer(dead, ledger, "whole", N2, "s-whole^0")
    dead.close()
    # A byte of the first entry's JSON did not reach the disk (a power cut mid-write).
    with open(torn.segment, "r+b") as handle:
        handle.seek(torn.slot * SLOT_SIZE + 64 + 5)
        byte = handle.read(1)
        handle.seek(-1, os.SEEK_CUR)
        handle.write(bytes([byte[0] ^ 0x20]))
    with caplog.at_level(logging.ERROR, "polyv_sms.ledger.journal"):
        assert alive.replay(ledger) == 1
    assert state(ledger, "torn", N1) == "reserved"  # not replayed
    assert state(ledger, "whole", N2) == "accepted"
    (bad,) = alive.directory.glob("*.bad")
    assert files(alive.directory) == [".bad"]  # the dead file removed
    assert oct(bad.stat().st_mode & 0o777) == "0o600"
    assert b"torn" in bad.read_bytes()  # what was there, for an operator
    assert "bad CRC" in caplog.text
    assert str(bad) in caplog.text


def test_an_entry_whose_process_died_before_its_state_byte_does_not_exist(
    tmp_path: Path, ledger: Ledger
) -> None:
    dead, alive = Journal(tmp_path, "appHalf"), Journal(tmp_path, "appHalf")
    half = answer(dead, ledger, "half", N1, "s-half^0")
    dead.close()
    with open(half.segment, "r+b") as handle:  # killed before its last write
        handle.seek(half.slot * SLOT_SIZE + 4)
        handle.write(b"\x00")
    assert alive.entries() == []
    assert alive.replay(ledger) == 0
    assert list(alive.directory.iterdir()) == []  # nothing set aside: there was no entry
    assert state(ledger, "half", N1) == "reserved"


_HOLDER = textwrap.dedent(
    """
    import sys, time
    from polyv_sms.ledger import Settlement
    from polyv_sms.ledger.journal import Journal

    journal = Journal(sys.argv[1], sys.argv[2])
    in_flight = journal.record(
        "live-1", [Settlement(sys.argv[3], "accepted", 12, "s-live^0", attempt=1)],
        days={}, token="live", retry_at=0, now=time.time(),
    )
    left = journal.record(
        "live-2", [Settlement(sys.argv[3], "accepted", 12, "s-live2^0", attempt=1)],
        days={}, token="live", retry_at=0, now=time.time(),
    )
    journal.keep(left)  # its settle failed: this process replays it
    print("ready", flush=True)
    time.sleep(600)
    """
)


def test_two_live_processes_never_replay_each_others_entries(
    tmp_path: Path, ledger: Ledger
) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(tmp_path), "appLive", N1],
        stdout=subprocess.PIPE,
        cwd=ROOT,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == b"ready"
        here = Journal(tmp_path, "appLive")
        assert len(on_disk(tmp_path)) == 2
        assert here.entries() == []
        assert here.replay(ledger) == 0
        assert here.replay(ledger, "live-1") == 0
        assert stranded(tmp_path, []) == {}  # held by a live process: not stranded
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)
        assert stranded(tmp_path, []) == {"appLive": 2}  # dead: nobody of that account
        assert sorted(e.message_id for e in here.entries()) == ["live-1", "live-2"]
    finally:
        holder.kill()
        holder.wait(10)
        if holder.stdout is not None:
            holder.stdout.close()


_EXITS = textwrap.dedent(
    """
    import sys, time
    from polyv_sms.ledger import Settlement
    from polyv_sms.ledger.journal import Journal

    journal = Journal(sys.argv[1], sys.argv[2])
    for message_id in ("settled", "left"):
        entry = journal.record(
            message_id, [Settlement(sys.argv[3], "accepted", 12, "s^0", attempt=1)],
            days={}, token="t", retry_at=0, now=time.time(),
        )
        if message_id == "settled" or sys.argv[4] == "all settled":
            Journal.done(entry)
        else:
            journal.keep(entry)
    """
)


@pytest.mark.parametrize("how", ["all settled", "one left"])
def test_a_clean_exit_removes_a_file_that_holds_nothing(tmp_path: Path, how: str) -> None:
    subprocess.run(
        [sys.executable, "-c", _EXITS, str(tmp_path), "appExit", N1, how], cwd=ROOT, check=True
    )
    left = [d.entry["message_id"] for d in on_disk(tmp_path)]
    if how == "all settled":
        assert list((tmp_path / "appExit").iterdir()) == []
        assert left == []
    else:
        assert left == ["left"]  # kept for another process to take over


def test_a_forked_child_never_writes_its_parents_file(tmp_path: Path, ledger: Ledger) -> None:
    parent = Journal(tmp_path, "appFork")
    in_flight = answer(parent, ledger, "p1", N1, "s-p1^0")
    (mine,) = parent.segments()
    before = mine.read_bytes()
    pid = os.fork()
    if pid == 0:  # the child: only os._exit, never back into pytest
        code = 1
        try:
            ok = parent.segments() == [] and parent.entries() == []
            child_entry = parent.record(
                "c1",
                [Settlement(N2, "retry", 11, attempt=1)],
                days={},
                token="c",
                retry_at=0,
                now=0,
            )
            Journal.done(in_flight)  # the parent's: not the child's to touch
            ok = ok and child_entry is not None and child_entry.segment != mine
            code = 0 if ok else 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert mine.read_bytes() == before  # untouched by the child
    # The child died with its entry; the parent still holds its own file (the child's copy
    # of the descriptor did not take the lock with it).
    other = Journal(tmp_path, "appFork")
    assert [e.message_id for e in other.entries()] == ["c1"]
    assert [d.entry["message_id"] for d in on_disk(mine)] == ["p1"]
    Journal.done(in_flight)
    assert on_disk(mine) == []


# --------------------------------------------------------------------------- the old layout


def test_an_entry_file_of_the_old_layout_is_moved_in_and_replayed(
    tmp_path: Path, ledger: Ledger
) -> None:
    """Upgraded while the ledger had not taken every answer: the files of the one-file-per-
    entry journal are replayed too."""
    journal = Journal(tmp_path, "appOld")
    reserved = ledger.reserve("old", [N3], token="run-old")
    old = {
        "v": 1,
        "message_id": "old",
        "token": "run-old",
        "now": time.time(),
        "retry_at": 0,
        "days": {N3: reserved.states[0].day},
        "items": [[N3, "accepted", 12, "s-old^0", "", 1]],
    }
    path = journal.directory / f"0123456789abcdef0123-run-old-{time.time_ns()}.json"
    path.write_text(json.dumps(old))
    assert stranded(tmp_path, []) == {"appOld": 1}
    assert journal.replay(ledger) == 1
    assert state(ledger, "old", N3) == "accepted"
    assert not path.exists()
    assert on_disk(tmp_path) == []


def test_inspecting_the_journal_prints_its_open_entries(tmp_path: Path, ledger: Ledger) -> None:
    journal = Journal(tmp_path, "appLook")
    answer(journal, ledger, "look", N1, "s-look^0")
    done = subprocess.run(
        [sys.executable, "-m", "polyv_sms.ledger.journal", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    )
    (line,) = done.stdout.splitlines()
    found = json.loads(line)
    assert found["entry"]["message_id"] == "look"
    assert found["entry"]["items"][0][:4] == [N1, "accepted", 12, "s-look^0"]
    assert found["slot"] == 0


# --------------------------------------------------------------------------- hostile answers


def test_an_answer_with_a_lone_surrogate_reaches_the_ledger_and_holds_up_nothing(
    tmp_path: Path, client, account, clock, caplog: pytest.LogCaptureFixture
) -> None:
    """Polyv's text is JSON: a desc or serialNo may carry a lone surrogate (``"\\ud83d"``, an
    emoji cut in two by a server truncating UTF-16), which Redis's client cannot encode. The
    settle raised UnicodeEncodeError: the run failed with it, and its entry, kept, raised again
    in every replay - before any later entry of the account was tried, and in every sweep of
    the account's reconciler (it replays first) - for as long as it was on disk."""
    from test_dispatch import request

    from polyv_sms.ledger.reconcile import Reconciler

    journal = Journal(tmp_path, account[0])
    dead = Journal(tmp_path, account[0])  # another worker process, which dies
    # Polyv refuses the request with a desc ending in half an emoji.
    body = b'{"code":400,"success":false,"error":{"code":10001,"desc":"bad sign \\ud83d"}}'
    with CannedServer(200, body) as polyv:
        d = make(client, account, polyv.url, clock, journal=journal)
        ledger = d.ledger
        result = d.run(request([N1], "cut"), message_id="cut", task_id="t1").result
        assert len(polyv.requests) == 1
    assert result is not None
    (outcome,) = result["results"]
    assert outcome["outcome"] == "failed"
    assert "bad sign \ufffd" in outcome["error"]
    assert journal.entries() == []
    assert on_disk(tmp_path) == []

    # An entry of that kind already on disk (a status-12 with a cut serialNo), older than an
    # ordinary one, both left by a worker that died: both reach the ledger.
    record_accepted(
        dead, ledger, "cut12", N2, "s-\udc80^0", token="dead", now=clock.now, meta=_meta([N2])
    )
    record_accepted(
        dead, ledger, "fine", N3, "s-fine^0", token="dead2", now=clock.now, meta=_meta([N3])
    )
    dead.close()
    ledger.reserve("late", ["13900003004"], token="gone", meta=_meta(["13900003004"]))
    clock.now += 3600
    enqueued: list[Any] = []
    swept = Reconciler(ledger, lambda *a: enqueued.append(a), interval_s=5, journal=journal).sweep()
    assert swept == ["late"]  # the reconciler sweeps
    assert state(ledger, "fine", N3) == "accepted"
    assert ledger.peek("cut12", [N2])[N2].state == "accepted"
    assert ledger.peek("cut12", [N2])[N2].serial_no == "s-\ufffd^0"
    assert journal.entries() == []
    assert on_disk(tmp_path) == []
    assert not list(journal.directory.glob("*.bad"))


def test_an_entry_whose_settle_raises_anything_else_is_kept_and_holds_up_nothing(
    tmp_path: Path, ledger: Ledger, caplog: pytest.LogCaptureFixture
) -> None:
    """Whatever else one entry's settle raises (the client refusing an argument, a bug): the
    entry stays, the later ones are replayed, and the pass ends in LedgerBroken (the run of
    that message is not sent; the reconciler sweeps anyway) - not the error itself, which
    stopped the pass at the entry, every second, and every sweep of the reconciler."""
    from polyv_sms.errors import LedgerBroken

    journal = Journal(tmp_path, "appOdd")
    odd = answer(journal, ledger, "odd", N1, "s-odd^0")
    journal.keep(odd)
    journal.keep(answer(journal, ledger, "even", N2, "s-even^0"))

    class OddLedger:
        def settle(self, message_id: str, *args: Any, **kwargs: Any) -> Any:
            if message_id == "odd":
                raise TypeError("unhashable type: 'list'")
            return ledger.settle(message_id, *args, **kwargs)

    with caplog.at_level(logging.ERROR, "polyv_sms.ledger.journal"), pytest.raises(LedgerBroken):
        journal.replay(OddLedger())  # type: ignore[arg-type]
    assert state(ledger, "even", N2) == "accepted"
    assert [e.message_id for e in journal.entries()] == ["odd"]  # kept, not set aside
    assert not list(journal.directory.glob("*.bad"))
    assert "TypeError" in caplog.text
    assert JournalReplayer(journal, OddLedger()).replay_once() == 0  # type: ignore[arg-type]
    assert journal.replay(ledger) == 1  # (fixed: it goes)
    assert state(ledger, "odd", N1) == "accepted"


def test_an_unreadable_journal_directory_stops_neither_the_replays_nor_the_reconciler(
    tmp_path: Path, ledger: Ledger, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    """The directory cannot be listed (its owner or mode changed under a running worker, an
    I/O error): the error escaped every pass - the journal thread replayed nothing, not even
    this process's own entries, and every sweep of the account's reconciler failed."""
    from polyv_sms.ledger.reconcile import Reconciler

    journal = Journal(tmp_path, "appLocked")
    journal.keep(answer(journal, ledger, "locked", N1, "s-locked^0"))
    ledger.reserve("overdue", [N2], token="gone", meta=_meta([N2]))
    listdir = os.listdir

    def refused(path: Any) -> list[str]:
        if Path(path) == journal.directory:
            raise PermissionError(13, "Permission denied", str(path))
        return listdir(path)

    monkeypatch.setattr(os, "listdir", refused)
    with caplog.at_level(logging.ERROR, "polyv_sms.ledger.journal"):
        assert JournalReplayer(journal, ledger).replay_once() == 1
        assert journal.replay(ledger) == 0
    assert state(ledger, "locked", N1) == "accepted"
    assert caplog.text.count("cannot be read (") == 1  # said once, not every second
    ledger.clock = lambda: time.time() + 3600
    swept = Reconciler(ledger, lambda *a: None, interval_s=5, journal=journal).sweep()
    assert swept == ["overdue"]


def test_the_entries_gauge_of_one_account_is_not_overwritten_by_another_accounts(
    tmp_path: Path, ledger: Ledger, account, clock
) -> None:
    """Each account's journal thread set the one gauge to its own count: with a second
    account whose journal is empty, a scrape saw 0 about half the time while the first
    account's answers waited - and ``polyv_sms_journal_entries > 0 for 5m`` never fired."""
    from helpers import free_port
    from prometheus_client import REGISTRY

    stuck = Journal(tmp_path, "appStuck")
    stuck.keep(answer(stuck, ledger, "stuck", N1, "s-stuck^0"))
    unreachable = redis.Redis(port=free_port(), socket_connect_timeout=0.2)
    down = make(unreachable, account, "http://127.0.0.1:9", clock).ledger
    down.outage_s = 0.1
    mine = JournalReplayer(stuck, down, account="shop-stuck")
    other = JournalReplayer(Journal(tmp_path, "appQuiet"), ledger, account="shop-quiet")
    try:
        for _ in range(2):
            assert mine.replay_once() == 0
            assert other.replay_once() == 0  # (the other account's thread looks next)
            values = {
                sample.labels.get("account"): sample.value
                for metric in REGISTRY.collect()
                if metric.name == "polyv_sms_journal_entries"
                for sample in metric.samples
            }
            assert values.get("shop-stuck") == 1
            assert values.get("shop-quiet") == 0
    finally:
        unreachable.close()
    assert mine.replay_once() == 0  # (still down)
    mine.ledger = ledger
    assert mine.replay_once() == 1
    assert REGISTRY.get_sample_value("polyv_sms_journal_entries", {"account": "shop-stuck"}) == 0


@pytest.mark.parametrize("encoding", ["utf-8", "ascii"])
def test_inspecting_the_journal_prints_any_text_its_entries_hold(
    tmp_path: Path, ledger: Ledger, encoding: str
) -> None:
    """An entry holding Polyv's text with a lone surrogate (or any non-ASCII text, on a
    terminal that is not UTF-8) made the command die with UnicodeEncodeError, printing none
    of the entries after it."""
    journal = Journal(tmp_path, "appText")
    for message_id, error in (("cut", "bad sign \ud83d"), ("chinese", "签名错误"), ("plain", "x")):
        journal.record(
            message_id,
            [Settlement(N1, "fail", None, None, error, 1)],
            days={},
            token="t",
            retry_at=0,
            now=time.time(),
        )
    done = subprocess.run(
        [sys.executable, "-m", "polyv_sms.ledger.journal", str(tmp_path)],
        capture_output=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONIOENCODING": encoding},
        check=False,
    )
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.decode(encoding).splitlines()]
    errors = {line["entry"]["message_id"]: line["entry"]["items"][0][4] for line in lines}
    assert errors == {"cut": "bad sign \ud83d", "chinese": "签名错误", "plain": "x"}


def test_a_segment_cut_short_gives_up_only_the_entries_it_cut(
    tmp_path: Path, ledger: Ledger, caplog: pytest.LogCaptureFixture
) -> None:
    """A segment file cut short of a whole slot (a copy or a restore that stopped early,
    a filesystem repair) was set aside whole as ``.bad``: the whole entries in it never
    reached the ledger, and after the lease their numbers were sent again. Now only an entry
    the cut reaches is set aside (a file too short to hold a slot still is, whole)."""
    dead, alive = Journal(tmp_path, "appCut"), Journal(tmp_path, "appCut")
    first = answer(dead, ledger, "cut-1", N1, "s-cut1^0")
    answer(dead, ledger, "cut-2", N2, "s-cut2^0")
    numbers = [f"1390002{i:04d}" for i in range(120)]
    reserved = ledger.reserve("cut-3", numbers, token="run-cut-3")
    last = dead.record(
        "cut-3",
        [Settlement(n, "accepted", 12, f"s-{n}^0", "e" * 40, 1) for n in numbers],
        days={s.number: s.day for s in reserved.states},
        token="run-cut-3",
        retry_at=0,
        now=time.time(),
    )
    assert last is not None
    assert last.slots > 1
    assert last.segment == first.segment
    dead.close()
    with open(first.segment, "r+b") as handle:  # cut inside the last entry's second slot
        handle.truncate((last.slot + 1) * SLOT_SIZE + 100)
    (tmp_path / "appCut" / "0-000000000000.seg").write_bytes(b"")  # and an empty one
    with caplog.at_level(logging.ERROR, "polyv_sms.ledger.journal"):
        assert alive.replay(ledger) == 2
    assert state(ledger, "cut-1", N1) == "accepted"
    assert state(ledger, "cut-2", N2) == "accepted"
    assert state(ledger, "cut-3", numbers[0]) == "reserved"  # cut: set aside, not replayed
    assert not first.segment.exists()
    bad = sorted(p.name for p in alive.directory.glob("*.bad"))
    assert bad == ["0-000000000000.bad", f"{first.segment.stem}-{last.slot}.bad"]
    assert b"cut-3" in (alive.directory / bad[1]).read_bytes()
