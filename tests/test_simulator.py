"""The Polyv simulator, driven over real HTTP with ``requests``."""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import requests

from polyv_sms.polyv.signing import sign
from polyv_sms.polyv.simulator import SEND_PATH, Faults, PolyvSimulator

APP_ID, SECRET = "app1", "secret1"
PHONE, OTHER = "17680476163", "13800138000"
SERIAL_NO = re.compile(r"[0-9]{18}\^0")
SHANGHAI = ZoneInfo("Asia/Shanghai")

MakeSim = Callable[..., PolyvSimulator]


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def sim() -> Iterator[PolyvSimulator]:
    simulator = PolyvSimulator(APP_ID, SECRET).start()
    yield simulator
    simulator.stop()


@pytest.fixture
def make_sim() -> Iterator[MakeSim]:
    started: list[PolyvSimulator] = []

    def make(**options: Any) -> PolyvSimulator:
        started.append(PolyvSimulator(APP_ID, SECRET, **options).start())
        return started[-1]

    yield make
    for simulator in started:
        simulator.stop()


@pytest.fixture
def http() -> Iterator[requests.Session]:
    with requests.Session() as session:
        yield session


def send_url(
    sim: PolyvSimulator,
    *,
    app_id: str = APP_ID,
    secret: str = SECRET,
    now: float | None = None,
    method: str | None = None,
    override: dict[str, str] | None = None,
    drop: str | None = None,
) -> str:
    """A signed send URL; ``override``/``drop`` change the query after signing."""
    params = {"appId": app_id, "timestamp": str(int((time.time() if now is None else now) * 1000))}
    if method:
        params["signatureMethod"] = method
    params["sign"] = sign(params, secret, method or "MD5")
    params |= override or {}
    params.pop(drop or "", None)
    return f"{sim.url}{SEND_PATH}?" + "&".join(f"{k}={v}" for k, v in params.items())


def body(numbers: Sequence[object], names: Sequence[str] = ("code",)) -> dict[str, Any]:
    values = ["9802"] * len(names)
    return {
        "phoneNumbers": list(numbers),
        "templateParamNames": list(names),
        "templateParamValues": values,
    }


def send(
    http: requests.Session,
    sim: PolyvSimulator,
    numbers: Sequence[object],
    *,
    url: str | None = None,
    timeout: float = 5.0,
) -> requests.Response:
    return http.post(url or send_url(sim), json=body(numbers), timeout=timeout)


def statuses(response: requests.Response) -> list[int]:
    assert response.status_code == 200, response.text
    return [item["status"] for item in response.json()["data"]]


def error_desc(response: requests.Response, http_status: int, code: int) -> str:
    """Assert a Polyv error envelope and return its ``desc``."""
    assert response.status_code == http_status, response.text
    assert response.headers["Content-Type"].startswith("application/json")
    payload = response.json()
    assert payload["code"] == http_status
    assert (payload["status"], payload["success"]) == ("error", False)
    assert re.fullmatch(r"[0-9a-f]{32}", payload["requestId"])
    assert payload["error"]["code"] == code
    return str(payload["error"]["desc"])


def shanghai(day: int, hour: int, minute: int = 0, second: int = 0) -> float:
    """Seconds since the epoch of a moment in May 2024, Shanghai time."""
    return datetime(2024, 5, day, hour, minute, second, tzinfo=SHANGHAI).timestamp()


def test_happy_path_accepts_with_serial_numbers(
    sim: PolyvSimulator, http: requests.Session
) -> None:
    response = send(http, sim, [PHONE, OTHER])
    payload = response.json()
    assert (payload["code"], payload["status"], payload["success"]) == (200, "success", True)
    assert [item["phoneNumber"] for item in payload["data"]] == [PHONE, OTHER]
    assert statuses(response) == [12, 12]
    serials = [item["serialNo"] for item in payload["data"]]
    assert all(SERIAL_NO.fullmatch(serial) for serial in serials)
    assert len(set(serials)) == 2
    assert (sim.accepted(), sim.accepted(PHONE)) == (2, 1)
    assert (sim.received(), sim.received(OTHER)) == (2, 1)


def test_invalid_numbers_get_minus_2_and_json_integers_are_accepted(
    sim: PolyvSimulator, http: requests.Session
) -> None:
    numbers: list[object] = [17680476163, "1768909", "abc", None, 1.5, True, {"a": 1}]
    numbers += ["\uff11" + PHONE[1:], "+8617680476163", 17680476163.0]
    response = send(http, sim, numbers)
    assert statuses(response) == [12] + [-2] * 9
    data = response.json()["data"]
    assert data[0]["phoneNumber"] == PHONE
    assert data[3]["phoneNumber"] == "null"
    assert all(item["serialNo"] is None for item in data[1:])
    assert sim.accepted() == 1


