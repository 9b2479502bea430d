"""``polyv-sms demo``: the whole pipeline in one process, with nothing to install or configure.

What runs, all on 127.0.0.1 ports picked at random:

- a Redis stand-in: fakeredis's TCP server, with Lua through lupa (the ``demo`` extra). The
  real code paths use it unchanged: kombu's Redis transport (``BRPOP``, ``MULTI``/``EXEC``,
  ``ZADD``/``ZREVRANGEBYSCORE`` for unacknowledged messages, ``PUBLISH`` for task events), the
  result backend (``SUBSCRIBE`` to wait for results) and the ledger's Lua scripts
  (``EVALSHA``). Checked with fakeredis 2.41: no polling workaround is needed;
- the Polyv simulator, told to answer status 11 for some numbers;
- a real Celery worker (threads pool) in a thread of this process.

Real tasks go through ``send_sms.delay()``. The ``SMS_*``/``POLYV_*`` variables of the calling
environment are ignored: the demo sets its own before the Celery app first reads its
configuration, so it never touches a Redis or a Polyv account of yours.
"""

from __future__ import annotations

import gc
import os
import secrets
import threading
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

from polyv_sms.cli.formatting import table
from polyv_sms.ledger.receipts import Receipts

__all__ = ["SCENARIOS", "Scenario", "run"]

Echo = Callable[[str], Any]

DEMO_APP_ID = "demo-app"
DEMO_PHONE_DAILY_LIMIT = 2
DEMO_MAX_ATTEMPTS = 3
DEMO_CONCURRENCY = 4
DEMO_DEADLINE_S = 45.0
PROGRESS_POLL_S = 0.05
_RESULT_KEYS = ("phone_number", "outcome", "status", "attempts", "serial_no", "error")
_STATUS_MEANING = {12: "accepted", 11: "Aliyun failed, will retry", -1: "over limit", -2: "invalid"}


@dataclass(frozen=True)
class Scenario:
    """Messages the demo sends and what must come of them.

    Attributes:
        title: what the scenario shows.
        message_ids: one message per id, each to ``numbers``.
        numbers: the numbers of each message.
        expected: the outcomes over all its messages' numbers.
    """

    title: str
    message_ids: tuple[str, ...]
    numbers: tuple[str, ...]
    expected: dict[str, int]


FLAKY, BROKEN, BUSY = "13800138002", "13800138004", "13800138003"
SCENARIOS = (
    Scenario(
        "a valid number is accepted, a 7-digit one is invalid (never sent, no quota taken)",
        ("demo-welcome",),
        ("13800138001", "1380013"),
        {"accepted": 1, "invalid": 1},
    ),
    Scenario(
        "Polyv answers status 11 twice: retried with backoff, accepted on attempt 3",
        ("demo-retry",),
        (FLAKY,),
        {"accepted": 1},
    ),
    Scenario(
        f"3 messages to one number, {DEMO_PHONE_DAILY_LIMIT} a day allowed: one is refused",
        ("demo-limit-1", "demo-limit-2", "demo-limit-3"),
        (BUSY,),
        {"accepted": DEMO_PHONE_DAILY_LIMIT, "quota_exceeded": 1},
    ),
    Scenario(
        f"status 11 every time: failed after {DEMO_MAX_ATTEMPTS} attempts, in the dead list",
        ("demo-failing",),
        (BROKEN,),
        {"failed": 1},
    ),
)


def _environment(redis_url: str, api_base: str, secret: str) -> dict[str, str]:
    return {
        "POLYV_APP_ID": DEMO_APP_ID,
        "POLYV_APP_SECRET": secret,
        "POLYV_API_BASE": api_base,
        "POLYV_HTTP_TIMEOUT": "5",
        "SMS_BROKER_URL": f"{redis_url}/0",
        "SMS_RESULT_BACKEND": f"{redis_url}/1",
        "SMS_REDIS_URL": f"{redis_url}/2",
        "SMS_PHONE_DAILY_LIMIT": str(DEMO_PHONE_DAILY_LIMIT),
        "SMS_MAX_ATTEMPTS": str(DEMO_MAX_ATTEMPTS),
        "SMS_RETRY_BACKOFF": "0.2",
        "SMS_RETRY_BACKOFF_MAX": "1",
        "SMS_REDIS_OUTAGE": "5",
        "SMS_RECONCILE_INTERVAL": "0",
        "SMS_WORKER_CONCURRENCY": str(DEMO_CONCURRENCY),
    }


