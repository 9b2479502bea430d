"""The processes a benchmark run starts: private redis-servers, the Polyv simulator and Celery
workers, each in a subprocess of its own (so that none of them shares a GIL with the driver).

Nothing here touches a Redis the run did not start itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import redis
from celery import Celery

ROOT = Path(__file__).resolve().parent.parent
REDIS_SERVER = shutil.which("redis-server") or "redis-server"
_T = TypeVar("_T")


def exit_on_sigterm() -> None:
    """Turn SIGTERM (``timeout``, a supervisor) into SystemExit, so that ``finally`` blocks stop
    the servers and workers, which run in sessions of their own and would outlive the driver."""

    def stop(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(predicate: Callable[[], _T], timeout: float, what: str, interval: float = 0.02) -> _T:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


def _terminate(process: subprocess.Popen[bytes], *, group: bool, timeout: float = 20.0) -> None:
    """SIGTERM (the process group when ``group``), then SIGKILL if it does not stop."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        if group:
            os.killpg(process.pid, signal.SIGTERM)
        else:
            process.terminate()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            if group:
                os.killpg(process.pid, signal.SIGKILL)
            else:
                process.kill()
        process.wait(10)


_TICKS_PER_S = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads) so far; 0 when unknown."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICKS_PER_S


class RedisServer:
    """A redis-server of the benchmark's own, on a free port, without persistence."""

    def __init__(self, directory: Path, name: str) -> None:
        self.directory = directory / name
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    def url(self, db: int = 0) -> str:
        """``redis://127.0.0.1:<port>/<db>``."""
        return f"redis://127.0.0.1:{self.port}/{db}"

    def client(self, db: int = 0) -> redis.Redis:
        """A fresh client (strings decoded)."""
        return redis.Redis(port=self.port, db=db, decode_responses=True, socket_timeout=30)

    def version(self) -> str:
        """The server's ``redis_version``."""
        with self.client() as client:
            return str(client.info("server")["redis_version"])

    def start(self) -> RedisServer:
        """Start the server and wait until it answers PING."""
        self.process = subprocess.Popen(
            [
                REDIS_SERVER,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.directory),
                "--logfile",
                str(self.directory / "redis.log"),
                "--maxmemory-policy",
                "noeviction",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

        def pong() -> bool:
            with contextlib.suppress(redis.RedisError), self.client() as probe:
                return bool(probe.ping())
            return False

        wait_for(pong, 10, f"redis-server on port {self.port}")
        return self

    def stop(self) -> None:
        """Stop the server."""
        if self.process is not None:
            _terminate(self.process, group=False)
            self.process = None


class SimulatorProcess:
    """The Polyv simulator (:class:`polyv_sms.polyv.simulator.PolyvSimulator`) in a subprocess,
    driven through its control endpoints (``/_sim/faults``, ``/_sim/reset``, ``/_sim/stats``).
    """

    def __init__(self, app_id: str, secret: str, log_path: Path) -> None:
        self.app_id = app_id
        self.secret = secret
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> SimulatorProcess:
        """Start serving and wait for ``/_sim/health``."""
        env = dict(os.environ)
        env |= {
            "BENCH_SIM_APP_ID": self.app_id,
            "BENCH_SIM_SECRET": self.secret,
            "BENCH_SIM_PORT": str(self.port),
            "PYTHONPATH": _pythonpath(env),
        }
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "benchmarks.simserver"],
                env=env,
                cwd=str(ROOT),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

        def healthy() -> bool:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"the simulator exited; see {self.log_path}")
            with contextlib.suppress(OSError):
                return bool(self._call("GET", "/_sim/health")["ok"])
            return False

        wait_for(healthy, 15, "the simulator")
        return self

    def _call(self, method: str, path: str, payload: object = None) -> Any:
        data = None if payload is None else json.dumps(payload).encode()
        request = urllib.request.Request(
            self.url + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=10) as answer:
            return json.loads(answer.read())

    def set_faults(self, **changes: object) -> None:
        """``PolyvSimulator.set_faults`` over HTTP (e.g. ``latency_s=0.05``)."""
        self._call("POST", "/_sim/faults", changes)

    def reset(self) -> None:
        """Forget records and counters (keeps the faults)."""
        self._call("POST", "/_sim/reset", {})

    def sent(self) -> list[dict[str, Any]]:
        """The recorded send requests (``GET /_sim/sent``), oldest first."""
        return list(self._call("GET", "/_sim/sent")["requests"])

    def stats(self) -> dict[str, Any]:
        """Counters since the last reset."""
        return dict(self._call("GET", "/_sim/stats"))

    def stop(self) -> None:
        """Stop the simulator."""
        if self.process is not None:
            _terminate(self.process, group=True)
            self.process = None


def _pythonpath(env: dict[str, str], root: Path = ROOT) -> str:
    """PYTHONPATH with ``root`` first, so that its ``polyv_sms`` and ``benchmarks`` import."""
    return os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH", "")) if p)


class WorkerProcess:
    """``celery -A <app> worker -Q <queue> -P threads -c <n>`` in a session of its own."""

    def __init__(
        self,
        app: str,
        queue: str,
        concurrency: int,
        env: dict[str, str],
        log_path: Path,
        *,
        loglevel: str | None = None,
        root: Path = ROOT,
    ) -> None:
        self.app = app
        self.queue = queue
        self.concurrency = concurrency
        self.root = root
        self.env = env | {"PYTHONPATH": _pythonpath(env, root)}
        self.log_path = log_path
        self.loglevel = loglevel
        self.name = f"{queue}-{os.getpid()}-{time.monotonic_ns()}@{socket.gethostname()}"
        self.process: subprocess.Popen[bytes] | None = None
        self._offset = 0

    def command(self) -> list[str]:
        """The worker's command line."""
        command = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            self.app,
            "worker",
            "-Q",
            self.queue,
            "-P",
            "threads",
            "-c",
            str(self.concurrency),
            "-n",
            self.name,
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
        ]
        if self.loglevel:
            command += ["--loglevel", self.loglevel]
        return command

    def start(self) -> WorkerProcess:
        """Start the worker (call :meth:`wait_ready` next)."""
        self._offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.command(),
                env=self.env,
                cwd=str(self.root),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    def log(self) -> str:
        """What the worker wrote since it started."""
        return self.log_path.read_text(errors="replace")[self._offset :]

    def check_alive(self) -> None:
        """Fail with the worker's log when it exited."""
        assert self.process is not None
        if self.process.poll() is not None:
            raise RuntimeError(
                f"worker {self.app} exited with {self.process.returncode}:\n{self.log()[-3000:]}"
            )

    def wait_ready(self, control: Celery, timeout: float = 60.0) -> None:
        """Wait until the worker answers a remote-control ``ping`` (it consumes by then)."""

        def ready() -> bool:
            self.check_alive()
            return bool(control.control.ping(destination=[self.name], timeout=0.5))

        wait_for(ready, timeout, f"worker {self.app} to be ready", interval=0.05)

    def stop(self) -> None:
        """Warm shutdown (SIGTERM to the group), SIGKILL after 20 s."""
        if self.process is not None:
            _terminate(self.process, group=True)
            self.process = None
