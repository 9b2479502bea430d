"""End-to-end throughput: the real ``send_sms`` worker against the bare baseline task.

How one run works, so that the producer never competes with the worker for the CPU:

1. the messages are published (by task name, like any producer) under a key prefix
   (``bench-stage:``) that no worker reads, so they pile up in a list nobody consumes;
2. the ledger Redis's ``INFO commandstats`` is reset, the simulator's counters too;
3. one ``RENAME bench-stage:<queue> <queue>`` hands the whole batch to the idle worker at once;
4. the driver waits until every result is in the result backend, then reads each result's
   ``date_done`` and counts throughput between the 10th and 90th percentile completions
   (warm-up and drain excluded); ``wall`` is messages / (last completion - release).

Both workers (project and baseline) stay up for a whole concurrency level; runs alternate
between them (AB, BA, AB, ...), so noise on a busy machine hits both sides alike.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import redis
from celery import Celery

from benchmarks.harness import (
    ROOT,
    RedisServer,
    SimulatorProcess,
    WorkerProcess,
    cpu_seconds,
    wait_for,
)

STAGE_PREFIX = "bench-stage:"
TEMPLATE_NAMES = ["code"]
TEMPLATE_VALUES = ["123456"]
#: Ledger commands a worker sends outside the Lua scripts that are not per message:
#: connection set-up and redis-py's health check of a connection idle for 30 s.
HOUSEKEEPING = ("ping", "client|setinfo", "hello", "script|load", "select")


@dataclass(frozen=True)
class Side:
    """One of the two workers under comparison."""

    name: str
    app: str
    queue: str
    task: str


PROJECT = Side("project", "polyv_sms.worker", "sms", "polyv_sms.send_sms")
BASELINE = Side("baseline", "benchmarks.baseline", "bench_baseline", "benchmarks.baseline.send")
#: The project's worker run from another source tree (``--before PATH``, e.g. an export of the
#: last commit), alternated with the two others: before/after numbers from the same run.
BEFORE = Side("before", "polyv_sms.worker", "sms_before", "polyv_sms.send_sms")


class Numbers:
    """Distinct, valid mainland mobile numbers (13x...), never repeated within a benchmark."""

    def __init__(self) -> None:
        self.next = 13_000_000_000

    def take(self, count: int) -> list[str]:
        """``count`` fresh numbers."""
        start = self.next
        self.next += count
        return [str(n) for n in range(start, start + count)]


def script_commands() -> frozenset[str]:
    """Commands the ledger's Lua scripts call (``redis.call('HGET', ...)``), lower case."""
    names: set[str] = set()
    for path in (ROOT / "polyv_sms" / "ledger" / "lua").glob("*.lua"):
        names.update(m.lower() for m in re.findall(r"redis\.call\('([A-Za-z]+)'", path.read_text()))
    return frozenset(names)


def command_counts(client: redis.Redis) -> dict[str, int]:
    """``INFO commandstats`` as {command: calls}, without the benchmark's own INFO/CONFIG."""
    stats = client.info("commandstats")
    counts = {}
    for key, value in stats.items():
        name = key.removeprefix("cmdstat_")
        if name == "info" or name.startswith("config"):
            continue
        counts[name] = int(value["calls"])
    return counts


@dataclass
class RunResult:
    """One batch of messages through one worker."""

    side: str
    concurrency: int
    numbers: int
    latency_ms: int
    messages: int
    rate: float
    wall_rate: float
    http_requests: int
    ledger_commands: dict[str, int] = field(default_factory=dict)
    #: CPU milliseconds per message of each process while the batch ran.
    cpu_ms_per_message: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """JSON-safe."""
        return dict(self.__dict__)