def test_number_daily_limit_then_minus_1(sim: PolyvSimulator, http: requests.Session) -> None:
    assert statuses(send(http, sim, [PHONE] * 11)) == [12] * 10 + [-1]
    assert statuses(send(http, sim, [PHONE, OTHER])) == [-1, 12]
    assert sim.accepted(PHONE) == 10
    assert sim.received(PHONE) == 12


def test_account_daily_limit(make_sim: MakeSim, http: requests.Session) -> None:
    sim = make_sim(account_daily_limit=3)
    numbers = [f"1380013800{i}" for i in range(5)]
    assert statuses(send(http, sim, numbers)) == [12, 12, 12, -1, -1]
    assert sim.accepted() == 3


def test_day_rollover_resets_the_number_counter(make_sim: MakeSim, http: requests.Session) -> None:
    before_midnight = FakeClock(shanghai(1, 23, 59))
    sim = make_sim(clock=before_midnight)
    url = send_url(sim, now=before_midnight.now)
    assert statuses(send(http, sim, [PHONE] * 11, url=url)) == [12] * 10 + [-1]
    after_midnight = FakeClock(shanghai(2, 0, 0, 30))
    sim.set_clock(after_midnight)
    url = send_url(sim, now=after_midnight.now)
    assert statuses(send(http, sim, [PHONE], url=url)) == [12]
    assert sim.accepted(PHONE) == 11


def test_bad_sign_is_refused_without_leaking_the_secret(
    sim: PolyvSimulator, http: requests.Session
) -> None:
    response = send(http, sim, [PHONE], url=send_url(sim, override={"sign": "0" * 32}))
    assert error_desc(response, 403, 20002) == "invalid signature."
    assert SECRET not in response.text
    timestamp = str(int(time.time() * 1000))
    good = sign({"appId": APP_ID, "timestamp": timestamp}, SECRET)
    url = f"{sim.url}{SEND_PATH}?appId={APP_ID}&timestamp={timestamp}&sign="
    response = send(http, sim, [PHONE], url=url + good.lower())  # the sign is case-sensitive
    assert error_desc(response, 403, 20002) == "invalid signature."
    assert sim.accepted() == 0
    assert [r["error_code"] for r in sim.requests()] == [20002, 20002]
    assert statuses(send(http, sim, [PHONE], url=url + good)) == [12]


def test_unknown_app_id(sim: PolyvSimulator, http: requests.Session) -> None:
    response = send(http, sim, [PHONE], url=send_url(sim, app_id="nope"))
    assert error_desc(response, 400, 20001) == "application not found."


@pytest.mark.parametrize("name", ["appId", "timestamp", "sign"])
def test_missing_parameter(sim: PolyvSimulator, http: requests.Session, name: str) -> None:
    response = send(http, sim, [PHONE], url=send_url(sim, drop=name))
    assert error_desc(response, 400, 10002) == f"missing parameter: {name}"


@pytest.mark.parametrize(
    ("offset_s", "desc"), [(-181, "timestamp expired."), (181, "timestamp expired."), (-179, None)]
)
def test_timestamp_window(
    make_sim: MakeSim, http: requests.Session, offset_s: float, desc: str | None
) -> None:
    clock = FakeClock(shanghai(1, 12))
    sim = make_sim(clock=clock)
    response = send(http, sim, [PHONE], url=send_url(sim, now=clock.now + offset_s))
    if desc is None:
        assert statuses(response) == [12]
    else:
        assert error_desc(response, 400, 20003) == desc


def test_malformed_timestamp(sim: PolyvSimulator, http: requests.Session) -> None:
    params = {"appId": APP_ID, "timestamp": "12345"}
    url = f"{sim.url}{SEND_PATH}?appId={APP_ID}&timestamp=12345&sign={sign(params, SECRET)}"
    assert error_desc(send(http, sim, [PHONE], url=url), 400, 20003) == "invalid timestamp."


def test_sha256_signature_method(sim: PolyvSimulator, http: requests.Session) -> None:
    assert statuses(send(http, sim, [PHONE], url=send_url(sim, method="SHA256"))) == [12]
    md5_sign = send_url(sim).rsplit("sign=", 1)[1]
    url = send_url(sim, method="SHA256", override={"sign": md5_sign})
    error_desc(send(http, sim, [PHONE], url=url), 403, 20002)


