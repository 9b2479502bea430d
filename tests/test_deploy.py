"""deploy/supervisord.conf under real supervisord: two workers, warm stops, restarts.

Each test starts supervisord from the repository's config file with the test's account,
simulator and the session's private redis-server. The workers run ``polyv-sms worker``.
"""

from __future__ import annotations

import configparser
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import worker_env
from helpers import ROOT, empty_broker, receipts_for, wait_for

from polyv_sms import send_sms
from polyv_sms.config import Settings
from polyv_sms.worker import celery_config

BIN = Path(sys.executable).parent
CONFIG = "deploy/supervisord.conf"
PROGRAM = "polyv-sms-worker"
TIMEOUT = 60


def _tool(name: str) -> str:
    found = BIN / name if (BIN / name).exists() else shutil.which(name)
    assert found, f"{name} is not installed"
    return str(found)


def free_port_pair() -> int:
    """A port p with p and p + 1 free (worker 0 and worker 1 metrics)."""
    for _ in range(50):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        with contextlib.suppress(OSError), socket.socket() as other:
            other.bind(("127.0.0.1", port + 1))
            return port
    raise AssertionError("no free pair of ports")


class Supervisor:
    """A supervisord process started from the repository's config file."""

    def __init__(self, env: dict[str, str], run_dir: Path, *, launcher: bool = False) -> None:
        self.env = env
        self.run_dir = run_dir
        self.launcher = launcher
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Supervisor:
        if self.launcher:
            command = [_tool("polyv-sms"), "supervisord", "-n"]
        else:
            command = [_tool("supervisord"), "-n", "-c", CONFIG]
        self.output = open(self.run_dir.parent / "supervisord.out", "ab")  # noqa: SIM115
        self.process = subprocess.Popen(
            command,
            env=self.env,
            cwd=ROOT,
            stdout=self.output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.wait_ready(1)
        return self

    def wait_ready(self, times: int) -> None:
        """Wait until both workers have logged ``ready.`` ``times`` times (once per start)."""
        wait_for(lambda: self._ready(0, times) and self._ready(1, times), 30, 0.05, "workers")

    def _ready(self, index: int, times: int) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            out = (self.run_dir.parent / "supervisord.out").read_text(errors="replace")
            raise AssertionError(f"supervisord exited with {self.process.returncode}:\n{out}")
        return self.log(index).count(" ready.") >= times

    def log(self, index: int) -> str:
        path = self.run_dir / f"{PROGRAM}_{index}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def holder(self, task_id: str) -> int:
        """The process number of the worker that received a task, from the logs (which
        supervisord writes a moment after the worker prints)."""

        def received(index: int) -> bool:
            return f"[{task_id}] received" in self.log(index)

        wait_for(lambda: received(0) or received(1), 5, what=f"a worker to log task {task_id}")
        return 0 if received(0) else 1

    def ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        if self.launcher:
            command = [_tool("polyv-sms"), "supervisorctl", *args]
        else:
            command = [_tool("supervisorctl"), "-c", CONFIG, *args]
        return subprocess.run(
            command,
            check=False,
            env=self.env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )

    def states(self) -> dict[str, str]:
        lines = self.ctl("status").stdout.splitlines()
        return {line.split()[0]: line.split()[1] for line in lines if line.strip()}

    def pid(self, index: int) -> int:
        out = self.ctl("pid", f"{PROGRAM}:{PROGRAM}_{index}").stdout.strip()
        return int(out) if out.isdigit() else 0

    def terminate(self, timeout: float = TIMEOUT) -> float:
        """SIGTERM to supervisord, as ``docker stop`` does; returns how long it took to exit."""
        assert self.process is not None
        started = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout)
        return time.monotonic() - started

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            pids = [self.pid(0), self.pid(1)]
            try:
                self.terminate(30)
            except subprocess.TimeoutExpired:
                for pid in [*pids, self.process.pid]:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                self.process.wait(10)
        self.output.close()


@pytest.fixture
def supervise(account, sim, redis_server) -> Iterator:
    """Start supervisord: ``supervise(launcher=False, **env overrides)``."""
    started: list[Supervisor] = []
    temp = Path(tempfile.mkdtemp(prefix="sms-sup-"))  # short: a unix socket path is limited

    def start(*, launcher: bool = False, **overrides: object) -> Supervisor:
        env = worker_env(account, sim, redis_server, SMS_WORKER_CONCURRENCY=2, **overrides)
        env["PATH"] = os.pathsep.join([str(BIN), env.get("PATH", "")])
        if launcher:  # SMS_RUN_DIR unset: the launcher's default under the temp dir
            env["TMPDIR"] = str(temp)
            run_dir = temp / f"polyv-sms-{os.getuid()}"
        else:
            run_dir = temp / "run"
            run_dir.mkdir()
            env["SMS_RUN_DIR"] = str(run_dir)
        supervisor = Supervisor(env, run_dir, launcher=launcher)
        started.append(supervisor)
        return supervisor.start()

    yield start
    for supervisor in started:
        supervisor.close()
    empty_broker(redis_server)
    shutil.rmtree(temp, ignore_errors=True)


def _in_flight(sim, number: str, supervisor: Supervisor) -> None:
    try:
        wait_for(lambda: sim.received(number) == 1, 30, what=f"{number} to reach the simulator")
    except AssertionError as exc:
        logs = "\n".join(f"--- worker {i}:\n{supervisor.log(i)[-3000:]}" for i in (0, 1))
        raise AssertionError(f"{exc}\n{supervisor.ctl('status').stdout}\n{logs}") from None