@contextmanager
def _redis_stand_in() -> Iterator[str]:
    """fakeredis's TCP server on a free port; yields its URL (without a db number)."""
    from fakeredis import TcpFakeServer  # noqa: PLC0415 - an optional dependency

    server = TcpFakeServer(("127.0.0.1", 0), server_version=(7, 2))
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    try:
        yield f"redis://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


class _Progress:
    """Prints what happens while it happens: each Polyv request, each finished message."""

    def __init__(self, echo: Echo, simulator: Any, started: float) -> None:
        self.echo, self.simulator, self.started = echo, simulator, started
        self.requests_seen = 0
        self.failures: dict[str, int] = {}  # status-11 answers so far, per number

    def say(self, text: str) -> None:
        self.echo(f"  [{time.perf_counter() - self.started:5.2f}s] {text}")

    def poll_simulator(self) -> None:
        for record in self.simulator.requests()[self.requests_seen :]:
            self.requests_seen += 1
            answers = ", ".join(
                f"{r['phoneNumber']} -> {r['status']} ({self._meaning(r)})"
                for r in record["results"]
            )
            self.say(f"Polyv request {self.requests_seen}: {answers or record['error_code']}")

    def _meaning(self, answer: dict[str, Any]) -> str:
        """What an answer means; a status 11 on the last allowed attempt is the end of it."""
        number, status = str(answer["phoneNumber"]), answer["status"]
        if status != 11:  # Polyv's "Aliyun failed"
            return _STATUS_MEANING.get(status, "?")
        self.failures[number] = self.failures.get(number, 0) + 1
        if self.failures[number] >= DEMO_MAX_ATTEMPTS:
            return f"Aliyun failed, giving up after {DEMO_MAX_ATTEMPTS} attempts"
        return _STATUS_MEANING[status]


def _wait_all(pending: dict[str, Any], progress: _Progress, deadline: float) -> dict[str, Any]:
    results: dict[str, Any] = {}
    while len(results) < len(pending):
        progress.poll_simulator()
        for message_id, async_result in pending.items():
            if message_id not in results and async_result.ready():
                results[message_id] = result = async_result.get(timeout=5)
                counts = ", ".join(f"{k} {v}" for k, v in result["counts"].items() if v)
                progress.say(f"message {message_id} done: {counts}")
        if time.perf_counter() > deadline:
            missing = sorted(set(pending) - set(results))
            raise TimeoutError(f"no result for {', '.join(missing)} in {DEMO_DEADLINE_S:g}s")
        time.sleep(PROGRESS_POLL_S)
    progress.poll_simulator()
    return results


