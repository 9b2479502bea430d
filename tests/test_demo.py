"""``polyv-sms demo`` as a newcomer runs it: no Redis, no credentials, no settings."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

POLYV_SMS = str(Path(sys.executable).parent / "polyv-sms")
UNREACHABLE = "redis://127.0.0.1:1/0"


def test_demo_runs_everything_in_process_and_exits_0(tmp_path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SMS_", "POLYV_"))}
    # Settings of the caller's environment would point here; the demo must not use them.
    env |= {
        "SMS_BROKER_URL": UNREACHABLE,
        "SMS_RESULT_BACKEND": UNREACHABLE,
        "SMS_REDIS_URL": UNREACHABLE,
        "POLYV_API_BASE": "http://127.0.0.1:1",
    }
    started = time.monotonic()
    done = subprocess.run(
        [POLYV_SMS, "demo"],
        check=False,
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    took = time.monotonic() - started
    out = done.stdout
    assert done.returncode == 0, (out, done.stderr)
    assert took < 30
    assert "Traceback" not in done.stderr
    assert "ERROR" not in done.stderr

    # Its own stand-ins, on local ports of their own.
    redis_url = re.search(r"Redis stand-in\s+redis://127\.0\.0\.1:(\d+)", out)
    api_base = re.search(r"Polyv simulator\s+http://127\.0\.0\.1:(\d+)", out)
    assert redis_url
    assert api_base
    assert int(redis_url.group(1)) not in (1, 6379)

    # Progress while it runs: Polyv requests, with status 11 answers, and finished messages.
    progress = out.split("\nProgress\n")[1].split("\nOutcomes")[0]
    assert "-> 11 (Aliyun failed, will retry)" in progress
    # The number that always fails: two retries announced, then the attempt that gives up.
    assert progress.count("13800138004 -> 11 (Aliyun failed, will retry)") == 2
    assert progress.count("13800138004 -> 11 (Aliyun failed, giving up after 3 attempts)") == 1
    assert "-> 12 (accepted)" in progress
    assert "message demo-retry done: accepted 1" in progress

    rows = out.split("\nOutcomes")[1].split("\n\n")[0].splitlines()[2:]
    # Which of the three messages to one number is refused depends on the threads' order.
    outcomes = Counter((re.sub(r"-\d$", "", row.split()[0]), row.split()[2]) for row in rows)
    assert outcomes == {
        ("demo-welcome", "accepted"): 1,
        ("demo-welcome", "invalid"): 1,
        ("demo-retry", "accepted"): 1,
        ("demo-limit", "accepted"): 2,
        ("demo-limit", "quota_exceeded"): 1,
        ("demo-failing", "failed"): 1,
    }
    assert re.search(r"demo-retry\s+13800138002\s+accepted\s+12\s+3\s", out)
    assert "Receipts in the ledger" in out
    assert re.search(r"\d{18}\^0\s+13800138002\s+demo-retry", out)
    assert re.search(r"demo-failing\s+13800138004\s+Polyv status 11", out)
    assert "UNEXPECTED" not in out
    assert out.count("\n  ok  ") == 5
    # The lanes scenario: the login code went out while bulk messages were still queued.
    lanes = out.split("\nLanes: ")[1]
    waiting = re.search(
        r"demo-urgent \(lane urgent\): accepted .* (\d+) bulk messages were still", lanes
    )
    assert waiting
    assert int(waiting.group(1)) > 0
    assert "ok  the urgent message overtook the bulk backlog" in lanes