def test_content_type_must_be_json(sim: PolyvSimulator, http: requests.Session) -> None:
    data = json.dumps(body([PHONE]))
    response = http.post(send_url(sim), data=data, headers={"Content-Type": "text/plain"})
    assert "Content-Type" in error_desc(response, 400, 10001)
    assert sim.received() == 0


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        (body([PHONE] * 201), "phoneNumbers"),
        (body([]), "phoneNumbers"),
        ({"phoneNumbers": [PHONE], "templateParamNames": ["a", "b"]}, "templateParamValues"),
        (body([PHONE]) | {"templateParamValues": []}, "templateParamValues"),
        (body([PHONE]) | {"templateParamNames": []}, "templateParamNames"),
        ([PHONE], "JSON object"),
    ],
)
def test_body_validation(
    sim: PolyvSimulator, http: requests.Session, payload: object, field: str
) -> None:
    response = http.post(send_url(sim), json=payload, timeout=5)
    desc = error_desc(response, 400, 10001)
    assert desc.startswith("参数校验失败: ")
    assert field in desc
    assert sim.received() == 0


def test_over_200_numbers_names_the_limit(sim: PolyvSimulator, http: requests.Session) -> None:
    desc = error_desc(send(http, sim, [PHONE] * 201), 400, 10001)
    assert "at most 200" in desc
    assert statuses(send(http, sim, [PHONE] * 200)) == [12] * 10 + [-1] * 190


def test_fail_numbers_fail_n_times_then_succeed(make_sim: MakeSim, http: requests.Session) -> None:
    sim = make_sim(faults=Faults(fail_numbers={PHONE: 2}), phone_daily_limit=1)
    assert statuses(send(http, sim, [PHONE, OTHER])) == [11, 12]
    assert statuses(send(http, sim, [PHONE])) == [11]
    assert statuses(send(http, sim, [PHONE])) == [12]  # status 11 did not use the limit of 1
    assert statuses(send(http, sim, [PHONE])) == [-1]
    sim.reset()
    assert statuses(send(http, sim, [PHONE])) == [11]


def test_status11_rate_is_reproducible_with_a_seed(
    make_sim: MakeSim, http: requests.Session
) -> None:
    numbers = [f"1380013{i:04d}" for i in range(40)]
    first, second = (make_sim(faults=Faults(status11_rate=0.5, seed=7)) for _ in range(2))
    drawn = statuses(send(http, first, numbers))
    assert 0 < drawn.count(11) < 40
    assert statuses(send(http, second, numbers)) == drawn
    first.reset()
    assert statuses(send(http, first, numbers)) == drawn


def test_http500_fault(sim: PolyvSimulator, http: requests.Session) -> None:
    sim.set_faults(http500_rate=1.0)
    assert error_desc(send(http, sim, [PHONE]), 500, 500) == "internal server error"
    assert (sim.accepted(), sim.received()) == (0, 0)
    assert sim.requests()[0]["fault"] == "http500"


def test_garbage_fault(sim: PolyvSimulator, http: requests.Session) -> None:
    sim.set_faults(garbage_rate=1.0)
    response = send(http, sim, [PHONE])
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/html")
    with pytest.raises(requests.exceptions.JSONDecodeError):
        response.json()
    assert sim.received() == 0


def test_drop_fault(sim: PolyvSimulator, http: requests.Session) -> None:
    sim.set_faults(drop_rate=1.0)
    with pytest.raises(requests.ConnectionError):
        send(http, sim, [PHONE])
    record = sim.requests()[0]
    assert (record["fault"], record["http_status"], record["numbers"]) == ("drop", None, [PHONE])
    assert sim.received() == 0
    sim.set_faults(drop_rate=0.0)
    assert statuses(send(http, sim, [PHONE])) == [12]


def test_rate_limit_fault_via_the_control_endpoint(
    sim: PolyvSimulator, http: requests.Session
) -> None:
    response = http.post(f"{sim.url}/_sim/faults", json={"rate_limit_rate": 1.0}, timeout=5)
    assert response.json()["rate_limit_rate"] == 1.0
    desc = error_desc(send(http, sim, [PHONE]), 403, 10005)
    assert desc == "qps exceeds number of calls"
    assert sim.faults.rate_limit_rate == 1.0
    assert http.get(f"{sim.url}/_sim/faults", timeout=5).json()["rate_limit_rate"] == 1.0
    assert sim.received() == 0


def test_bad_fault_changes_are_refused(sim: PolyvSimulator, http: requests.Session) -> None:
    response = http.post(f"{sim.url}/_sim/faults", json={"bogus": 1}, timeout=5)
    assert "bogus" in error_desc(response, 400, 10001)
    response = http.post(f"{sim.url}/_sim/faults", json={"drop_rate": 2}, timeout=5)
    assert "drop_rate" in error_desc(response, 400, 10001)
    with pytest.raises(ValueError, match="bogus"):
        sim.set_faults(bogus=1)
    with pytest.raises(ValueError, match="status11_rate"):
        Faults(status11_rate=-0.1)
    assert sim.faults == Faults()


