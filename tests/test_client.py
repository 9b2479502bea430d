"""PolyvClient over real HTTP: against the simulator, and against canned answers."""

from __future__ import annotations

import gc
import itertools
import json
import os
import signal
import socket
import threading
import time
import traceback
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from helpers import CannedServer, RawServer, free_port, read_http_request, self_signed_tls

from polyv_sms.config import exchange_deadline_s
from polyv_sms.errors import (
    AmbiguousSend,
    BatchTooLarge,
    InvalidRequest,
    PermanentError,
    PolyvUnavailable,
    RateLimited,
    TransientError,
    UnexpectedResponse,
)
from polyv_sms.polyv.client import PolyvClient
from polyv_sms.polyv.signing import sign
from polyv_sms.polyv.simulator import PolyvSimulator
from polyv_sms.polyv.transport import DeadlineAdapter, Exchange

NUMBER = "17680476163"


@pytest.fixture
def client(sim: PolyvSimulator, account: tuple[str, str]) -> Iterator[PolyvClient]:
    app_id, secret = account
    with PolyvClient(app_id, secret, sim.url, timeout=2.0) as polyv:
        yield polyv


def test_happy_path(client: PolyvClient, sim: PolyvSimulator, account: tuple[str, str]) -> None:
    response = client.send([NUMBER, "13800138000"], ["code"], ["9802"])
    assert [r.phone_number for r in response.results] == [NUMBER, "13800138000"]
    assert [r.status for r in response.results] == [12, 12]
    assert all(r.serial_no and r.serial_no.endswith("^0") for r in response.results)
    assert response.request_id
    [request] = sim.requests()
    assert request["numbers"] == [NUMBER, "13800138000"]
    assert request["template_param_names"] == ["code"]
    assert request["template_param_values"] == ["9802"]
    assert request["app_id"] == account[0]


def test_sign_is_polyvs_over_appid_and_fresh_timestamp(account: tuple[str, str]) -> None:
    app_id, secret = account
    body = json.dumps(
        {"code": 200, "status": "success", "success": True, "requestId": "r", "data": []}
    ).encode()
    now = [1_700_000_000.0]
    with (
        CannedServer(200, body) as server,
        PolyvClient(app_id, secret, server.url, clock=lambda: now[0]) as polyv,
    ):
        polyv.send([NUMBER], ["code"], ["1"])
        now[0] += 600
        polyv.send([NUMBER], ["code"], ["1"])
    queries = []
    for request in server.requests:
        assert str(request["path"]).startswith("/live/v4/user/sms/send?")
        assert request["headers"]["Content-Type"] == "application/json"
        query = dict(p.split("=", 1) for p in str(request["path"]).split("?", 1)[1].split("&"))
        expected = sign({"appId": app_id, "timestamp": query["timestamp"]}, secret)
        assert query["sign"] == expected
        assert query["appId"] == app_id
        assert secret not in str(request["path"])
        assert secret.encode() not in request["body"]  # type: ignore[operator]
        queries.append(query)
    assert [q["timestamp"] for q in queries] == ["1700000000000", "1700000600000"]
    assert json.loads(server.requests[0]["body"]) == {  # type: ignore[arg-type]
        "phoneNumbers": [NUMBER],
        "templateParamNames": ["code"],
        "templateParamValues": ["1"],
    }


def test_each_per_number_status_is_parsed(account: tuple[str, str]) -> None:
    app_id, secret = account
    with (
        PolyvSimulator(app_id, secret, phone_daily_limit=1) as sim,
        PolyvClient(app_id, secret, sim.url) as polyv,
    ):
        sim.set_faults(fail_numbers={"13900000011": 1})
        polyv.send(["13900000001"], ["c"], ["1"])
        response = polyv.send(
            ["13900000001", "1768909", "13900000011", "13900000012"], ["c"], ["1"]
        )
    statuses = {r.phone_number: (r.status, r.serial_no is not None) for r in response.results}
    assert statuses == {
        "13900000001": (-1, False),
        "1768909": (-2, False),
        "13900000011": (11, False),
        "13900000012": (12, True),
    }


def test_bad_sign_is_permanent_with_polyvs_desc_and_no_secret(
    sim: PolyvSimulator, account: tuple[str, str]
) -> None:
    app_id, _ = account
    wrong = "wrong-secret-value-123"
    with PolyvClient(app_id, wrong, sim.url) as polyv, pytest.raises(PermanentError) as caught:
        polyv.send([NUMBER], ["code"], ["1"])
    error = caught.value
    assert error.code == 20002
    assert "invalid signature" in error.desc
    assert error.request_id
    for text in (str(error), repr(error), repr(error.args), repr(polyv)):
        assert wrong not in text
        assert account[1] not in text


