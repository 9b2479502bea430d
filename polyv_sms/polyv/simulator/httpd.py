"""The HTTP plumbing of :mod:`polyv_sms.polyv.simulator`: answers, the server and its handler.

The server calls ``answer(method, target, content_type, body)`` for every request; the
simulator decides what to answer, this module writes it (or drops the connection).
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import sys
import threading
import uuid
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, NamedTuple

__all__ = [
    "HTML",
    "MAX_BODY_BYTES",
    "SERVE_POLL_INTERVAL_S",
    "Answer",
    "Server",
    "error",
    "json_answer",
]

logger = logging.getLogger("polyv_sms.polyv.simulator")

MAX_BODY_BYTES = 1 << 20
SERVE_POLL_INTERVAL_S = 0.05  # how soon the accept loop notices stop()
JSON, HTML = "application/json; charset=utf-8", "text/html; charset=utf-8"


class Answer(NamedTuple):
    """What to write back: status, body and type, a delay, or drop the connection."""

    status: int
    body: bytes
    content_type: str = JSON
    delay_s: float = 0.0
    drop: bool = False


def json_answer(status: int, payload: object, delay_s: float = 0.0) -> Answer:
    body = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()
    return Answer(status, body, delay_s=delay_s)


def error(status: int, code: int, desc: str, request_id: str = "", delay_s: float = 0.0) -> Answer:
    envelope = {"code": status, "status": "error", "success": False}
    envelope |= {"requestId": request_id or uuid.uuid4().hex, "error": {"code": code, "desc": desc}}
    return json_answer(status, envelope, delay_s)


class Server(ThreadingHTTPServer):
    """The HTTP server: knows its simulator and its open connections (to end them on stop)."""

    daemon_threads = True
    request_queue_size = socket.SOMAXCONN  # the default 5 drops SYNs under load (1 s stalls)

    def __init__(
        self, address: tuple[str, int], answer: Callable[[str, str, str, bytes], Answer]
    ) -> None:
        self.answer, self.stopping = answer, threading.Event()
        self._connections: set[Any] = set()
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        self._connections.add(request)  # set.add/discard are atomic under the GIL
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        self._connections.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        for connection in self._connections.copy():
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], OSError):  # the client left: timeout, drop, stop()
            logger.debug("connection from %s ended: %r", client_address, sys.exc_info()[1])
        else:
            logger.exception("Polyv simulator failed on a request from %s", client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version, server_version, sys_version = "HTTP/1.1", "PolyvSimulator", ""
    disable_nagle_algorithm = True
    wbufsize = 1 << 16  # headers and body leave in one write
    server: Server

    def do_POST(self) -> None:
        length = self.headers.get("Content-Length", "0")
        if "Transfer-Encoding" in self.headers or not (length.isascii() and length.isdigit()):
            length = str(MAX_BODY_BYTES + 1)
        if int(length) > MAX_BODY_BYTES:
            self.close_connection = True
            desc = f"参数校验失败: the body needs a Content-Length of at most {MAX_BODY_BYTES}"
            self._write(error(400, 10001, desc))
            return
        body = self.rfile.read(int(length))
        content_type = self.headers.get("Content-Type", "")
        answer = self.server.answer(self.command, self.path, content_type, body)
        if answer.drop:
            self.close_connection = True
            return
        if answer.delay_s > 0:
            self.server.stopping.wait(answer.delay_s)
        self._write(answer)

    do_GET = do_POST

    def _write(self, answer: Answer) -> None:
        self.send_response_only(answer.status)
        self.send_header("Content-Type", answer.content_type)
        self.send_header("Content-Length", str(len(answer.body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(answer.body)

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s: " + format, self.client_address[0], *args)