@pytest.mark.parametrize(
    "faults", [Faults(latency_s=0.3), Faults(slow_rate=1.0, slow_latency_s=0.3)]
)
def test_latency_slows_the_answer_but_the_sms_is_sent(
    make_sim: MakeSim, http: requests.Session, faults: Faults
) -> None:
    sim = make_sim(faults=faults)
    with pytest.raises(requests.exceptions.ReadTimeout):
        send(http, sim, [PHONE], timeout=0.1)
    deadline = time.monotonic() + 2  # processing normally ended long before the timeout
    while not sim.accepted(PHONE) and time.monotonic() < deadline:
        time.sleep(0.005)
    assert sim.accepted(PHONE) == 1
    assert sim.requests()[0]["http_status"] == 200


def test_control_endpoints(make_sim: MakeSim, http: requests.Session) -> None:
    clock = FakeClock(shanghai(1, 12))
    sim = make_sim(clock=clock)
    assert http.get(f"{sim.url}/_sim/health", timeout=5).json() == {"ok": True}
    send(http, sim, [PHONE], url=send_url(sim, now=clock.now))
    clock.now += 10
    send(http, sim, [PHONE, "123"], url=send_url(sim, now=clock.now, override={"sign": "X"}))
    response = http.get(f"{sim.url}/_sim/sent", timeout=5)
    assert SECRET not in response.text
    assert "sign" not in response.text
    records = response.json()["requests"]
    assert [r["http_status"] for r in records] == [200, 403]
    assert records[0]["results"][0]["status"] == 12
    assert records[1] | {"request_id": None} == {
        "request_id": None,
        "received_at": clock.now,
        "path": SEND_PATH,
        "app_id": APP_ID,
        "timestamp": str(int(clock.now * 1000)),
        "http_status": 403,
        "fault": None,
        "error_code": 20002,
        "numbers": [PHONE, "123"],
        "results": [],
        "template_param_names": ["code"],
        "template_param_values": ["9802"],
    }
    since = http.get(f"{sim.url}/_sim/sent?since={clock.now}", timeout=5).json()["requests"]
    assert [r["error_code"] for r in since] == [20002]
    stats = http.get(f"{sim.url}/_sim/stats", timeout=5).json()
    assert (stats["requests"], stats["accepted"], stats["by_status"]) == (2, 1, {"12": 1})
    assert stats["faults"] == json.loads(json.dumps(Faults().__dict__))
    assert http.post(f"{sim.url}/_sim/reset", timeout=5).json() == {"ok": True}
    assert (sim.requests(), sim.accepted(), sim.received()) == ([], 0, 0)
    response = http.get(f"{sim.url}/nowhere", timeout=5)
    assert error_desc(response, 404, 404).endswith("/nowhere")


def test_requests_are_copies(sim: PolyvSimulator, http: requests.Session) -> None:
    send(http, sim, [PHONE])
    record = sim.requests()[0]
    record["numbers"].append("x")  # type: ignore[attr-defined]
    assert sim.requests()[0]["numbers"] == [PHONE]


def test_concurrent_sends_never_exceed_the_daily_limit(sim: PolyvSimulator) -> None:
    def one_send(_: int) -> list[int]:
        with requests.Session() as session:
            return statuses(send(session, sim, [PHONE, PHONE]))

    with ThreadPoolExecutor(max_workers=8) as pool:
        answered = [status for result in pool.map(one_send, range(24)) for status in result]
    assert answered.count(12) == 10
    assert answered.count(-1) == 38
    assert sim.accepted(PHONE) == 10


def test_logs_mask_numbers_and_never_show_the_secret(
    sim: PolyvSimulator, http: requests.Session, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG, logger="polyv_sms.polyv.simulator"):
        send(http, sim, [PHONE])
        send(http, sim, [PHONE], url=send_url(sim, override={"sign": "X"}))
        sim.set_faults(fail_numbers={PHONE: 1})
    assert "176****6163" in caplog.text
    assert PHONE not in caplog.text
    assert SECRET not in caplog.text


def test_stop_ends_keep_alive_connections_and_is_idempotent(http: requests.Session) -> None:
    sim = PolyvSimulator(APP_ID, SECRET).start()
    assert statuses(send(http, sim, [PHONE])) == [12]
    url = send_url(sim)
    sim.stop()
    sim.stop()
    with pytest.raises(requests.ConnectionError):
        http.post(url, json=body([PHONE]), timeout=5)