def _report(echo: Echo, results: dict[str, Any], receipts: Receipts) -> bool:
    """Print outcomes, receipts, the dead list and checks; True when all is as expected."""
    rows: list[tuple[object, ...]] = []
    serials = []
    for message_id, result in results.items():
        for r in result["results"]:
            rows.append((message_id, *(r[k] for k in _RESULT_KEYS)))
            if r["serial_no"]:
                serials.append(r["serial_no"])
    headers = ("MESSAGE", "NUMBER", "OUTCOME", "STATUS", "ATTEMPTS", "SERIAL NO", "ERROR")
    echo(f"\nOutcomes (the task's return value)\n{table(headers, rows)}")
    found = [receipts.receipt(serial) for serial in serials]
    receipt_rows = [
        (f["serial_no"], f["phone_number"], f["message_id"], f["accepted_at"], f["attempt"])
        for f in found
        if f
    ]
    receipt_headers = ("SERIAL NO", "NUMBER", "MESSAGE", "ACCEPTED AT", "ATTEMPT")
    receipts_table = table(receipt_headers, receipt_rows)
    echo(f"\nReceipts in the ledger (polyv-sms receipt SERIAL_NO)\n{receipts_table}")
    dead_rows = [
        (d["message_id"], f["phone_number"], f["error"])
        for d in receipts.dead()
        for f in d["failed"]
    ]
    echo(f"\nDead list (polyv-sms dead)\n{table(('MESSAGE', 'NUMBER', 'ERROR'), dead_rows)}")
    today = receipts.phone(BUSY)["today"]
    echo(f"\nQuota: {BUSY} sent {today['count']} of {today['limit']} today (polyv-sms phone)")
    echo("\nChecks")
    all_ok = len(receipt_rows) == len(serials)
    for scenario in SCENARIOS:
        got = Counter(r["outcome"] for mid in scenario.message_ids for r in results[mid]["results"])
        ok = dict(got) == scenario.expected
        all_ok = all_ok and ok
        echo(
            f"  {'ok' if ok else 'UNEXPECTED'}  {scenario.title}" + ("" if ok else f": {dict(got)}")
        )
    return all_ok


#: The lanes scenario: a campaign of this many bulk messages is queued, then one login code.
LANE_BULK_MESSAGES = 60
LANE_LATENCY_S = 0.1
URGENT = "13800138009"


def _overtake(echo: Echo, simulator: Any, keep: list[Any]) -> bool:
    """An urgent message enqueued behind a bulk backlog is sent before it. True when it was."""
    from polyv_sms.tasks import send_sms  # noqa: PLC0415

    echo(
        f"\nLanes: {LANE_BULK_MESSAGES} bulk messages queued (a campaign; Polyv answers in "
        f"{LANE_LATENCY_S * 1000:.0f} ms), then one urgent login code"
    )
    simulator.set_faults(latency_s=LANE_LATENCY_S)
    since = time.time()
    bulk = [
        send_sms.delay(
            [f"1390000{i:04d}"], ["code"], ["1"], message_id=f"demo-bulk-{i}", lane="bulk"
        )
        for i in range(LANE_BULK_MESSAGES)
    ]
    keep += bulk
    enqueued = time.perf_counter()
    urgent = send_sms.delay([URGENT], ["code"], ["4711"], message_id="demo-urgent", lane="urgent")
    keep.append(urgent)
    result = urgent.get(timeout=DEMO_DEADLINE_S)
    took = time.perf_counter() - enqueued
    waiting = sum(1 for b in bulk if not b.ready())
    order = [r["numbers"][0] for r in simulator.requests(since)]
    before = order.index(URGENT) if URGENT in order else len(order)
    echo(
        f"  demo-urgent (lane urgent): {result['results'][0]['outcome']} {took:.2f}s after it was "
        f"enqueued, as Polyv request {before + 1}; {waiting} bulk messages were still waiting"
    )
    for item in bulk:
        item.get(timeout=DEMO_DEADLINE_S)
    echo("  the bulk messages still waiting were sent after it")
    simulator.set_faults(latency_s=0.0)
    ok = result["counts"]["accepted"] == 1 and waiting > 0
    echo(f"  {'ok' if ok else 'UNEXPECTED'}  the urgent message overtook the bulk backlog")
    return ok


def _use_environment(env: dict[str, str]) -> None:
    """Replace every SMS_*/POLYV_* variable of this process with the demo's own."""
    for name in [n for n in os.environ if n.startswith(("SMS_", "POLYV_")) or n == "TEST_BROKER"]:
        del os.environ[name]
    os.environ.update(env)


def _introduce(echo: Echo, redis_url: str, api_base: str, queues: str) -> None:
    echo("polyv-sms demo: the real worker and task, in this process; no SMS leaves it.")
    echo(f"  Redis stand-in   {redis_url} (fakeredis; broker db 0, results db 1, ledger db 2)")
    echo(f"  Polyv simulator  {api_base} (status 11 twice for {FLAKY}, always for {BROKEN})")
    echo(f"  Worker           threads pool, {DEMO_CONCURRENCY} threads, queues {queues}")
    echo(
        f"  Limits           {DEMO_PHONE_DAILY_LIMIT} SMS per number a day, "
        f"{DEMO_MAX_ATTEMPTS} attempts, first retry after 0.2s"
    )


