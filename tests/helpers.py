"""Real parts for tests: a private redis-server and a worker subprocess."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING
from zoneinfo import ZoneInfo

import redis

from polyv_sms.config import Settings
from polyv_sms.ledger import Ledger, Reservation, Settlement, build_ledger, connect_redis
from polyv_sms.ledger.receipts import Receipts

if TYPE_CHECKING:  # the journal module is imported only by the tests that use it
    from polyv_sms.ledger.journal import Journal, JournalEntry

REDIS_SERVER = shutil.which("redis-server") or "redis-server"
ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.02, what: str = "condition"):
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class RedisServer:
    """A redis-server of the test's own, on a free port, in its own directory."""

    def __init__(self, directory: Path, *, appendonly: bool = False, port: int | None = None):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.appendonly = appendonly
        self.port = port or free_port()
        self.process: subprocess.Popen[bytes] | None = None

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def client(self, db: int = 0) -> redis.Redis:
        return redis.Redis(port=self.port, db=db, decode_responses=True, socket_timeout=5)

    def start(self) -> RedisServer:
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
                "yes" if self.appendonly else "no",
                "--appendfsync",
                "always",
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

        wait_for(pong, 10, what=f"redis-server on port {self.port}")
        return self

    def stop(self, *, kill: bool = False) -> None:
        if self.process is None:
            return
        if kill:
            self.process.kill()
        else:
            self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
        self.process = None

    def restart(self, *, kill: bool = False, down_for: float = 0.0) -> None:
        self.stop(kill=kill)
        time.sleep(down_for)
        self.start()


def empty_broker(server: RedisServer) -> None:
    """Drop every queued, unacknowledged or result key of the broker db (keep kombu's bindings:
    the test process's producer declared its queue once and relies on them)."""
    with server.client(0) as broker:
        for key in broker.scan_iter():
            if not key.startswith("_kombu.binding"):
                broker.delete(key)


def record_accepted(
    journal: Journal,
    ledger: Ledger,
    message_id: str,
    number: str,
    serial: str,
    *,
    token: str,
    now: float,
    retry_at: float | None = None,
    meta: Mapping[str, object] | None = None,
) -> tuple[Reservation, JournalEntry | None]:
    """Reserve ``number`` under ``token`` and journal Polyv's 12 for it, not yet settled."""
    reserved = ledger.reserve(message_id, [number], token=token, meta=meta)
    entry = journal.record(
        message_id,
        [Settlement(number, "accepted", 12, serial, attempt=1)],
        days={number: reserved.states[0].day},
        token=token,
        retry_at=now if retry_at is None else retry_at,
        now=now,
    )
    return reserved, entry


def receipts_for(app_id: str, server: RedisServer) -> Receipts:
    """Look-ups on the ledger of one account in the session's redis-server (db 2)."""
    settings = Settings.from_env({"POLYV_APP_ID": app_id, "SMS_REDIS_URL": server.url(2)})
    return Receipts(build_ledger(settings, connect_redis(settings.require_redis_url())))


class WorkerProcess:
    """``celery -A polyv_sms.worker worker -Q sms`` in a subprocess of its own session."""

    def __init__(
        self,
        env: dict[str, str],
        log_path: Path,
        *,
        concurrency: int = 4,
        name: str = "w",
        extra_args: tuple[str, ...] = (),
    ):
        self.env = env
        self.log_path = Path(log_path)
        self.concurrency = concurrency
        self.name = name
        self.extra_args = extra_args
        self.process: subprocess.Popen[bytes] | None = None
        self._log = None

    def start(self, *, wait: bool = True) -> WorkerProcess:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self._offset = self.log_path.stat().st_size
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "polyv_sms.worker",
                "worker",
                "-Q",
                "sms",
                "-P",
                "threads",
                "-c",
                str(self.concurrency),
                "-n",
                f"{self.name}-{os.getpid()}-{time.monotonic_ns()}@%h",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
                "--loglevel",
                "INFO",
                *self.extra_args,
            ],
            env=self.env,
            cwd=str(ROOT),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        if wait:
            self.wait_ready()
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 30.0) -> None:
        def ready() -> bool:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"worker exited with {self.process.returncode}:\n{self.log()}")
            return " ready." in self.log()[self._offset :]

        wait_for(ready, timeout, interval=0.05, what="the worker to be ready")

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        code = self.process.returncode
        self._close()
        return code

    def kill(self) -> None:
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)
        self._close()

    def _close(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


class CannedServer:
    """A tiny HTTP server answering every request with a canned body (not our simulator)."""

    def __init__(self, status: int, body: bytes, content_type: str = "application/json"):
        import http.server
        import threading

        canned = self
        self.requests: list[dict[str, object]] = []

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                canned.requests.append(
                    {
                        "path": self.path,
                        "headers": dict(self.headers),
                        "header_lines": list(self.headers.items()),  # repeats included
                        "body": self.rfile.read(length),
                    }
                )
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> CannedServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


def read_http_request(conn: socket.socket) -> bytes:
    """Read one HTTP/1.1 message, request or answer (headers, then a Content-Length body),
    from ``conn``."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    while len(body) < length:
        chunk = conn.recv(65536)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body


class RawServer:
    """A TCP server whose handler writes raw bytes: truncated bodies, stalls, broken TLS.

    Every connection runs ``handler(conn, server)`` in a thread of its own and is closed when
    the handler returns. With ``tls``, the connection is wrapped (server side) first. Handlers
    that stall should wait on ``server.stopped`` so that leaving the ``with`` block ends them.
    """

    def __init__(
        self,
        handler: Callable[[socket.socket, RawServer], None],
        *,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.handler = handler
        self.tls = tls
        self.connections = 0
        self.stopped = threading.Event()
        self._threads: list[threading.Thread] = []
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(16)
        self._listener.settimeout(0.05)
        self.port = int(self._listener.getsockname()[1])
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        self._acceptor = threading.Thread(target=self._accept, daemon=True)

    def __enter__(self) -> RawServer:
        self._acceptor.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopped.set()
        self._acceptor.join(5)
        for thread in self._threads:
            thread.join(5)
        self._listener.close()

    def _accept(self) -> None:
        while not self.stopped.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(10)
        sock = conn
        try:
            if self.tls is not None:
                sock = self.tls.wrap_socket(conn, server_side=True)
            self.handler(sock, self)
        except OSError:  # the client gave up, or the TLS handshake failed: expected here
            pass
        finally:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
            conn.close()


def self_signed_tls(directory: Path) -> tuple[ssl.SSLContext, Path]:
    """A server context for 127.0.0.1 with a fresh self-signed certificate, and its path."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    return context, cert


#: The default SMS_TIMEZONE: quota days turn at its midnight.
TZ = ZoneInfo("Asia/Shanghai")


class Clock:
    """A clock the test sets (``clock.now = ...``); called, it says the time."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now