def test_unknown_app_is_permanent(sim: PolyvSimulator) -> None:
    with PolyvClient("nosuchapp", "s", sim.url) as polyv, pytest.raises(PermanentError) as caught:
        polyv.send([NUMBER], ["code"], ["1"])
    assert caught.value.code == 20001
    assert caught.value.desc == "application not found."


def test_http_500_is_transient(client: PolyvClient, sim: PolyvSimulator) -> None:
    sim.set_faults(http500_rate=1.0)
    with pytest.raises(PolyvUnavailable, match="500"):
        client.send([NUMBER], ["code"], ["1"])


def test_slow_server_is_an_ambiguous_transient_error_within_the_timeout(
    sim: PolyvSimulator, account: tuple[str, str]
) -> None:
    sim.set_faults(latency_s=1.5)
    with PolyvClient(account[0], account[1], sim.url, timeout=0.3) as polyv:
        started = time.monotonic()
        with pytest.raises(AmbiguousSend) as caught:
            polyv.send([NUMBER], ["code"], ["1"])
        assert time.monotonic() - started < 1.0
    assert isinstance(caught.value, TransientError)
    assert len(sim.requests()) == 1  # not retried in place: Polyv may have sent it


def test_non_json_body_is_transient(client: PolyvClient, sim: PolyvSimulator) -> None:
    sim.set_faults(garbage_rate=1.0)
    with pytest.raises(UnexpectedResponse, match="not a JSON object"):
        client.send([NUMBER], ["code"], ["1"])


def test_dropped_connection_is_ambiguous(client: PolyvClient, sim: PolyvSimulator) -> None:
    sim.set_faults(drop_rate=1.0)
    with pytest.raises(AmbiguousSend):
        client.send([NUMBER], ["code"], ["1"])


@pytest.mark.parametrize("fault", ["drop", "refused"])
def test_transport_errors_carry_no_signed_url_in_their_chain(
    sim: PolyvSimulator, account: tuple[str, str], fault: str
) -> None:
    # requests' and urllib3's errors quote the full URL, sign included; an error tracker or a
    # logged traceback shows the whole chain (__cause__ and __context__), not only str().
    url = sim.url if fault == "drop" else f"http://127.0.0.1:{free_port()}"
    sim.set_faults(drop_rate=1.0)
    with (
        PolyvClient(account[0], account[1], url, connect_attempts=1) as polyv,
        pytest.raises(PolyvUnavailable) as caught,
    ):
        polyv.send([NUMBER], ["code"], ["1"])
    shown = "".join(traceback.format_exception(caught.value))
    assert "sign=" not in shown
    assert account[1] not in shown
    assert caught.value.__cause__ is None
    assert caught.value.__context__ is None


def test_rate_limiting_is_transient(client: PolyvClient, sim: PolyvSimulator) -> None:
    sim.set_faults(rate_limit_rate=1.0)
    with pytest.raises(RateLimited, match="qps"):
        client.send([NUMBER], ["code"], ["1"])


def test_201_numbers_refused_before_any_request(client: PolyvClient, sim: PolyvSimulator) -> None:
    numbers = [f"138{i:08d}" for i in range(201)]
    with pytest.raises(BatchTooLarge, match="201"):
        client.send(numbers, ["code"], ["1"])
    assert sim.requests() == []
    assert len(client.send(numbers[:200], ["code"], ["1"]).results) == 200


def test_connect_errors_are_retried_in_place_then_transient() -> None:
    port = free_port()
    with PolyvClient("a", "s", f"http://127.0.0.1:{port}", timeout=1.0) as polyv:
        started = time.monotonic()
        with pytest.raises(PolyvUnavailable, match="could not connect"):
            polyv.send([NUMBER], ["code"], ["1"])
        assert time.monotonic() - started < 3.0


def test_connect_retry_reaches_a_server_that_comes_up(account: tuple[str, str]) -> None:
    port = free_port()
    sim = PolyvSimulator(account[0], account[1], port=port)
    timer = threading.Timer(0.2, sim.start)
    timer.start()
    try:
        with PolyvClient(account[0], account[1], f"http://127.0.0.1:{port}") as polyv:
            response = polyv.send([NUMBER], ["code"], ["1"])
        assert response.results[0].status == 12
    finally:
        timer.join()
        sim.stop()


@pytest.mark.parametrize(("skew_s", "ok"), [(-120, True), (120, True), (-240, False)])
def test_clock_skew_within_the_3_minute_window_still_signs_valid_requests(
    sim: PolyvSimulator, account: tuple[str, str], skew_s: float, ok: bool
) -> None:
    with PolyvClient(account[0], account[1], sim.url, clock=lambda: time.time() + skew_s) as polyv:
        if ok:
            assert polyv.send([NUMBER], ["code"], ["1"]).results[0].status == 12
        else:
            with pytest.raises(PermanentError) as caught:
                polyv.send([NUMBER], ["code"], ["1"])
            assert caught.value.code == 20003