def _send(echo: Echo) -> dict[str, Any]:
    from polyv_sms.tasks import send_sms  # noqa: PLC0415

    echo(f"\nSending {sum(len(s.message_ids) for s in SCENARIOS)} messages with send_sms.delay():")
    pending = {}
    for scenario in SCENARIOS:
        echo(f"  {', '.join(scenario.message_ids)}: {scenario.title}")
        for message_id in scenario.message_ids:
            pending[message_id] = send_sms.delay(
                list(scenario.numbers), ["code"], ["4711"], message_id=message_id
            )
    return pending


def run(echo: Echo = print) -> int:
    """Run the demo, printing with ``echo``.

    Returns:
        The exit code: 0 when every outcome was the expected one, 1 otherwise, 2 when the
        ``demo`` extra (fakeredis with Lua) is not installed.
    """
    try:
        import lupa  # noqa: F401, PLC0415 - fakeredis runs Lua with it
        from celery.contrib.testing.worker import start_worker  # noqa: PLC0415
        from fakeredis import TcpFakeServer  # noqa: F401, PLC0415
    except ImportError:
        echo("polyv-sms demo needs fakeredis with Lua: pip install 'polyv-sms[demo]'")
        return 2
    from polyv_sms.polyv.simulator import PolyvSimulator  # noqa: PLC0415
    from polyv_sms.runtime import get_runtime, set_runtime  # noqa: PLC0415
    from polyv_sms.worker import WORKER_QUEUES, app  # noqa: PLC0415

    if app.configured:
        raise RuntimeError("run the demo in a fresh process: the Celery app is configured")
    started = time.perf_counter()
    secret = secrets.token_urlsafe(16)
    with ExitStack() as stack:
        redis_url = stack.enter_context(_redis_stand_in())
        sim = stack.enter_context(PolyvSimulator(DEMO_APP_ID, secret))
        sim.set_faults(fail_numbers={FLAKY: 2, BROKEN: 1_000_000})
        # Before anything reads the Celery configuration: it comes from the environment.
        _use_environment(_environment(redis_url, sim.url, secret))
        _introduce(echo, redis_url, sim.url, ",".join(WORKER_QUEUES))
        with warnings.catch_warnings():
            # tasks.py sets the task's queue as an attribute, which Celery 5.5+ flags on binding.
            warnings.filterwarnings("ignore", message=r"\s*The 'queue' task attribute")
            import polyv_sms.tasks  # noqa: F401, PLC0415

            app.finalize(auto=True)
        runtime = get_runtime()
        stack.callback(runtime.close)
        stack.callback(set_runtime, None)
        worker = start_worker(
            app,
            pool="threads",
            concurrency=DEMO_CONCURRENCY,
            queues=list(WORKER_QUEUES),  # the lanes, urgent first
            perform_ping_check=False,
            loglevel="WARNING",
            shutdown_timeout=15,
        )
        stack.enter_context(worker)
        pending = _send(echo)
        echo("\nProgress")
        try:
            results = _wait_all(pending, _Progress(echo, sim, started), started + DEMO_DEADLINE_S)
        except TimeoutError as exc:
            echo(f"\npolyv-sms demo: {exc}")
            return 1
        ok = _report(echo, results, Receipts(runtime.ledger))
        keep: list[Any] = []
        ok = _overtake(echo, sim, keep) and ok
        keep.clear()
        # An AsyncResult unsubscribes from its result channel when it is collected: let that
        # happen while the stand-in still answers, not at exit (Celery would retry for 20 s).
        pending.clear()
        gc.collect()
    verdict = "Done" if ok else "Finished with UNEXPECTED outcomes"
    elapsed = time.perf_counter() - started
    echo(f"\n{verdict} in {elapsed:.1f}s. Next: docs/getting-started.md (your own Redis).")
    return 0 if ok else 1