class E2E:
    """Drives runs against workers that it starts and stops itself."""

    def __init__(
        self,
        *,
        broker: RedisServer,
        ledger: RedisServer,
        simulator: SimulatorProcess,
        worker_env: dict[str, str],
        logs: Path,
        loglevel: str | None,
        verbose: bool = True,
        project_app: str = PROJECT.app,
        before_root: Path | None = None,
    ) -> None:
        self.broker = broker
        self.ledger = ledger
        self.simulator = simulator
        self.worker_env = worker_env
        self.logs = logs
        self.loglevel = loglevel
        self.verbose = verbose
        self.numbers = Numbers()
        self.broker_client = broker.client(0)
        self.results_client = broker.client(1)
        self.ledger_client = ledger.client(0)
        self.stager = Celery("bench_stager", broker=broker.url(0))
        self.stager.conf.update(
            task_serializer="json",
            accept_content=["json"],
            broker_connection_retry_on_startup=True,
            broker_transport_options={"global_keyprefix": STAGE_PREFIX},
        )
        self.control = Celery("bench_control", broker=broker.url(0))
        self.control.conf.update(accept_content=["json"], broker_connection_retry_on_startup=True)
        self.workers: dict[str, WorkerProcess] = {}
        self.apps = {PROJECT.name: project_app, BASELINE.name: BASELINE.app}
        self.before_root = before_root
        self.sides = (PROJECT, BASELINE) if before_root is None else (PROJECT, BASELINE, BEFORE)

    def close(self) -> None:
        """Stop the workers and close connections."""
        self.stop_workers()
        self.stager.close()
        self.control.close()
        for client in (self.broker_client, self.results_client, self.ledger_client):
            client.close()

    def start_workers(self, concurrency: int) -> None:
        """Start both workers at ``concurrency`` threads and wait until they are ready."""
        self.stop_workers()
        env = self.worker_env | {"SMS_WORKER_CONCURRENCY": str(concurrency)}
        for side in self.sides:
            log = self.logs / f"worker-{side.name}-c{concurrency}.log"
            self.workers[side.name] = WorkerProcess(
                self.apps.get(side.name, side.app),
                side.queue,
                concurrency,
                env,
                log,
                loglevel=self.loglevel,
                root=self.before_root if side is BEFORE and self.before_root else ROOT,
            ).start()
        for worker in self.workers.values():
            worker.wait_ready(self.control)

    def stop_workers(self) -> None:
        """Stop both workers."""
        for worker in self.workers.values():
            worker.stop()
        self.workers.clear()

    def _stage(self, side: Side, messages: int, size: int) -> None:
        with self.stager.producer_or_acquire() as producer:
            for _ in range(messages):
                kwargs = {
                    "phone_numbers": self.numbers.take(size),
                    "template_param_names": TEMPLATE_NAMES,
                    "template_param_values": TEMPLATE_VALUES,
                }
                self.stager.send_task(side.task, kwargs=kwargs, queue=side.queue, producer=producer)
        staged = self.broker_client.llen(STAGE_PREFIX + side.queue)
        if staged != messages:
            raise RuntimeError(f"staged {staged} messages for {side.queue}, expected {messages}")

    def run(
        self,
        side: Side,
        concurrency: int,
        size: int,
        latency_ms: int,
        messages: int,
        on_release: Callable[[WorkerProcess], object] | None = None,
    ) -> RunResult:
        """Send ``messages`` messages of ``size`` numbers through ``side``'s worker.

        ``on_release`` is called with the worker right after the batch is handed over (the
        profiler attaches there).
        """
        self.results_client.flushdb()
        self.ledger_client.flushdb()
        self.simulator.reset()
        if self.broker_client.llen(side.queue):
            raise RuntimeError(f"queue {side.queue} is not empty before a run")
        self._stage(side, messages, size)
        self.ledger_client.config_resetstat()
        worker = self.workers[side.name]
        processes = self._processes(worker)
        cpu_before = {name: cpu_seconds(pid) for name, pid in processes.items()}
        released = time.time()
        self.broker_client.rename(STAGE_PREFIX + side.queue, side.queue)
        if on_release is not None:
            on_release(worker)

        def finished() -> bool:
            worker.check_alive()
            return int(self.results_client.dbsize()) >= messages

        wait_for(finished, 60 + messages * 0.5, f"{messages} results from {side.name}", 0.02)
        cpu = {
            name: 1000 * (cpu_seconds(pid) - cpu_before[name]) / messages
            for name, pid in processes.items()
        }
        commands = command_counts(self.ledger_client)
        done = self._completion_times(side, size)
        http_requests = int(self.simulator.stats()["requests"])
        result = RunResult(
            side=side.name,
            concurrency=concurrency,
            numbers=size,
            latency_ms=latency_ms,
            messages=messages,
            rate=steady_rate(done),
            wall_rate=messages / max(done[-1] - released, 1e-9),
            http_requests=http_requests,
            ledger_commands=commands,
            cpu_ms_per_message=cpu,
        )
        if self.verbose:
            print(
                f"  {side.name:8} c={concurrency:<2} numbers={size:<3} latency={latency_ms:>2}ms "
                f"messages={messages:<5} {result.rate:8.1f} msg/s (wall {result.wall_rate:.1f}) "
                "cpu ms/msg " + " ".join(f"{k}={v:.2f}" for k, v in cpu.items()),
                flush=True,
            )
        return result

    def _processes(self, worker: WorkerProcess) -> dict[str, int]:
        pids = {
            "worker": worker.process,
            "simulator": self.simulator.process,
            "broker_redis": self.broker.process,
            "ledger_redis": self.ledger.process,
        }
        out = {name: p.pid for name, p in pids.items() if p is not None}
        out["driver"] = os.getpid()
        return out

    def _completion_times(self, side: Side, size: int) -> list[float]:
        keys = list(self.results_client.scan_iter("celery-task-meta-*", count=1000))
        done = []
        for start in range(0, len(keys), 500):
            for raw in self.results_client.mget(keys[start : start + 500]):
                meta = json.loads(raw)
                if meta["status"] != "SUCCESS":
                    raise RuntimeError(f"{side.name}: a task ended {meta['status']}: {meta}")
                result = meta["result"]
                accepted = result["accepted"] if side is BASELINE else result["counts"]["accepted"]
                if accepted != size:
                    raise RuntimeError(f"{side.name}: {accepted} of {size} numbers accepted")
                done.append(datetime.fromisoformat(meta["date_done"]).timestamp())
        done.sort()
        return done


