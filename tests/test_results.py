"""What a worker writes of a send_sms result: masked in its task events and log lines, cut to
Celery's ``resultrepr_maxsize``, through ``polyv_sms.results`` (see that module for why)."""

from __future__ import annotations

import json
import re
import threading
import time
from typing import Any

from celery.app import trace
from celery.utils.saferepr import saferepr as celery_saferepr

from polyv_sms import results, send_sms
from polyv_sms.results import SmsResult, result_text
from polyv_sms.worker import app

TIMEOUT = 60
ELEVEN_DIGITS = re.compile(r"(?<![0-9])[0-9]{11}(?![0-9])")


def a_result(count: int, start: int = 0) -> SmsResult:
    numbers = [f"139{i:08d}" for i in range(start, start + count)]
    return SmsResult(
        message_id="m-1",
        results=[
            {
                "phone_number": number,
                "outcome": "accepted",
                "status": 12,
                "serial_no": f"SN{number}",
                "attempts": 1,
                "error": None,
            }
            for number in numbers
        ],
        counts={"accepted": count, "invalid": 0},
        account="default",
        lane="standard",
    )


def test_a_result_is_a_plain_dict_to_json_and_callers() -> None:
    result = a_result(2)
    plain = json.loads(json.dumps(result))
    assert plain == result
    assert isinstance(result, dict)
    assert type(plain) is dict


def test_the_text_masks_every_number_and_keeps_the_outcomes() -> None:
    text = result_text(a_result(3))
    assert text.startswith("{'message_id': 'm-1', 'results': [{'phone_number': '139****0000'")
    assert "'outcome': 'accepted'" in text
    # The serial numbers held the phone numbers too: masked as well.
    assert not ELEVEN_DIGITS.search(text)
    assert text.count("****") == 6


def test_a_cut_never_leaves_a_number_half_masked_or_whole() -> None:
    whole = result_text(a_result(40))
    for maxlen in range(150, 400):
        text = result_text(a_result(40), maxlen)
        assert len(text) == maxlen + 3
        assert text.endswith("...")
        assert text[:maxlen] == whole[:maxlen]
        # No run of digits longer than the 4 a masked number shows at either end.
        assert not re.search(r"[0-9]{5,}", text.replace("SN", " ")), text


def test_a_big_result_is_written_from_its_first_numbers_only() -> None:
    text = result_text(a_result(2000))
    assert text.count("'phone_number'") == 16
    assert text.endswith("'account': 'default', 'lane': 'standard'}")


def test_installed_celery_writes_results_with_it_and_everything_else_as_before() -> None:
    results.install()
    results.install()  # once per process, whatever the number of calls
    result = a_result(1)
    assert trace.saferepr(result, 1024) == result_text(result, 1024)
    other: dict[str, Any] = {"phone_number": "13900000001", "nested": [1, (2, 3)]}
    assert trace.saferepr(other, 1024) == celery_saferepr(other, 1024)
    assert trace.saferepr(dict(result), 20) == celery_saferepr(dict(result), 20)


def test_task_events_and_log_lines_show_the_result_masked(start_worker) -> None:
    """With events on (Flower), a task-succeeded event carries the text of the result: the
    numbers masked, the outcome there; the worker's INFO line as well."""
    worker = start_worker(extra_args=("-E", "--loglevel", "INFO"))
    number = "13900000777"
    seen: list[dict[str, Any]] = []
    sent: list[str] = []

    def ours() -> dict[str, Any] | None:
        return next((event for event in seen if event["uuid"] in sent), None)

    with app.connection_for_read() as connection:
        receiver = app.events.Receiver(connection, handlers={"task-succeeded": seen.append})

        def listen() -> None:
            for _ in receiver.itercapture(timeout=TIMEOUT, wakeup=False):
                if ours() is not None:
                    return

        listener = threading.Thread(target=listen, daemon=True)
        listener.start()
        deadline = time.monotonic() + TIMEOUT
        # The subscription is made by the listener's first drain: send until an event is seen.
        while ours() is None and listener.is_alive():
            assert time.monotonic() < deadline, "no task-succeeded event"
            outcome = send_sms.delay([number], ["code"], [str(len(sent))]).get(timeout=TIMEOUT)
            assert outcome["counts"]["accepted"] == 1
            sent.append(outcome["message_id"])
            pause = time.monotonic() + 2
            while time.monotonic() < pause and ours() is None and listener.is_alive():
                time.sleep(0.05)
        listener.join(TIMEOUT)
    event = ours()
    assert event is not None
    assert "'phone_number': '139****0777'" in event["result"]
    assert "'outcome': 'accepted'" in event["result"]
    assert number not in event["result"]
    lines = [line for line in worker.log().splitlines() if "succeeded in" in line]
    assert lines
    assert all("139****0777" in line and number not in line for line in lines)
