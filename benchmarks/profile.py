"""Profile a worker under load: ``python -m benchmarks.profile [--side project] [-c 8] ...``.

Starts the same set-up as the benchmark, hands one large batch to the chosen worker and
samples it with py-spy (``pip install py-spy``; a dev tool, not a dependency) while it works.
Prints the functions with the most CPU samples, inclusive and self, and writes the raw
collapsed stacks (for a flame graph: ``flamegraph.pl`` or speedscope) next to the JSON results.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from benchmarks import e2e
from benchmarks.harness import RedisServer, SimulatorProcess, WorkerProcess, exit_on_sigterm
from benchmarks.run import APP_ID, APP_SECRET, RESULTS_DIR, worker_env


def summarise(raw: Path, top: int, only: str | None, per_message_ms: float | None = None) -> str:
    """Top functions by inclusive and self samples from py-spy's ``--format raw`` output;
    with ``per_message_ms`` (sampling interval / messages), also milliseconds per message."""
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        frames = stack.split(";")[1:]  # the first entry names the thread
        total += count
        for frame in set(frames):
            inclusive[frame] += count
        if frames:
            own[frames[-1]] += count
    lines = [f"{total} samples"]
    if per_message_ms:
        lines[0] += f", {total * per_message_ms:.3f} ms per message"
    for title, counter in (("inclusive", inclusive), ("self", own)):
        lines.append(f"\ntop {top} by {title} samples:")
        shown = 0
        for frame, count in counter.most_common():
            if only and only not in frame:
                continue
            cost = f"{count * per_message_ms:7.3f} ms  " if per_message_ms else ""
            lines.append(f"  {100 * count / max(total, 1):5.1f}%  {cost}{frame}")
            shown += 1
            if shown >= top:
                break
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Profile one side under one load."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile")
    parser.add_argument("--side", choices=("project", "baseline"), default="project")
    parser.add_argument("-c", "--concurrency", type=int, default=8)
    parser.add_argument("--numbers", type=int, default=1)
    parser.add_argument("--latency", type=int, default=0, help="simulator latency, ms")
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument(
        "--seconds", type=int, default=8, help="sampling time (longer than the run: all of it)"
    )
    parser.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument(
        "--all-threads", action="store_true", help="sample every thread, not only the GIL holder"
    )
    parser.add_argument("--loglevel", help="the worker's --loglevel (Celery's default: WARNING)")
    parser.add_argument("--only", help="show only frames containing this text, e.g. polyv_sms")
    args = parser.parse_args(argv)
    py_spy = shutil.which("py-spy")
    if py_spy is None:
        parser.error("py-spy is not installed: pip install py-spy")
    exit_on_sigterm()
    side = e2e.PROJECT if args.side == "project" else e2e.BASELINE
    workdir = Path(tempfile.mkdtemp(prefix="polyv-sms-profile-"))
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    raw = RESULTS_DIR / f"profile-{args.side}-c{args.concurrency}-n{args.numbers}-{stamp}.txt"
    broker, ledger = RedisServer(workdir, "broker"), RedisServer(workdir, "ledger")
    simulator = SimulatorProcess(APP_ID, APP_SECRET, workdir / "simulator.log")
    sampler: list[subprocess.Popen[bytes]] = []

    def attach(worker: WorkerProcess) -> None:
        assert worker.process is not None
        command = [py_spy, "record", "-p", str(worker.process.pid), "-d", str(args.seconds)]
        command += ["-r", str(args.rate), "-f", "raw", "-o", str(raw), "--nonblocking"]
        if not args.all_threads:
            command.append("--gil")  # what holds the GIL is what uses the CPU
        sampler.append(subprocess.Popen(command, stdout=subprocess.DEVNULL))

    driver = None
    try:
        broker.start()
        ledger.start()
        simulator.start()
        simulator.set_faults(latency_s=args.latency / 1000)
        driver = e2e.E2E(
            broker=broker,
            ledger=ledger,
            simulator=simulator,
            worker_env=worker_env(broker, ledger, simulator),
            logs=workdir,
            loglevel=args.loglevel,
        )
        driver.start_workers(args.concurrency)
        driver.run(side, args.concurrency, args.numbers, args.latency, 3 * args.concurrency + 20)
        result = driver.run(
            side, args.concurrency, args.numbers, args.latency, args.messages, attach
        )
        for process in sampler:
            process.wait(args.seconds + 30)
    finally:
        if driver is not None:
            driver.close()
        simulator.stop()
        ledger.stop()
        broker.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    # With --gil, an idle worker takes no samples: sampling past the end of the batch adds
    # nothing, and the samples then cover every message.
    whole = not args.all_threads and args.seconds * result.rate > args.messages * 1.2
    per_message = 1000 / args.rate / args.messages if whole else None
    print(summarise(raw, args.top, args.only, per_message))
    print(f"\nraw stacks: {raw}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