@pytest.mark.slow
def test_stops_let_in_flight_sends_finish(supervise, sim, account, redis_server) -> None:
    metrics_port = free_port_pair()
    supervisor = supervise(SMS_METRICS_PORT=metrics_port)
    assert set(supervisor.states()) == {f"{PROGRAM}:{PROGRAM}_0", f"{PROGRAM}:{PROGRAM}_1"}
    for name in ("supervisord.log", "supervisord.pid", "supervisor.sock"):
        assert (supervisor.run_dir / name).exists(), name
    # Each worker serves metrics on SMS_METRICS_PORT + its process number.
    for port in (metrics_port, metrics_port + 1):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as page:
            assert b"polyv_sms_outcomes_total" in page.read()

    sim.set_faults(latency_s=1.5)
    first = send_sms.delay(["13900000701"], ["code"], ["1"], message_id="deploy-stop-1")
    _in_flight(sim, "13900000701", supervisor)
    started = time.monotonic()
    stopped = supervisor.ctl("stop", "all")
    took = time.monotonic() - started
    assert stopped.returncode == 0, stopped.stderr
    # The stop waited for the send: its result was stored before the workers exited.
    assert first.ready()
    assert took < 15
    result = first.get(timeout=1)
    assert result["results"][0]["outcome"] == "accepted"
    assert set(supervisor.states().values()) == {"STOPPED"}
    receipt = receipts_for(account[0], redis_server).receipt(result["results"][0]["serial_no"])
    assert receipt is not None
    assert receipt["message_id"] == "deploy-stop-1"
    assert sim.received("13900000701") == 1

    started_again = supervisor.ctl("start", "all")
    assert started_again.returncode == 0, started_again.stderr
    assert set(supervisor.states().values()) == {"RUNNING"}
    supervisor.wait_ready(2)

    # SIGTERM to supervisord (docker stop): the same warm shutdown of both workers.
    second = send_sms.delay(["13900000702"], ["code"], ["1"], message_id="deploy-stop-2")
    _in_flight(sim, "13900000702", supervisor)
    assert supervisor.terminate() < 15
    assert supervisor.process is not None
    assert supervisor.process.returncode == 0
    assert second.ready()
    assert second.get(timeout=1)["results"][0]["outcome"] == "accepted"
    assert sim.received("13900000702") == 1
    for index in (0, 1):
        assert "Warm shutdown" in supervisor.log(index)


@pytest.mark.slow
def test_a_killed_worker_is_restarted_and_its_message_completes(
    supervise, sim, account, redis_server
) -> None:
    # The launcher: no SMS_RUN_DIR, so the run directory is made under the temp dir.
    supervisor = supervise(
        launcher=True, SMS_VISIBILITY_TIMEOUT=3, POLYV_HTTP_TIMEOUT=1, SMS_REDIS_OUTAGE=1
    )
    assert (supervisor.run_dir / "supervisor.sock").exists()
    sim.set_faults(latency_s=0.8)
    number = "13900000711"
    pending = send_sms.delay([number], ["code"], ["1"], message_id="deploy-kill-1")
    # Which worker and pid before the request is in flight: looking them up takes supervisorctl
    # calls, and on a loaded machine the 0.8-s answer could arrive before the kill.
    holder = supervisor.holder(pending.id)
    killed = supervisor.pid(holder)
    _in_flight(sim, number, supervisor)
    os.kill(killed, signal.SIGKILL)
    sim.set_faults(latency_s=0)

    restarted = wait_for(
        lambda: supervisor.pid(holder) not in (0, killed) and supervisor.pid(holder),
        20,
        0.2,
        "supervisord to restart the killed worker",
    )
    assert restarted != killed
    # Redelivered after the visibility timeout, sent again once the dead run's lease expired.
    result = pending.get(timeout=TIMEOUT)
    outcome = result["results"][0]
    assert outcome["outcome"] == "accepted"
    assert outcome["attempts"] == 2
    ledger = receipts_for(account[0], redis_server)
    assert ledger.receipt(outcome["serial_no"])["message_id"] == "deploy-kill-1"
    assert ledger.phone(number)["today"]["count"] == 1  # the quota unit was not taken twice
    assert wait_for(lambda: set(supervisor.states().values()) == {"RUNNING"}, 20, 0.2)


def test_supervisord_conf_follows_the_design() -> None:
    parser = configparser.RawConfigParser(inline_comment_prefixes=(";",))
    parser.read(ROOT / CONFIG)
    program = parser[f"program:{PROGRAM}"]
    assert program["numprocs"] == "2"
    assert program["process_name"] == "%(program_name)s_%(process_num)d"
    assert program["command"].split()[:2] == ["polyv-sms", "worker"]
    assert 'SMS_WORKER_INDEX="%(process_num)d"' in program["environment"]
    assert program["stopsignal"] == "TERM"
    assert program["stopasgroup"] == "false"
    assert program["killasgroup"] == "true"
    assert program["autorestart"] == "true"
    # Long enough for the slowest message to finish (warm shutdown) before a SIGKILL.
    defaults = Settings()
    soft_shutdown = celery_config(defaults)["worker_soft_shutdown_timeout"]
    assert int(program["stopwaitsecs"]) >= defaults.task_time_limit_s + soft_shutdown + 30
    # Everything it writes is under SMS_RUN_DIR; nothing else comes from the environment.
    text = (ROOT / CONFIG).read_text()
    values = "\n".join(v for s in parser.sections() for _, v in parser.items(s))
    assert set(re.findall(r"%\(ENV_(\w+)\)s", values)) == {"SMS_RUN_DIR"}
    for section, option in [
        ("supervisord", "logfile"),
        ("supervisord", "pidfile"),
        ("unix_http_server", "file"),
        (f"program:{PROGRAM}", "stdout_logfile"),
    ]:
        assert parser[section][option].startswith("%(ENV_SMS_RUN_DIR)s/"), (section, option)
    assert "/work/" not in text