def test_unknown_status_is_an_error_that_keeps_the_parsed_answer() -> None:
    body = json.dumps(
        {
            "code": 200,
            "status": "success",
            "success": True,
            "requestId": "r1",
            "data": [
                {"phoneNumber": NUMBER, "status": 13, "serialNo": None},
                {"phoneNumber": "13800138000", "status": 12, "serialNo": "1^0"},
            ],
        }
    ).encode()
    with CannedServer(200, body) as server, PolyvClient("a", "s", server.url) as polyv:
        with pytest.raises(UnexpectedResponse, match=r"unknown per-number status") as caught:
            polyv.send([NUMBER, "13800138000"], ["code"], ["1"])
    assert caught.value.response is not None
    assert [r.status for r in caught.value.response.results] == [13, 12]


@pytest.mark.parametrize(
    "body",
    [
        b'{"code": 200, "status": "success", "success": true, "requestId": "r"}',
        b'{"code": 200, "success": true, "data": [{"phoneNumber": "1", "status": "12"}]}',
        b'{"code": 200, "success": true, "data": ["x"]}',
        b"[1, 2]",
    ],
)
def test_malformed_answers_are_transient_errors(body: bytes) -> None:
    with CannedServer(200, body) as server, PolyvClient("a", "s", server.url) as polyv:
        with pytest.raises(UnexpectedResponse):
            polyv.send([NUMBER], ["code"], ["1"])


def test_old_style_error_envelope_with_message_is_permanent() -> None:
    body = b'{"code": 403, "status": "error", "message": "invalid signature.", "data": ""}'
    with CannedServer(403, body) as server, PolyvClient("a", "s", server.url) as polyv:
        with pytest.raises(PermanentError, match="invalid signature"):
            polyv.send([NUMBER], ["code"], ["1"])


def test_tls_verification_is_on_by_default() -> None:
    with PolyvClient("a", "s") as polyv:
        assert polyv.url == "https://api.polyv.net/live/v4/user/sms/send"
        assert polyv._session.verify is True


