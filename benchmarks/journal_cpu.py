"""What the answer journal costs per settle: ``record`` + ``done`` of one entry, in process.

``python -m benchmarks.journal_cpu [--entries 20000] [--rounds 3] [--threads 1,8] [--numbers 1]
[--work-us 0] [--syscalls strace|perf] [--tree PATH]`` looks a message id up, records an entry
and forgets it, as a run does around a settle that goes through (the entry of a
``numbers``-number answer), from ``threads`` threads at once, and prints per entry: the wall
time, this process's CPU (``time.process_time``, every thread) and its context switches
(``getrusage``: with several threads, each syscall that releases the GIL is a hand-off).
``--work-us`` puts that much Python work (holding the GIL, like the rest of a message's
handling) between ``record`` and ``done``. Every figure is the loop's minus the same loop's
without the journal's calls (best round by CPU of each). ``--syscalls`` also counts syscalls
per entry, in child runs (``perf stat`` counts without slowing anything down; ``strace -c -f``
slows every syscall, which makes threads collide more). ``--tree PATH`` measures the journal
of another source tree (``git archive``d from an earlier commit) for before/after numbers.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any


def _entry_args(numbers: int) -> tuple[list[Any], dict[str, str]]:
    from polyv_sms.ledger import Settlement

    items = [
        Settlement(str(13800138000 + i), "accepted", 12, f"{605320356903663783 + i}^0", attempt=1)
        for i in range(numbers)
    ]
    return items, {item.number: "20261130" for item in items}


def _spin(seconds: float) -> None:
    """Python work that holds the GIL."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def measure(
    directory: Path,
    entries: int,
    threads: int,
    numbers: int,
    work_s: float = 0.0,
    *,
    journaled: bool = True,
) -> dict[str, float]:
    """``entries`` look-up + record + done rounds spread over ``threads`` threads, or the
    same loop without the journal's calls (``journaled=False``); costs per entry."""
    from polyv_sms.ledger.journal import Journal

    journal = Journal(directory, "benchjournal")
    items, days = _entry_args(numbers)
    each = entries // threads

    def work(worker: int) -> None:
        for index in range(each):
            message_id = f"bench-{worker}-{index}"
            now = time.time()
            if not journaled:
                if work_s:
                    _spin(work_s)
                continue
            # The run's look for answers of its message left here (none: nothing to settle).
            journal.replay(None, message_id)  # type: ignore[arg-type]
            handle = journal.record(
                message_id, items, days=days, token="t" * 32, retry_at=now, now=now
            )
            assert handle is not None
            if work_s:
                _spin(work_s)
            Journal.done(handle)

    # (The first record of a process creates its file: not what is measured.)
    Journal.done(journal.record("warm", items, days=days, token="w", retry_at=0, now=0))
    workers = [threading.Thread(target=work, args=(n,)) for n in range(threads)]
    before = resource.getrusage(resource.RUSAGE_SELF)
    cpu, wall = time.process_time(), time.perf_counter()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    after = resource.getrusage(resource.RUSAGE_SELF)
    done = each * threads
    switches = (after.ru_nvcsw + after.ru_nivcsw) - (before.ru_nvcsw + before.ru_nivcsw)
    return {
        "wall_us": wall / done * 1e6,
        "cpu_us": cpu / done * 1e6,
        "context_switches": switches / done,
    }


def _child_command(args: argparse.Namespace, threads: int, journaled: bool) -> list[str]:
    command = [
        sys.executable,
        "-m",
        "benchmarks.journal_cpu",
        "--child" if journaled else "--child-bare",
        "--entries",
        str(args.entries),
        "--threads",
        str(threads),
        "--numbers",
        str(args.numbers),
        "--work-us",
        str(args.work_us),
        "--rounds",
        "1",
    ]
    return [*command, "--tree", str(args.tree)] if args.tree else command


def _syscalls(args: argparse.Namespace, threads: int, journaled: bool) -> int:
    """Syscalls of a whole child run."""
    with tempfile.TemporaryDirectory(prefix="polyv-sms-journal-count-") as scratch:
        out = Path(scratch) / "count.txt"
        if args.syscalls == "strace":
            prefix = ["strace", "-c", "-f", "-o", str(out)]
        else:
            prefix = ["perf", "stat", "-x,", "-e", "raw_syscalls:sys_enter", "-o", str(out)]
        command = prefix + _child_command(args, threads, journaled)
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        text = out.read_text()
    if args.syscalls == "strace":
        lines = [line for line in text.splitlines() if line.strip().endswith("total")]
        if lines:
            return int(lines[-1].split()[3])
    else:
        lines = [line for line in text.splitlines() if "raw_syscalls:sys_enter" in line]
        if lines and lines[-1].split(",")[0].isdigit():
            return int(lines[-1].split(",")[0])
    raise RuntimeError(f"{args.syscalls} printed no count:\n{text}")


def _best(args: argparse.Namespace, threads: int, journaled: bool) -> dict[str, float]:
    rounds = []
    for _ in range(args.rounds):
        with tempfile.TemporaryDirectory(prefix="polyv-sms-journal-bench-") as scratch:
            rounds.append(
                measure(
                    Path(scratch),
                    args.entries,
                    threads,
                    args.numbers,
                    args.work_us / 1e6,
                    journaled=journaled,
                )
            )
    return min(rounds, key=lambda r: r["cpu_us"])


def main() -> None:
    """Print the journal's costs per entry, per thread count: the loop with the journal's
    calls minus the same loop without them (the best round by CPU of each)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=20000, help="entries per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", default="1,8", help="comma-separated thread counts")
    parser.add_argument("--numbers", type=int, default=1, help="numbers per entry")
    parser.add_argument("--work-us", type=float, default=0.0, help="other work per entry")
    parser.add_argument("--tree", type=Path, help="measure the journal of this source tree")
    parser.add_argument("--syscalls", choices=("strace", "perf"), help="count syscalls too")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--child-bare", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.tree:
        sys.path.insert(0, str(args.tree.resolve()))
    from polyv_sms.ledger import journal as journal_module

    counts = [int(t) for t in args.threads.split(",")]
    if args.child or args.child_bare:
        for threads in counts:
            _best(args, threads, journaled=args.child)
        return
    if args.syscalls and shutil.which(args.syscalls) is None:
        raise SystemExit(f"--syscalls {args.syscalls} needs {args.syscalls} on the PATH")
    print(f"journal: {journal_module.__file__}")
    report: dict[str, Any] = {}
    for threads in counts:
        with_journal = _best(args, threads, journaled=True)
        bare = _best(args, threads, journaled=False)
        row: dict[str, Any] = {k: round(with_journal[k] - bare[k], 2) for k in with_journal}
        if args.syscalls:
            many = _syscalls(args, threads, journaled=True)
            none = _syscalls(args, threads, journaled=False)
            row["syscalls"] = round((many - none) / (args.entries // threads * threads), 2)
        report[f"{threads} threads"] = row
        print(
            f"{threads} threads, {args.numbers} numbers, {args.work_us:g} us other work: "
            f"{row['wall_us']:.1f} us wall, {row['cpu_us']:.1f} us CPU, "
            f"{row['context_switches']:.2f} context switches"
            + (f", {row['syscalls']} syscalls" if "syscalls" in row else "")
            + f" per entry (best CPU of {args.rounds}, the same loop without the journal"
            " deducted)"
        )
    print(json.dumps(report))


if __name__ == "__main__":
    main()