def steady_rate(done: list[float], trim: float = 0.1) -> float:
    """Completions per second between the ``trim`` and ``1 - trim`` quantiles of ``done``."""
    count = len(done)
    low = int(count * trim)
    high = count - 1 - low
    if high - low < 2 or done[high] <= done[low]:
        span = done[-1] - done[0]
        return count / span if span > 0 else float("nan")
    return (high - low) / (done[high] - done[low])


@dataclass
class Row:
    """One configuration: both sides, several alternating runs each."""

    concurrency: int
    numbers: int
    latency_ms: int
    runs: list[RunResult] = field(default_factory=list)

    def rates(self, side: str) -> list[float]:
        """The steady rates of ``side``'s runs, in run order."""
        return [r.rate for r in self.runs if r.side == side]

    def ratios(self, side: str = "project") -> list[float]:
        """``side``/baseline of each adjacent pair (or triple) of runs."""
        project, baseline = self.rates(side), self.rates("baseline")
        return [p / b for p, b in zip(project, baseline, strict=False) if b > 0]

    def summary(self, script_names: frozenset[str]) -> dict[str, Any]:
        """Medians, the pair ratio and ledger commands per message."""
        project, baseline, ratios = self.rates("project"), self.rates("baseline"), self.ratios()
        out: dict[str, Any] = {
            "concurrency": self.concurrency,
            "numbers": self.numbers,
            "latency_ms": self.latency_ms,
            "project_msg_s": statistics.median(project) if project else None,
            "baseline_msg_s": statistics.median(baseline) if baseline else None,
            "ratio": statistics.median(ratios) if ratios else None,
            "ratios": ratios,
        }
        before = self.rates("before")
        if before:
            out["before_msg_s"] = statistics.median(before)
            out["before_ratios"] = self.ratios("before")
            out["before_ratio"] = statistics.median(out["before_ratios"])
        for key in ("project", "baseline", "before"):
            rate = out.get(f"{key}_msg_s")
            out[f"{key}_numbers_s"] = None if rate is None else rate * self.numbers
            runs = [r for r in self.runs if r.side == key]
            if runs:
                # CPU per message is less sensitive to a busy machine than throughput.
                out[f"{key}_cpu_ms"] = {
                    name: statistics.median(r.cpu_ms_per_message.get(name, 0.0) for r in runs)
                    for name in runs[0].cpu_ms_per_message
                }
        project_runs = [r for r in self.runs if r.side == "project"]
        if project_runs:
            out["ledger"] = ledger_traffic(project_runs, script_names)
        return out


def ledger_traffic(runs: list[RunResult], script_names: frozenset[str]) -> dict[str, Any]:
    """Ledger Redis commands of the project's runs, per message and per HTTP request."""
    messages = sum(r.messages for r in runs)
    requests = sum(r.http_requests for r in runs)
    total: dict[str, int] = {}
    for run in runs:
        for name, calls in run.ledger_commands.items():
            total[name] = total.get(name, 0) + calls
    scripts = total.get("evalsha", 0) + total.get("eval", 0)
    inside = sum(calls for name, calls in total.items() if name in script_names)
    housekeeping = sum(calls for name, calls in total.items() if name in HOUSEKEEPING)
    other = sum(total.values()) - scripts - inside - housekeeping
    return {
        "messages": messages,
        "http_requests": requests,
        "commands_per_message": sum(total.values()) / messages,
        "round_trips_per_message": (scripts + other) / messages,
        "script_calls_per_http_request": scripts / requests if requests else None,
        "other_round_trips_per_message": other / messages,
        "housekeeping_per_message": housekeeping / messages,
        "inside_scripts_per_message": inside / messages,
        "by_command_per_message": {k: v / messages for k, v in sorted(total.items())},
    }
