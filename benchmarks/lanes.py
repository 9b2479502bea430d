"""Lanes and the rate guard, measured (issue 12): ``python -m benchmarks --sections lanes``.

**Urgent latency under a bulk backlog.** One worker started as documented
(``-Q sms.urgent,sms,sms.bulk``, 4 threads), the simulator answering in 50 ms. A backlog of
600 one-number messages is handed to the worker at once (staged under a key prefix nobody
reads, then one ``RENAME``, as in :mod:`benchmarks.e2e`); then 10 messages are enqueued with
``send_sms.delay`` 100 ms apart. Latency is enqueue -> the simulator receiving the request
that carries the message's number. Three cases:

- ``urgent over bulk``: backlog in ``sms.bulk``, the 10 as ``lane="urgent"``;
- ``standard over bulk``: backlog in ``sms.bulk``, the 10 as ``standard`` (queue ``sms``);
- ``FIFO``: backlog in ``sms``, the 10 as ``standard`` too: one queue, what a deployment
  without lanes gives.

**Rate guard.** Two workers x 8 threads with ``SMS_POLYV_RATE=20``, the simulator answering at
once, 200 one-number messages released together: the largest number of Polyv requests that
arrive in any one-second window (goal: at most the rate plus the guard's burst).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

from celery import Celery

from benchmarks.e2e import STAGE_PREFIX, TEMPLATE_NAMES, TEMPLATE_VALUES
from benchmarks.harness import RedisServer, SimulatorProcess, WorkerProcess, wait_for

LANES_QUEUES = "sms.urgent,sms,sms.bulk"
BACKLOG = 600
PROBES = 10
PROBE_SPACING_S = 0.1
LATENCY_S = 0.05
URGENT_THREADS = 4
TARGET_URGENT_MAX_S = 1.0
RATE = 20
RATE_WORKERS = 2
RATE_THREADS = 8
RATE_MESSAGES = 200
CASES = (
    # name, backlog queue, backlog lane, probe lane
    ("urgent over bulk", "sms.bulk", "bulk", "urgent"),
    ("standard over bulk", "sms.bulk", "bulk", "standard"),
    ("FIFO (one queue)", "sms", "standard", "standard"),
)


class _Driver:
    def __init__(self, broker: RedisServer, ledger: RedisServer, simulator: SimulatorProcess):
        self.broker, self.ledger, self.simulator = broker, ledger, simulator
        self.broker_client = broker.client(0)
        self.stager = Celery("bench_lanes_stager", broker=broker.url(0))
        self.stager.conf.update(
            task_serializer="json",
            accept_content=["json"],
            broker_connection_retry_on_startup=True,
            broker_transport_options={"global_keyprefix": STAGE_PREFIX},
        )
        self.control = Celery("bench_lanes_control", broker=broker.url(0))
        self.control.conf.update(accept_content=["json"], broker_connection_retry_on_startup=True)
        self.serial = 0

    def close(self) -> None:
        self.stager.close()
        self.control.close()
        self.broker_client.close()

    def numbers(self, count: int) -> list[str]:
        start = self.serial
        self.serial += count
        return [f"136{i:08d}" for i in range(start, start + count)]

    def workers(self, env: dict[str, str], logs: Path, count: int, threads: int) -> list[Any]:
        started = [
            WorkerProcess(
                "polyv_sms.worker",
                LANES_QUEUES,
                threads,
                env,
                logs / f"worker-lanes-{index}-c{threads}.log",
            ).start()
            for index in range(count)
        ]
        for worker in started:
            worker.wait_ready(self.control)
        return started

    def stage(self, queue: str, lane: str, count: int) -> None:
        with self.stager.producer_or_acquire() as producer:
            for number in self.numbers(count):
                kwargs: dict[str, Any] = {
                    "phone_numbers": [number],
                    "template_param_names": TEMPLATE_NAMES,
                    "template_param_values": TEMPLATE_VALUES,
                }
                if lane != "standard":
                    kwargs["lane"] = lane
                self.stager.send_task(
                    "polyv_sms.send_sms", kwargs=kwargs, queue=queue, producer=producer
                )

    def release(self, queue: str) -> None:
        self.broker_client.rename(STAGE_PREFIX + queue, queue)

    def received(self) -> dict[str, float]:
        """When the simulator first received each number."""
        first: dict[str, float] = {}
        for record in self.simulator.sent():
            for number in record["numbers"]:
                first.setdefault(number, float(record["received_at"]))
        return first


def _urgent_case(driver: _Driver, backlog_queue: str, backlog_lane: str, lane: str) -> dict:
    from polyv_sms import send_sms

    driver.simulator.reset()
    driver.stage(backlog_queue, backlog_lane, BACKLOG)
    driver.release(backlog_queue)
    time.sleep(0.5)  # the worker is busy with the backlog
    probes = []
    for number in driver.numbers(PROBES):
        probes.append((number, time.time()))
        send_sms.delay([number], TEMPLATE_NAMES, TEMPLATE_VALUES, lane=lane)
        time.sleep(PROBE_SPACING_S)
    wait_for(
        lambda: all(n in driver.received() for n, _ in probes),
        120 + BACKLOG * 0.2,
        "the probes to reach the simulator",
        interval=0.1,
    )
    received = driver.received()
    latencies = sorted(received[n] - at for n, at in probes)
    left = driver.broker_client.llen(backlog_queue)
    wait_for(
        lambda: len(driver.received()) >= BACKLOG + PROBES,
        120 + BACKLOG * 0.2,
        "the backlog to drain",
        interval=0.2,
    )
    return {
        "max_s": round(latencies[-1], 3),
        "p50_s": round(statistics.median(latencies), 3),
        "backlog_left_when_probes_done": left,
    }


def urgent_latency(
    broker: RedisServer, ledger: RedisServer, simulator: SimulatorProcess, env: dict, logs: Path
) -> dict[str, Any]:
    """The three cases of the module docstring, one worker x 4 threads."""
    driver = _Driver(broker, ledger, simulator)
    simulator.set_faults(latency_s=LATENCY_S)
    workers = driver.workers(env, logs, 1, URGENT_THREADS)
    report: dict[str, Any] = {
        "backlog": BACKLOG,
        "probes": PROBES,
        "threads": URGENT_THREADS,
        "latency_ms": LATENCY_S * 1000,
        "cases": {},
    }
    try:
        for name, queue, backlog_lane, lane in CASES:
            result = _urgent_case(driver, queue, backlog_lane, lane)
            report["cases"][name] = result
            print(
                f"  {name:20} max {result['max_s']:.3f}s p50 {result['p50_s']:.3f}s "
                f"(backlog left {result['backlog_left_when_probes_done']})",
                flush=True,
            )
    finally:
        for worker in workers:
            worker.stop()
        simulator.set_faults(latency_s=0)
        driver.close()
    return report


def _max_in_window(times: list[float], window_s: float = 1.0) -> int:
    times = sorted(times)
    best = start = 0
    for end, moment in enumerate(times):
        while moment - times[start] >= window_s:
            start += 1
        best = max(best, end - start + 1)
    return best


def rate_guard(
    broker: RedisServer, ledger: RedisServer, simulator: SimulatorProcess, env: dict, logs: Path
) -> dict[str, Any]:
    """Two workers x 8 threads at ``SMS_POLYV_RATE=20``: the busiest one-second window."""
    from polyv_sms.ledger.ratelimit import RATE_BURST_S

    driver = _Driver(broker, ledger, simulator)
    simulator.reset()
    workers = driver.workers(env | {"SMS_POLYV_RATE": str(RATE)}, logs, RATE_WORKERS, RATE_THREADS)
    try:
        driver.stage("sms", "standard", RATE_MESSAGES)
        started = time.time()
        driver.release("sms")
        wait_for(
            lambda: len(driver.received()) >= RATE_MESSAGES,
            60 + RATE_MESSAGES / RATE * 3,
            "every message to reach the simulator",
            interval=0.2,
        )
        times = list(driver.received().values())
    finally:
        for worker in workers:
            worker.stop()
        driver.close()
    burst = int(RATE * RATE_BURST_S) + 1
    busiest = _max_in_window(times)
    span = max(times) - started
    print(
        f"  rate guard: busiest 1-s window {busiest} requests (rate {RATE} + burst {burst}); "
        f"{RATE_MESSAGES} requests in {span:.1f}s",
        flush=True,
    )
    return {
        "rate": RATE,
        "burst": burst,
        "workers": RATE_WORKERS,
        "threads": RATE_THREADS,
        "messages": RATE_MESSAGES,
        "busiest_window": busiest,
        "achieved_rate": round(RATE_MESSAGES / span, 2),
    }


def render(report: dict[str, Any]) -> list[str]:
    """The lanes section's lines of the report table."""
    section = report.get("lanes")
    if not section:
        return []
    urgent = section["urgent"]
    lines = [
        "",
        f"Lanes: {urgent['probes']} messages 100 ms apart behind a {urgent['backlog']}-message "
        f"backlog (1 worker x {urgent['threads']} threads, Polyv {urgent['latency_ms']:.0f} ms); "
        "enqueue -> Polyv request",
    ]
    for name, case in urgent["cases"].items():
        lines.append(
            f"  {name:20} max {case['max_s']:6.3f} s  p50 {case['p50_s']:6.3f} s  "
            f"(backlog left: {case['backlog_left_when_probes_done']})"
        )
    guard = section["rate_guard"]
    lines.append(
        f"Rate guard: SMS_POLYV_RATE={guard['rate']}, {guard['workers']} workers x "
        f"{guard['threads']} threads, {guard['messages']} messages: busiest 1-s window "
        f"{guard['busiest_window']} requests (rate + burst {guard['rate'] + guard['burst']}), "
        f"{guard['achieved_rate']} requests/s overall"
    )
    return lines


def targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The lanes section's targets."""
    checks = []
    lanes = report.get("lanes")
    if lanes:
        urgent = lanes["urgent"]["cases"]["urgent over bulk"]
        checks.append(
            {
                "target": f"urgent under a {BACKLOG}-message bulk backlog, max enqueue -> Polyv "
                f"<= {TARGET_URGENT_MAX_S:g} s",
                "value": urgent["max_s"],
                "pass": urgent["max_s"] <= TARGET_URGENT_MAX_S,
            }
        )
        guard = lanes["rate_guard"]
        limit = guard["rate"] + guard["burst"]
        checks.append(
            {
                "target": f"requests in any 1-s window at SMS_POLYV_RATE={guard['rate']}, "
                f"2 workers <= {limit}",
                "value": guard["busiest_window"],
                "pass": guard["busiest_window"] <= limit,
            }
        )
    return checks
