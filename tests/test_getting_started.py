"""docs/getting-started.md works as written: its shell block runs verbatim, against a
redis-server of the test's own (REDIS_PORT) and a free simulator port (SIM_PORT)."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

from helpers import ROOT, RedisServer, free_port

DOC = ROOT / "docs" / "getting-started.md"


def shell_blocks(text: str) -> list[str]:
    return re.findall(r"^```sh\n(.*?)^```$", text, re.MULTILINE | re.DOTALL)


def test_the_walkthrough_runs_as_written(tmp_path: Path) -> None:
    blocks = shell_blocks(DOC.read_text())
    assert len(blocks) == 1
    script = blocks[0]
    # The reader's own Redis: only through the variable the page tells them to set.
    assert "6379" not in script.replace("${REDIS_PORT:-6379}", "")
    redis_server = RedisServer(tmp_path / "redis").start()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("POLYV_", "SMS_"))}
    env |= {
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
        "REDIS_PORT": str(redis_server.port),
        "SIM_PORT": str(free_port()),
    }
    process = subprocess.Popen(
        ["bash", "-e", "-u", "-o", "pipefail", "-c", script],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = process.communicate(timeout=240)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # whatever the script left running
        redis_server.stop()
    logs = {name: (tmp_path / name).read_text() for name in ("worker.log", "simulator.log")}
    assert process.returncode == 0, (out, err, logs)

    # send --wait: both accepted, the number the simulator failed once after 2 attempts.
    assert re.search(r"13900000001\s+accepted\s+12\s+1\s", out), out
    assert re.search(r"13900000002\s+accepted\s+12\s+2\s", out), out
    # The Python API's result, then the look-ups.
    assert re.search(r"^13900000003 accepted \d+\^0$", out, re.MULTILINE), out
    assert "message  hello-1" in out
    assert "13900000002: 1 of 10 SMS today" in out
    assert re.search(r"account\s+3 of 2000 SMS", out), out
    assert "Traceback" not in err + logs["worker.log"]
    assert "not-a-real-secret" not in out + err + logs["worker.log"] + logs["simulator.log"]
    # The worker stopped warm.
    assert "Warm shutdown" in logs["worker.log"] or "worker: Warm" in logs["worker.log"]
