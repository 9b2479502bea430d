"""A local stand-in for Polyv's ``POST /live/v4/user/sms/send`` (``docs/polyv-sms-api.md``).

A real HTTP/1.1 server (standard library, keep-alive). Operators use it to try a deployment
without sending SMS; tests, the demo and benchmarks drive every path through it. Checks, in
order, each failure answered with Polyv's error envelope (``code`` = HTTP status):

1. injected :class:`Faults`: dropped connection; HTTP 500 (code 500); an HTML page with HTTP 200;
   rate limiting (HTTP 403, code 10005 ``qps exceeds number of calls``). Nothing is sent;
2. a missing ``appId``/``timestamp``/``sign`` parameter: 400, code 10002;
3. an unknown ``appId``: 400, code 20001 ``application not found.``;
4. a timestamp that is not 13 digits, or further than ``timestamp_window_s`` from the clock:
   400, code 20003;
5. a wrong sign (or unknown ``signatureMethod``): 403, code 20002;
6. a ``Content-Type`` that is not ``application/json``, or a bad body: 400, code 10001.

Per number: -2 not 11 ASCII digits; -1 the number already had ``phone_daily_limit`` accepted
sends today or **[ours]** the account had ``account_daily_limit`` (Polyv's page does not say);
11 an injected failure (not counted against limits); else 12 and a ``serialNo`` (18 digits and
``^0``, unique for the simulator's lifetime). "Today" is the calendar day in ``timezone``.

Control endpoints (JSON, not recorded, never faulted): ``GET /_sim/health``,
``GET /_sim/sent[?since=<received_at>]``, ``GET /_sim/stats``, ``GET``/``POST /_sim/faults``,
``POST /_sim/reset``.
"""

from __future__ import annotations

import hmac
import json
import logging
import random
import re
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Mapping
from dataclasses import asdict, fields, replace
from datetime import datetime
from itertools import accumulate
from typing import Any
from urllib.parse import parse_qsl
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from polyv_sms.polyv.signing import SIGN_METHODS, sign
from polyv_sms.polyv.simulator.faults import Faults, Tally
from polyv_sms.polyv.simulator.httpd import (
    HTML,
    SERVE_POLL_INTERVAL_S,
    Answer,
    Server,
    error,
    json_answer,
)

__all__ = ["SEND_PATH", "Faults", "PolyvSimulator"]

logger = logging.getLogger(__name__)

SEND_PATH = "/live/v4/user/sms/send"
MAX_NUMBERS_PER_REQUEST = 200
MAX_RECORDS = 100_000

_GARBAGE_PAGE = b"<html><body><h1>502 Bad Gateway</h1><hr>nginx</body></html>\n"
_FAULT_ERRORS = {
    "http500": (500, 500, "internal server error"),
    "rate_limit": (403, 10005, "qps exceeds number of calls"),
}
_PHONE = re.compile(r"[0-9]{11}")
_SERIAL_MODULUS, _SERIAL_STEP = 10**18, 413_839_604_925_160_471  # coprime: a permutation
_INVALID_JSON = object()


def _load_json(body: bytes) -> object:
    try:
        return json.loads(body)
    except ValueError:  # UnicodeDecodeError included
        return _INVALID_JSON


def _listed(payload: object, key: str) -> list[Any]:
    value = payload.get(key) if isinstance(payload, dict) else None
    return list(value) if isinstance(value, list) else []


def _as_text(item: object) -> str:
    """A phone number as received: strings as they are, anything else as JSON."""
    return item if isinstance(item, str) else json.dumps(item, ensure_ascii=False)


def _mask(number: str) -> str:
    return f"{number[:3]}****{number[-4:]}" if len(number) >= 8 else "****"


def _copy_record(record: dict[str, Any]) -> dict[str, Any]:
    lists = ("numbers", "template_param_names", "template_param_values")
    copy = record | {key: list(record[key]) for key in lists}
    return copy | {"results": [dict(result) for result in record["results"]]}