def test_proxy_settings_from_the_environment_are_honoured(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # requests' environment look-ups are resolved once, when the client is built.
    body = json.dumps(
        {"code": 200, "status": "success", "success": True, "requestId": "r", "data": []}
    ).encode()
    with CannedServer(200, body) as proxy:
        monkeypatch.setenv("HTTP_PROXY", proxy.url)
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        with PolyvClient("a", "s", "http://polyv.invalid") as polyv:
            polyv.send([NUMBER], ["code"], ["1"])
    [request] = proxy.requests
    assert str(request["path"]).startswith("http://polyv.invalid/live/v4/user/sms/send?appId=a&")


OK_BODY = json.dumps(
    {
        "code": 200,
        "status": "success",
        "success": True,
        "requestId": "r",
        "data": [{"phoneNumber": NUMBER, "status": 12, "serialNo": "1^0"}],
    }
).encode()


def _head(length: int, *extra: str) -> bytes:
    lines = ["HTTP/1.1 200 OK", "Content-Type: application/json", f"Content-Length: {length}"]
    return ("\r\n".join([*lines, *extra]) + "\r\n\r\n").encode()


def test_a_body_cut_short_after_the_headers_is_ambiguous_and_not_retried() -> None:
    def answer(conn: socket.socket, server: RawServer) -> None:
        read_http_request(conn)
        conn.sendall(_head(len(OK_BODY)) + OK_BODY[:20])  # then the connection closes

    with RawServer(answer) as server, PolyvClient("a", "secret-xyz", server.url) as polyv:
        with pytest.raises(AmbiguousSend, match="may have sent") as caught:
            polyv.send([NUMBER], ["code"], ["1"])
    assert server.connections == 1
    assert "secret-xyz" not in str(caught.value)
    assert "sign=" not in str(caught.value)


def test_a_body_that_stalls_after_the_headers_is_ambiguous_within_the_timeout() -> None:
    def answer(conn: socket.socket, server: RawServer) -> None:
        read_http_request(conn)
        conn.sendall(_head(len(OK_BODY)) + OK_BODY[:20])
        server.stopped.wait(5)

    with RawServer(answer) as server, PolyvClient("a", "s", server.url, timeout=0.3) as polyv:
        started = time.monotonic()
        with pytest.raises(AmbiguousSend, match="stalled"):
            polyv.send([NUMBER], ["code"], ["1"])
        assert time.monotonic() - started < 1.5
    assert server.connections == 1


def test_a_body_that_does_not_decode_is_ambiguous() -> None:
    def answer(conn: socket.socket, server: RawServer) -> None:
        read_http_request(conn)
        garbage = b"this is not gzip"
        conn.sendall(_head(len(garbage), "Content-Encoding: gzip") + garbage)

    with RawServer(answer) as server, PolyvClient("a", "s", server.url) as polyv:
        with pytest.raises(AmbiguousSend, match="ContentDecodingError"):
            polyv.send([NUMBER], ["code"], ["1"])


def test_a_failed_tls_handshake_is_unavailable_not_ambiguous() -> None:
    def answer(conn: socket.socket, server: RawServer) -> None:
        conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")

    with RawServer(answer) as server:
        url = server.url.replace("http://", "https://")
        with PolyvClient("a", "s", url) as polyv:
            with pytest.raises(PolyvUnavailable, match="TLS handshake") as caught:
                polyv.send([NUMBER], ["code"], ["1"])
    assert not isinstance(caught.value, AmbiguousSend)


#: Raw bytes under the TLS layer: an application-data record that fails to decrypt.
_BROKEN_TLS_RECORD = b"\x17\x03\x03\x00\x20" + b"\x00" * 32


def _session_trusting(cert: Path) -> requests.Session:
    """A session that trusts only ``cert`` (whatever REQUESTS_CA_BUNDLE says)."""
    session = requests.Session()
    session.trust_env = False
    session.verify = str(cert)
    return session


def test_a_tls_error_after_the_headers_is_ambiguous(tmp_path: Path) -> None:
    context, cert = self_signed_tls(tmp_path)
    forge = [False, True]  # first a good answer (the trust set-up works), then a forged record

    def answer(conn: socket.socket, server: RawServer) -> None:
        read_http_request(conn)
        if not forge.pop(0):
            conn.sendall(_head(len(OK_BODY)) + OK_BODY)
            return
        conn.sendall(_head(len(OK_BODY)))
        time.sleep(0.05)
        socket.socket.sendall(conn, _BROKEN_TLS_RECORD)
        server.stopped.wait(5)

    with (
        _session_trusting(cert) as session,
        RawServer(answer, tls=context) as server,
        PolyvClient("a", "s", server.url, session=session, timeout=2.0) as polyv,
    ):
        assert polyv.send([NUMBER], ["code"], ["1"]).results[0].status == 12
        with pytest.raises(AmbiguousSend, match=r"cut short.*SSLError"):
            polyv.send([NUMBER], ["code"], ["1"])


def test_one_malformed_entry_keeps_the_others() -> None:
    body = json.dumps(
        {
            "code": 200,
            "status": "success",
            "success": True,
            "requestId": "r2",
            "data": [
                {"phoneNumber": NUMBER, "status": 12, "serialNo": "605320356903663783^0"},
                {"phoneNumber": "13800138000", "status": "12", "serialNo": "2^0"},
                "garbage",
                {"phoneNumber": "13800138001", "status": 11, "serialNo": None},
            ],
        }
    ).encode()
    numbers = [NUMBER, "13800138000", "13800138001", "13800138002"]
    with CannedServer(200, body) as server, PolyvClient("a", "s", server.url) as polyv:
        with pytest.raises(UnexpectedResponse, match="2 malformed data") as caught:
            polyv.send(numbers, ["code"], ["1"])
    response = caught.value.response
    assert response is not None
    assert response.request_id == "r2"
    assert [(r.phone_number, r.status, r.serial_no) for r in response.results] == [
        (NUMBER, 12, "605320356903663783^0"),
        ("13800138001", 11, None),
    ]
    assert "13800138000" not in str(caught.value)


def test_a_data_that_is_not_a_list_has_no_partial_answer() -> None:
    body = b'{"code": 200, "success": true, "requestId": "r", "data": {"phoneNumber": "1"}}'
    with CannedServer(200, body) as server, PolyvClient("a", "s", server.url) as polyv:
        with pytest.raises(UnexpectedResponse, match="no data list") as caught:
            polyv.send([NUMBER], ["code"], ["1"])
    assert caught.value.response is None


def test_requests_reuse_one_connection_and_carry_the_json_headers() -> None:
    seen: list[bytes] = []

    def answer(conn: socket.socket, server: RawServer) -> None:
        while True:  # keep-alive: one connection, several requests
            request = read_http_request(conn)
            if not request:
                return
            seen.append(request)
            conn.sendall(_head(len(OK_BODY)) + OK_BODY)

    values = ["1", "a much longer value than the first", "22"]
    with RawServer(answer) as server, PolyvClient("a", "s", server.url) as polyv:
        for value in values:  # bodies of different lengths: each request is prepared afresh
            assert polyv.send([NUMBER], ["code"], [value]).results[0].serial_no == "1^0"
    assert server.connections == 1
    assert len(seen) == 3
    for request, value in zip(seen, values, strict=True):
        head, _, body = request.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        assert lines[0].startswith("POST /live/v4/user/sms/send?appId=a&timestamp=")
        assert "&sign=" in lines[0]
        headers = {n.lower(): v.strip() for n, _, v in (h.partition(":") for h in lines)}
        assert headers["content-type"] == "application/json"
        assert int(headers["content-length"]) == len(body)
        assert json.loads(body)["phoneNumbers"] == [NUMBER]
        assert json.loads(body)["templateParamValues"] == [value]


def test_close_closes_the_clients_connections() -> None:
    closed_by_client = threading.Event()

    def answer(conn: socket.socket, server: RawServer) -> None:
        while read_http_request(conn):
            conn.sendall(_head(len(OK_BODY)) + OK_BODY)
        closed_by_client.set()

    with RawServer(answer) as server:
        polyv = PolyvClient("a", "s", server.url)
        polyv.send([NUMBER], ["code"], ["1"])
        assert not closed_by_client.is_set()
        polyv.close()
        assert closed_by_client.wait(2)


class _CannedAdapter(requests.adapters.BaseAdapter):
    """A transport adapter that is not requests' own (as test doubles and plug-ins mount)."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[requests.PreparedRequest] = []

    def send(  # type: ignore[override]
        self, request: requests.PreparedRequest, **kwargs: object
    ) -> requests.Response:
        self.sent.append(request)
        response = requests.Response()
        response.status_code = 200
        response.headers["Content-Type"] = "application/json"
        response._content = OK_BODY
        return response

    def close(self) -> None:
        pass


def test_a_session_with_another_transport_adapter_is_used_as_it_is() -> None:
    adapter = _CannedAdapter()
    with requests.Session() as session:
        session.mount("https://", adapter)
        polyv = PolyvClient("a", "s", session=session)
        assert polyv.send([NUMBER], ["code"], ["1"]).results[0].serial_no == "1^0"
    [request] = adapter.sent
    assert str(request.url).startswith("https://api.polyv.net/live/v4/user/sms/send?appId=a&")
    assert json.loads(request.body or b"")["phoneNumbers"] == [NUMBER]


class _FailingAdapter(requests.adapters.BaseAdapter):
    """A foreign transport that fails with a given requests error."""

    def __init__(self, error: requests.exceptions.RequestException) -> None:
        super().__init__()
        self.error = error
        self.calls = 0

    def send(  # type: ignore[override]
        self, request: requests.PreparedRequest, **kwargs: object
    ) -> requests.Response:
        self.calls += 1
        raise self.error

    def close(self) -> None:
        pass


@pytest.mark.parametrize(
    ("error", "expected", "calls"),
    [
        (requests.exceptions.ConnectTimeout(), PolyvUnavailable, 3),
        (requests.exceptions.ProxyError(), PolyvUnavailable, 3),
        # A refused connection and a dropped one are the same requests type: a transport the
        # client cannot watch leaves it unable to tell, so it takes the safe side.
        (requests.exceptions.ConnectionError(), AmbiguousSend, 1),
        (requests.exceptions.SSLError(), AmbiguousSend, 1),
    ],
)
def test_a_transport_the_client_cannot_watch_is_classified_by_requests_types_only(
    error: requests.exceptions.RequestException, expected: type[Exception], calls: int
) -> None:
    adapter = _FailingAdapter(error)
    with requests.Session() as session:
        session.mount("https://", adapter)
        with pytest.raises(expected) as caught:
            PolyvClient("a", "s", session=session).send([NUMBER], ["code"], ["1"])
    assert type(caught.value) is expected
    assert adapter.calls == calls  # only what was provably never sent is retried in place


def test_a_tls_error_after_the_request_before_the_headers_is_ambiguous(tmp_path: Path) -> None:
    # The handshake worked and the request went out: Polyv may have sent the SMS, so this must
    # not be taken for a failed handshake (which is retried as "never sent").
    context, cert = self_signed_tls(tmp_path)

    def answer(conn: socket.socket, server: RawServer) -> None:
        read_http_request(conn)
        socket.socket.sendall(conn, _BROKEN_TLS_RECORD)
        server.stopped.wait(5)

    with (
        _session_trusting(cert) as session,
        RawServer(answer, tls=context) as server,
        PolyvClient("a", "s", server.url, session=session, timeout=2.0) as polyv,
    ):
        with pytest.raises(AmbiguousSend, match="SSLError"):
            polyv.send([NUMBER], ["code"], ["1"])
    assert server.connections == 1  # not retried in place


def test_a_pool_closed_before_sending_is_unavailable_not_ambiguous() -> None:
    with CannedServer(200, OK_BODY) as server, requests.Session() as session:
        polyv = PolyvClient("a", "s", server.url, session=session, connect_attempts=1)
        verify = session.merge_environment_settings(polyv.url, {}, None, None, None)["verify"]
        probe = requests.Request("POST", polyv.url).prepare()
        pool = session.get_adapter(polyv.url).get_connection_with_tls_context(probe, verify)
        pool.close()  # the pool the client sends on (as when close() races a send)
        with pytest.raises(PolyvUnavailable, match="could not connect"):
            polyv.send([NUMBER], ["code"], ["1"])
    assert server.requests == []


def test_an_httpadapter_subclass_on_the_session_is_used_as_it_is() -> None:
    class Tagging(requests.adapters.HTTPAdapter):
        def add_headers(self, request: requests.PreparedRequest, **kwargs: object) -> None:
            request.headers["X-Tag"] = "ours"

    with CannedServer(200, OK_BODY) as server, requests.Session() as session:
        session.mount("http://", Tagging())
        PolyvClient("a", "s", server.url, session=session).send([NUMBER], ["code"], ["1"])
    [request] = server.requests
    assert request["headers"]["X-Tag"] == "ours"  # type: ignore[index]


def test_session_headers_merge_case_insensitively() -> None:
    with CannedServer(200, OK_BODY) as server, requests.Session() as session:
        session.headers["content-type"] = "text/plain"
        session.headers["user-agent"] = "our-app/1"
        PolyvClient("a", "s", server.url, session=session).send([NUMBER], ["code"], ["1"])
    [request] = server.requests
    lines = [(name.lower(), value) for name, value in request["header_lines"]]  # type: ignore[attr-defined]
    assert [v for n, v in lines if n == "content-type"] == ["application/json"]
    assert [v for n, v in lines if n == "user-agent"] == ["our-app/1"]


def test_an_answer_in_a_declared_charset_is_decoded_with_it() -> None:
    envelope = {"code": 400, "status": "error", "requestId": "r"}
    envelope["error"] = {"code": 1, "desc": "签名错误"}  # "bad sign", in GBK below
    body = json.dumps(envelope, ensure_ascii=False).encode("gbk")
    with (
        CannedServer(400, body, "application/json; charset=GBK") as server,
        PolyvClient("a", "s", server.url) as polyv,
    ):
        with pytest.raises(PermanentError, match="签名错误"):
            polyv.send([NUMBER], ["code"], ["1"])


def test_a_proxy_that_cannot_be_reached_is_unavailable_not_ambiguous(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{free_port()}")  # nothing listens
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    with PolyvClient("a", "s", "http://polyv.invalid", connect_attempts=2) as polyv:
        with pytest.raises(PolyvUnavailable, match=r"could not connect.*ProxyError") as caught:
            polyv.send([NUMBER], ["code"], ["1"])
    assert not isinstance(caught.value, AmbiguousSend)


def test_a_proxy_refusing_the_tunnel_is_unavailable_not_ambiguous(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def refuse(conn: socket.socket, server: RawServer) -> None:
        read_http_request(conn)  # CONNECT polyv.invalid:443
        conn.sendall(b"HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 0\r\n\r\n")

    with RawServer(refuse) as proxy:
        monkeypatch.setenv("HTTPS_PROXY", proxy.url)
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        with PolyvClient("a", "s", "https://polyv.invalid", connect_attempts=1) as polyv:
            with pytest.raises(PolyvUnavailable, match=r"could not connect.*ProxyError") as caught:
                polyv.send([NUMBER], ["code"], ["1"])
    assert not isinstance(caught.value, AmbiguousSend)


# -- The wall-clock deadline on one whole exchange -------------------------------------------
# POLYV_HTTP_TIMEOUT bounds each socket read; a server whose bytes trickle in, each inside the
# timeout, must still not hold a send past the deadline. Timeout 0.5 s gives the default
# deadline config.exchange_deadline_s(0.5) = 3 s; the servers below trickle for three times
# that (on a client without the deadline, a send takes the whole 9 s).
TIMEOUT_S = 0.5
DEADLINE_S = exchange_deadline_s(TIMEOUT_S)
TRICKLE_FOR_S = 3 * DEADLINE_S
TRICKLE_EVERY_S = 0.1  # well inside the per-read timeout, even on a loaded machine
#: What a send may overrun its deadline by: the watchdog's reaction plus a loaded machine.
MARGIN_S = 1.0


def _trickle(conn: socket.socket, server: RawServer, data: bytes, gone: threading.Event) -> None:
    """Send ``data`` one byte at a time for TRICKLE_FOR_S; set ``gone`` when the client left."""
    until = time.monotonic() + TRICKLE_FOR_S
    for byte in itertools.cycle(data):
        if time.monotonic() > until or server.stopped.wait(TRICKLE_EVERY_S):
            return
        try:
            conn.sendall(bytes([byte]))
        except OSError:  # the client closed the connection
            gone.set()
            return


def _send_timed(polyv: PolyvClient, number: str = NUMBER) -> tuple[float, Exception | None]:
    started = time.monotonic()
    try:
        polyv.send([number], ["code"], ["1"])
    except Exception as exc:
        return time.monotonic() - started, exc
    return time.monotonic() - started, None


def test_the_client_exposes_its_deadline() -> None:
    assert PolyvClient("a", "s", timeout=0.5).deadline_s == DEADLINE_S == 3.0
    assert PolyvClient("a", "s", timeout=0.5, deadline_s=7.5).deadline_s == 7.5
    with pytest.raises(InvalidRequest, match="deadline_s"):
        PolyvClient("a", "s", deadline_s=0)


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param(b"HTTP/1.1 200 OK\r\n" + b"X-Slow: " + b"a" * 1000, id="headers"),
        pytest.param(_head(len(OK_BODY)) + OK_BODY[:5] + b" " * 1000, id="body"),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"1\r\n \r\n" * 1000,
            id="chunked-body",
        ),
    ],
)
def test_an_answer_trickling_past_the_deadline_is_cut_off_as_ambiguous(answer: bytes) -> None:
    gone = threading.Event()

    def trickle(conn: socket.socket, server: RawServer) -> None:
        read_http_request(conn)
        _trickle(conn, server, answer, gone)

    with RawServer(trickle) as server, PolyvClient("a", "s", server.url, TIMEOUT_S) as polyv:
        elapsed, error = _send_timed(polyv)
        assert isinstance(error, AmbiguousSend), error
        assert elapsed <= DEADLINE_S + MARGIN_S
        assert "deadline" in str(error)
        assert "sign=" not in str(error)
        # The connection was closed (the server notices) and not put back into the pool.
        assert gone.wait(5)
        server.handler = lambda conn, server: (
            read_http_request(conn),
            conn.sendall(_head(len(OK_BODY)) + OK_BODY),
        )
        assert polyv.send([NUMBER], ["code"], ["1"]).results[0].status == 12
    assert server.connections == 2


def test_headers_trickling_over_tls_are_cut_off_at_the_deadline(tmp_path: Path) -> None:
    context, cert = self_signed_tls(tmp_path)
    gone = threading.Event()

    def trickle(conn: socket.socket, server: RawServer) -> None:
        read_http_request(conn)
        _trickle(conn, server, b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 1000, gone)

    with (
        _session_trusting(cert) as session,
        RawServer(trickle, tls=context) as server,
        PolyvClient("a", "s", server.url, TIMEOUT_S, session=session) as polyv,
    ):
        elapsed, error = _send_timed(polyv)
        assert isinstance(error, AmbiguousSend), error
        assert elapsed <= DEADLINE_S + MARGIN_S
        assert gone.wait(5)


def test_a_server_that_accepts_and_never_answers_is_ambiguous_within_the_deadline() -> None:
    def silent(conn: socket.socket, server: RawServer) -> None:
        read_http_request(conn)
        server.stopped.wait(TRICKLE_FOR_S)

    with RawServer(silent) as server, PolyvClient("a", "s", server.url, TIMEOUT_S) as polyv:
        elapsed, error = _send_timed(polyv)
    assert isinstance(error, AmbiguousSend), error
    assert elapsed <= DEADLINE_S + MARGIN_S
    assert server.connections == 1  # not retried in place


@pytest.fixture
def hanging_port() -> Iterator[int]:
    """A port whose connects hang: a listener that never accepts, its queue filled up."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = int(listener.getsockname()[1])
    fillers = []
    try:
        while True:  # fill the accept queue until a connect no longer completes
            probe = socket.socket()
            probe.settimeout(0.3)
            try:
                probe.connect(("127.0.0.1", port))
            except TimeoutError:
                probe.close()
                break
            fillers.append(probe)
            assert len(fillers) < 64, "this system's connects do not hang on a full queue"
        yield port
    finally:
        for sock in fillers:
            sock.close()
        listener.close()


def test_hanging_connects_retried_in_place_stop_at_the_deadline(hanging_port: int) -> None:
    # Each try may take the whole timeout; many tries and a large retry budget would take
    # longer than the deadline, which bounds them all together.
    with PolyvClient(
        "a",
        "s",
        f"http://127.0.0.1:{hanging_port}",
        TIMEOUT_S,
        connect_attempts=20,
        connect_retry_budget_s=60,
    ) as polyv:
        elapsed, error = _send_timed(polyv)
    assert isinstance(error, PolyvUnavailable), error
    assert not isinstance(error, AmbiguousSend)
    assert elapsed <= DEADLINE_S + MARGIN_S


def test_concurrent_sends_each_keep_their_own_deadline() -> None:
    # Slow and fast requests share one client and its pool: the watchdog cuts off the slow
    # ones at their deadlines and never a connection that has gone on to serve a fast one.
    slow_number = "13800000000"
    gone = threading.Event()

    def answer(conn: socket.socket, server: RawServer) -> None:
        while request := read_http_request(conn):
            if slow_number.encode() in request:
                _trickle(conn, server, _head(len(OK_BODY)) + OK_BODY[:5] + b" " * 1000, gone)
                return
            conn.sendall(_head(len(OK_BODY)) + OK_BODY)

    slow: list[tuple[float, Exception | None]] = []
    fast: list[tuple[float, Exception | None]] = []

    def fast_sender(polyv: PolyvClient, until: float) -> None:
        while time.monotonic() < until:
            fast.append(_send_timed(polyv))

    with RawServer(answer) as server, PolyvClient("a", "s", server.url, TIMEOUT_S) as polyv:
        until = time.monotonic() + DEADLINE_S + 1.0
        threads = [
            threading.Thread(target=lambda: slow.append(_send_timed(polyv, slow_number)))
            for _ in range(4)
        ]
        threads += [threading.Thread(target=fast_sender, args=(polyv, until)) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(DEADLINE_S + 10)
    assert len(slow) == 4
    assert all(isinstance(error, AmbiguousSend) for _, error in slow), slow
    assert all(elapsed <= DEADLINE_S + MARGIN_S for elapsed, _ in slow), slow
    assert fast
    assert [error for _, error in fast if error is not None] == []


def test_no_thread_or_connection_is_left_behind_by_cut_off_sends() -> None:
    gone = threading.Event()

    def trickle(conn: socket.socket, server: RawServer) -> None:
        read_http_request(conn)
        _trickle(conn, server, _head(len(OK_BODY)) + b" " * 1000, gone)

    with PolyvClient("a", "s", f"http://127.0.0.1:{free_port()}", connect_attempts=1) as warm:
        _send_timed(warm)  # the watchdog thread exists from the first send on
    threads_before = set(threading.enumerate())
    fds_before = len(os.listdir("/proc/self/fd"))
    with RawServer(trickle) as server, PolyvClient("a", "s", server.url, TIMEOUT_S) as polyv:
        for _ in range(2):
            assert isinstance(_send_timed(polyv)[1], AmbiguousSend)
    gc.collect()
    assert set(threading.enumerate()) <= threads_before
    assert len(os.listdir("/proc/self/fd")) <= fds_before


def test_the_deadline_holds_in_a_forked_child() -> None:
    # Celery's prefork pool forks workers: the watchdog thread of the parent does not exist in
    # the child, which must make its own.
    gone = threading.Event()

    def trickle(conn: socket.socket, server: RawServer) -> None:
        read_http_request(conn)
        _trickle(conn, server, _head(len(OK_BODY)) + b" " * 1000, gone)

    with PolyvClient("a", "s", f"http://127.0.0.1:{free_port()}", connect_attempts=1) as warm:
        _send_timed(warm)  # the parent's watchdog thread is running
    with RawServer(trickle) as server:
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: report (elapsed, error type) and leave at once
            signal.alarm(int(TRICKLE_FOR_S) + 10)  # a child stuck for good dies, reporting nothing
            try:
                with PolyvClient("a", "s", server.url, TIMEOUT_S) as polyv:
                    elapsed, error = _send_timed(polyv)
                os.write(write_end, json.dumps([elapsed, type(error).__name__]).encode())
            finally:
                os._exit(0)
        os.close(write_end)
        with os.fdopen(read_end, "rb") as reader:
            elapsed, kind = json.loads(reader.read() or b"[null, null]")
        os.waitpid(pid, 0)
    assert kind == "AmbiguousSend"
    assert elapsed <= DEADLINE_S + MARGIN_S


def test_a_deadline_never_cuts_a_connection_another_exchange_has_taken_over() -> None:
    # Exchange A's connection goes back to the pool when A's answer is read, before A ends;
    # exchange B takes it over. A's deadline passing then must not break B's exchange.
    def answer(conn: socket.socket, server: RawServer) -> None:
        served = 0
        while read_http_request(conn):
            served += 1
            if served == 2:  # B's request: answered after A's deadline has passed
                server.stopped.wait(1.5)
            conn.sendall(_head(len(OK_BODY)) + OK_BODY)

    results: list[object] = []
    with RawServer(answer) as server, requests.Session() as session:
        session.mount("http://", DeadlineAdapter())
        url = server.url + "/"

        def exchange_b() -> None:
            with Exchange(30) as b:
                results.append(session.post(url, timeout=5).json())
                results.append(b.expired)

        with Exchange(0.5) as a:
            assert session.post(url, timeout=5).json() == json.loads(OK_BODY)
            other = threading.Thread(target=exchange_b)
            other.start()
            other.join(10)
            assert a.expired  # A's deadline passed while B used the connection
    assert results == [json.loads(OK_BODY), False]
    assert server.connections == 1