class PolyvSimulator:
    """An HTTP server that answers like Polyv's SMS endpoint (see the module docstring).

    Args:
        app_id: the one appId it knows.
        app_secret: that app's secret, to check signs; never logged nor recorded.
        host: address to bind.
        port: port to bind; 0 picks a free one (read :attr:`port` after :meth:`start`).
        phone_daily_limit: status-12 answers per number and day.
        account_daily_limit: status-12 answers per account and day.
        timezone: the zone whose calendar day "today" means.
        timestamp_window_s: how far the ``timestamp`` parameter may be from the clock.
        clock: seconds since the epoch; tests inject their own.
        faults: faults to inject from the start.
        other_accounts: further ``{appId: secret}`` it knows (several accounts behind one
            endpoint, like Polyv); each has its own account total, numbers count across all.
    """

    def __init__(
        self,
        app_id: str,
        app_secret: str,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        phone_daily_limit: int = 10,
        account_daily_limit: int = 2000,
        timezone: str = "Asia/Shanghai",
        timestamp_window_s: float = 180.0,
        clock: Callable[[], float] = time.time,
        faults: Faults | None = None,
        other_accounts: Mapping[str, str] | None = None,
    ) -> None:
        if not app_id or not app_secret:
            raise ValueError("app_id and app_secret must not be empty")
        if phone_daily_limit < 0 or account_daily_limit < 0 or timestamp_window_s <= 0:
            raise ValueError("daily limits must be >= 0 and timestamp_window_s > 0")
        try:
            self._tz = ZoneInfo(timezone)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"timezone: unknown time zone {timezone!r}") from exc
        self._app_id, self._app_secret, self._host, self._port = app_id, app_secret, host, port
        self._secrets = {**(other_accounts or {}), app_id: app_secret}
        self._phone_limit, self._account_limit = phone_daily_limit, account_daily_limit
        self._window_s, self._clock = timestamp_window_s, clock
        self._faults = replace(faults) if faults is not None else Faults()
        self._lock = threading.Lock()
        self._rng = random.Random(self._faults.seed)
        self._serial_offset = random.Random(self._faults.seed).randrange(_SERIAL_MODULUS)
        self._serials_issued = 0
        self._records: deque[dict[str, Any]] = deque(maxlen=MAX_RECORDS)
        self._tally = Tally(dict(self._faults.fail_numbers))
        self._server: Server | None = None
        self._serving_thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The bound port while serving, else the configured one."""
        return int(self._server.server_address[1]) if self._server else self._port

    @property
    def url(self) -> str:
        """``http://host:port``, the base URL for clients."""
        return f"http://{self._host}:{self.port}"

    def _bind(self, *, background: bool) -> Server:
        with self._lock:
            if self._server is not None:
                raise RuntimeError("the simulator is already serving; call stop() first")
            server = self._server = Server((self._host, self._port), self._answer)
            self._serving_thread = threading.current_thread()
            if background:
                self._serving_thread = threading.Thread(
                    target=server.serve_forever,
                    args=(SERVE_POLL_INTERVAL_S,),
                    name=f"polyv-simulator-{server.server_address[1]}",
                    daemon=True,
                )
                self._serving_thread.start()
        logger.info("Polyv simulator listening on %s (appId %s)", self.url, self._app_id)
        return server

    def start(self) -> PolyvSimulator:
        """Bind and serve in a daemon thread; returns ``self``.

        Raises:
            RuntimeError: it is already serving.
        """
        self._bind(background=True)
        return self

    def serve_forever(self) -> None:
        """Bind and serve in the calling thread until :meth:`stop` or KeyboardInterrupt."""
        server = self._bind(background=False)
        try:
            server.serve_forever()
        finally:
            self.stop()

    def stop(self) -> None:
        """Stop serving, end open connections, close the socket. Idempotent."""
        with self._lock:
            server, self._server = self._server, None
            thread, self._serving_thread = self._serving_thread, None
        if server is None:
            return
        server.stopping.set()  # wakes handlers that sleep on injected latency
        if thread is not threading.current_thread():
            server.shutdown()
        server.close_connections()
        server.server_close()  # joins the handler threads
        logger.info("Polyv simulator on port %s stopped", server.server_address[1])

    def __enter__(self) -> PolyvSimulator:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def faults(self) -> Faults:
        """A copy of the faults in force."""
        with self._lock:
            return replace(self._faults)

    def set_faults(self, **changes: object) -> Faults:
        """Change fault fields at run time; returns a copy of the new :class:`Faults`.

        Setting ``fail_numbers`` restarts its progress; setting ``seed`` reseeds.

        Raises:
            ValueError: a field is unknown (named in the message) or a value is invalid.
        """
        known = [f.name for f in fields(Faults)]
        unknown = sorted(set(changes) - set(known))
        if unknown:
            raise ValueError(f"unknown fault field {', '.join(unknown)}; known: {', '.join(known)}")
        with self._lock:
            values: dict[str, Any] = {name: getattr(self._faults, name) for name in known}
            new = self._faults = Faults(**values | changes)
            if "fail_numbers" in changes:
                self._tally.fail_remaining = dict(new.fail_numbers)
            if "seed" in changes:
                self._rng.seed(new.seed)
        logger.info("Polyv simulator faults changed: %s", ", ".join(sorted(changes)))
        return replace(new)

    def reset(self) -> None:
        """Forget records, counters and ``fail_numbers`` progress; reseed; keep the faults."""
        with self._lock:
            self._records.clear()
            self._tally = Tally(dict(self._faults.fail_numbers))
            if self._faults.seed is not None:
                self._rng.seed(self._faults.seed)

    def set_clock(self, clock: Callable[[], float]) -> None:
        """Replace the clock (seconds since the epoch), e.g. to cross midnight in a test."""
        with self._lock:
            self._clock = clock

    def requests(self, since: float | None = None) -> list[dict[str, object]]:
        """Copies of the recorded send requests (the last ``MAX_RECORDS``), oldest first.

        Args:
            since: keep only those with a ``received_at`` at or after this.
        """
        with self._lock:
            records = [r for r in self._records if since is None or r["received_at"] >= since]
        return [_copy_record(record) for record in records]

    def accepted(self, phone_number: str | None = None) -> int:
        """How many status-12 answers were given, to one number or in all."""
        with self._lock:
            tally = self._tally
            return tally.by_status[12] if phone_number is None else tally.accepted[phone_number]

    def received(self, phone_number: str | None = None) -> int:
        """How many times one number, or any, arrived in a processed request."""
        with self._lock:
            tally = self._tally
            return tally.by_status.total() if phone_number is None else tally.received[phone_number]

    def stats(self) -> dict[str, object]:
        """Counters since the last reset, as ``GET /_sim/stats`` answers them."""
        with self._lock:
            tally = self._tally
            by_status = {str(status): n for status, n in sorted(tally.by_status.items())}
            return {
                "requests": tally.requests,
                "accepted": tally.by_status[12],
                "by_status": by_status,
                "by_outcome": dict(sorted(tally.by_outcome.items())),
                "faults": asdict(self._faults),
            }

    def _answer(self, method: str, target: str, content_type: str, body: bytes) -> Answer:
        path, _, query = target.partition("?")
        route = f"{method} {path}"
        if route == f"POST {SEND_PATH}":
            return self._send(query, content_type, body)
        if route == "GET /_sim/sent":
            try:
                since = float(dict(parse_qsl(query)).get("since", "-inf"))
            except ValueError:
                return error(400, 10001, "since must be a number (a received_at)")
            return json_answer(200, {"requests": self.requests(since)})
        if route == "POST /_sim/faults":
            try:
                changes = _load_json(body)
                if not isinstance(changes, dict):
                    raise ValueError("the body must be a JSON object of fault fields")
                return json_answer(200, asdict(self.set_faults(**changes)))
            except ValueError as exc:
                return error(400, 10001, str(exc))
        if route == "POST /_sim/reset":
            self.reset()
            return json_answer(200, {"ok": True})
        if route == "GET /_sim/health":
            return json_answer(200, {"ok": True})
        if route == "GET /_sim/stats":
            return json_answer(200, self.stats())
        if route == "GET /_sim/faults":
            return json_answer(200, asdict(self.faults))
        return error(404, 404, f"not found: {route}")

    def _send(self, query: str, content_type: str, body: bytes) -> Answer:
        received_at, request_id = self._clock(), uuid.uuid4().hex
        params = dict(parse_qsl(query, keep_blank_values=True))
        payload = _load_json(body)
        record: dict[str, Any] = {
            "request_id": request_id,
            "received_at": received_at,
            "path": SEND_PATH,  # never the query: it carries the sign
            "app_id": params.get("appId"),
            "timestamp": params.get("timestamp"),
            "http_status": 200,
            "fault": None,
            "error_code": None,
            "numbers": [_as_text(n) for n in _listed(payload, "phoneNumbers")],
            "results": [],
            "template_param_names": _listed(payload, "templateParamNames"),
            "template_param_values": _listed(payload, "templateParamValues"),
        }
        with self._lock:
            fault, delay_s = self._draw_fault()
        if fault == "drop":
            self._record(record | {"fault": fault, "http_status": None})
            return Answer(0, b"", drop=True)
        if fault == "garbage":
            self._record(record | {"fault": fault})
            return Answer(200, _GARBAGE_PAGE, HTML, delay_s)
        checked = (
            _FAULT_ERRORS[fault]
            if fault
            else self._validate(params, content_type, payload, received_at)
        )
        if isinstance(checked, tuple):
            status, code, desc = checked
            self._record(record | {"fault": fault, "http_status": status, "error_code": code})
            logger.debug("send %s refused: %s %s", request_id, code, desc)
            return error(status, code, desc, request_id, delay_s)
        with self._lock:
            record["results"] = results = self._process(checked, params["appId"])
        self._record(record)
        if logger.isEnabledFor(logging.DEBUG):
            shown = ", ".join(f"{_mask(r['phoneNumber'])}:{r['status']}" for r in results)
            logger.debug("send %s answered: %s", request_id, shown)
        success = {"code": 200, "status": "success", "success": True, "requestId": request_id}
        return json_answer(200, success | {"data": results}, delay_s)

    def _draw_fault(self) -> tuple[str | None, float]:
        """This request's fault and latency (call with the lock held)."""
        f = self._faults
        shares = (f.drop_rate, f.http500_rate, f.garbage_rate, f.rate_limit_rate)
        draw = self._rng.random() if any(shares) else 1.0
        edges = zip(("drop", "http500", "garbage", "rate_limit"), accumulate(shares), strict=True)
        fault = next((name for name, edge in edges if draw < edge), None)
        delay_s = f.latency_s
        if f.slow_rate and self._rng.random() < f.slow_rate:
            delay_s += f.slow_latency_s
        return fault, delay_s

    def _validate(
        self, params: dict[str, str], content_type: str, payload: object, received_at: float
    ) -> tuple[int, int, str] | list[Any]:
        """Check a send request in Polyv's order: the error to answer, or the numbers."""
        for name in ("appId", "timestamp", "sign"):
            if not params.get(name, "").strip():
                return 400, 10002, f"missing parameter: {name}"
        secret = self._secrets.get(params["appId"])
        if secret is None:
            return 400, 20001, "application not found."
        timestamp = params["timestamp"]
        if len(timestamp) != 13 or not (timestamp.isascii() and timestamp.isdigit()):
            return 400, 20003, "invalid timestamp."
        if abs(int(timestamp) / 1000 - received_at) > self._window_s:
            return 400, 20003, "timestamp expired."
        method = params.get("signatureMethod") or "MD5"
        signed = {name: value for name, value in params.items() if name != "sign"}
        expected = sign(signed, secret, method) if method.upper() in SIGN_METHODS else ""
        if not hmac.compare_digest(expected.encode(), params["sign"].encode()):
            return 403, 20002, "invalid signature."
        if not content_type.lower().startswith("application/json"):
            return 400, 10001, "Content-Type must be application/json"
        problem = "the body must be a JSON object"
        if isinstance(payload, dict):
            numbers, names = payload.get("phoneNumbers"), payload.get("templateParamNames")
            values = payload.get("templateParamValues")
            if not isinstance(numbers, list) or not 0 < len(numbers) <= MAX_NUMBERS_PER_REQUEST:
                problem = f"phoneNumbers must have 1 to at most {MAX_NUMBERS_PER_REQUEST} items"
            elif not isinstance(names, list) or not names or any(type(n) is not str for n in names):
                problem = "templateParamNames must be a non-empty array of strings"
            elif not isinstance(values, list) or len(values) != len(names):
                problem = "templateParamValues must be an array as long as templateParamNames"
            else:
                return numbers
        return 400, 10001, f"参数校验失败: {problem}"

    def _process(self, items: list[Any], app_id: str) -> list[dict[str, Any]]:
        """Answer every number and move the counters (call with the lock held)."""
        tally = self._tally
        day = datetime.fromtimestamp(self._clock(), self._tz).date()
        if day != tally.day:
            tally.day, tally.today = day, Counter()
        today, phone_limit, account_limit = tally.today, self._phone_limit, self._account_limit
        status11_rate, results = self._faults.status11_rate, []
        invalid = self._faults.invalid_numbers
        for item in items:
            number, serial_no = _as_text(item), None
            if not _PHONE.fullmatch(number) or number in invalid:  # also floats, null, objects
                status = -2
            elif today[number] >= phone_limit or today[app_id, None] >= account_limit:
                status = -1
            elif tally.fail_remaining.get(number, 0) > 0:
                tally.fail_remaining[number] -= 1
                status = 11
            elif status11_rate and self._rng.random() < status11_rate:
                status = 11
            else:
                status, serial_no = 12, self._next_serial_no()
                today[number] += 1
                today[app_id, None] += 1
                tally.accepted[number] += 1
            tally.received[number] += 1
            tally.by_status[status] += 1
            results.append({"phoneNumber": number, "status": status, "serialNo": serial_no})
        return results

    def _next_serial_no(self) -> str:
        value = (self._serial_offset + self._serials_issued * _SERIAL_STEP) % _SERIAL_MODULUS
        self._serials_issued += 1
        return f"{value:018d}^0"

    def _record(self, record: dict[str, Any]) -> None:
        with self._lock:
            self._records.append(record)
            self._tally.requests += 1
            outcome = record["fault"] or record["error_code"]
            if outcome is not None:
                self._tally.by_outcome[str(outcome)] += 1
