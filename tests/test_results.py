"""What a worker writes of a send_sms result: masked in its task events and log lines, cut to
Celery's ``resultrepr_maxsize``, through ``polyv_sms.results`` (see that module for why)."""

from __future__ import annotations

import json
import os
import re
import textwrap
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from celery.app import trace
from celery.utils.saferepr import saferepr as celery_saferepr
from celery.worker import request
from kombu.serialization import dumps, loads

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


def test_a_big_result_is_written_from_its_first_numbers_and_says_how_many_are_left_out() -> None:
    text = result_text(a_result(2000))
    assert text.count("'phone_number'") == 16
    assert "'...+1984'" in text
    assert text.endswith("'account': 'default', 'lane': 'standard'}")
    # However long a text Celery allows, one left-out result is not left out silently.
    assert "'...+1'" in result_text(a_result(17), 10**6)
    assert "..." not in result_text(a_result(16), 10**6)


def test_rejected_inputs_are_masked_however_they_were_typed() -> None:
    """A rejected input is shown as typed, and it may hold a whole number behind a prefix or
    junk that a pattern bounded by non-digits misses: it is masked like the task's arguments."""
    typed = [
        "+8613900000777x",
        "0086139000007771",
        "86133654061410",
        "\x0013900000777",
        "13900000777\x00",
        "１３９０００００７７７",  # full-width digits
        "177371077110",
    ]
    result = SmsResult(
        message_id="m-2",
        results=[
            {
                "phone_number": raw,
                "outcome": "invalid",
                "status": None,
                "serial_no": None,
                "attempts": 0,
                "error": "not a mainland mobile number",
            }
            for raw in typed
        ],
        counts={"invalid": len(typed)},
        account="default",
        lane="standard",
    )
    text = result_text(result)
    assert text.count("****") == len(typed)
    # No run of five digits (any script's) survives: a masked entry shows 3 and 4 characters.
    assert not re.search(r"\d{5,}", text), text
    for digits in ("13900000777", "3900000", "33654061", "73710771"):
        assert digits not in text


def test_the_text_of_a_result_never_raises() -> None:
    class Broken:
        def __repr__(self) -> str:
            raise RuntimeError("no text")

    result = a_result(1)
    result["results"].append(Broken())
    assert result_text(result, 1024) == results.UNWRITABLE


def test_pickled_or_yaml_a_result_comes_back_a_plain_dict() -> None:
    result = a_result(2)
    for serializer in ("pickle", "yaml", "json"):
        content_type, encoding, body = dumps(result, serializer=serializer)
        back = loads(body, content_type, encoding, accept={content_type})
        assert type(back) is dict, serializer
        assert back == result, serializer


def test_installed_celery_writes_results_with_it_and_everything_else_as_before() -> None:
    results.install()
    results.install()  # once per process, whatever the number of calls
    result = a_result(1)
    assert trace.saferepr(result, 1024) == result_text(result, 1024)
    # The request's event for a prefork child lost after storing its result: the result read
    # back from the backend is a plain dict with a result's keys.
    assert request.saferepr(dict(result), 1024) == result_text(result, 1024)
    almost = {**result, "extra": 1}
    assert request.saferepr(almost, 1024) == celery_saferepr(almost, 1024)
    other: dict[str, Any] = {"phone_number": "13900000001", "nested": [1, (2, 3)]}
    assert trace.saferepr(other, 1024) == celery_saferepr(other, 1024)
    assert trace.saferepr(other, maxlen=20) == celery_saferepr(other, maxlen=20)


def succeeded_events(send: Callable[[], str]) -> dict[str, Any]:
    """The first ``task-succeeded`` event of a task ``send()`` enqueued (it returns the task
    id); ``send`` runs again until one is seen (the subscription is made by the first drain)."""
    seen: list[dict[str, Any]] = []
    sent: list[str] = []

    def ours() -> dict[str, Any] | None:
        return next((event for event in seen if event["uuid"] in sent), None)

    with app.connection_for_read() as connection:
        receiver = app.events.Receiver(connection, handlers={"task-succeeded": seen.append})

        def listen() -> None:
            try:
                for _ in receiver.itercapture(timeout=TIMEOUT, wakeup=False):
                    if ours() is not None:
                        return
            except TimeoutError:
                return  # no event for TIMEOUT s: the caller's assertion says so

        listener = threading.Thread(target=listen, daemon=True)
        listener.start()
        deadline = time.monotonic() + TIMEOUT
        while ours() is None and listener.is_alive():
            assert time.monotonic() < deadline, "no task-succeeded event"
            sent.append(send())
            pause = time.monotonic() + 2
            while time.monotonic() < pause and ours() is None and listener.is_alive():
                time.sleep(0.05)
        # The event may have come in before its task id was known here: stop the listener
        # (it looks at should_stop between its 1-s drains) rather than wait out its timeout.
        receiver.should_stop = True
        listener.join(TIMEOUT)
    event = ours()
    assert event is not None
    return event


def test_task_events_and_log_lines_show_the_result_masked(start_worker) -> None:
    """With events on (Flower), a task-succeeded event carries the text of the result: the
    numbers masked, the outcome there; the worker's INFO line as well."""
    worker = start_worker(extra_args=("-E", "--loglevel", "INFO"))
    number = "13900000777"

    def send() -> str:
        task = send_sms.delay([number], ["code"], [uuid.uuid4().hex[:6]])
        assert task.get(timeout=TIMEOUT)["counts"]["accepted"] == 1
        return str(task.id)

    event = succeeded_events(send)
    assert "'phone_number': '139****0777'" in event["result"]
    assert "'outcome': 'accepted'" in event["result"]
    assert number not in event["result"]
    lines = [line for line in worker.log().splitlines() if "succeeded in" in line]
    assert lines
    assert all("139****0777" in line and number not in line for line in lines)


def test_a_prefork_child_lost_after_its_result_is_stored_sends_the_result_masked(
    start_worker, tmp_path: Path
) -> None:
    """Under a prefork pool (an operator's choice), a child that dies after storing SUCCESS
    makes the worker send task-succeeded itself, from the plain dict read back from the
    result backend (Celery's ``celery.worker.request``): masked too."""
    (tmp_path / "die_after_success.py").write_text(
        textwrap.dedent(
            """
            import os
            from celery import signals
            worker_pool = "prefork"

            @signals.task_postrun.connect
            def _die(kwargs=None, **_):
                if str((kwargs or {}).get("message_id", "")).startswith("die-"):
                    os._exit(1)
            """
        )
    )
    worker = start_worker(
        # Both: Celery's command line takes "-P prefork" alone for "the default" (worker_pool).
        extra_args=("-E", "--loglevel", "INFO", "-P", "prefork"),
        SMS_CELERY_CONFIG="die_after_success",
        PYTHONPATH=os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])),
    )
    number = "13900000779"

    def send() -> str:
        task = send_sms.delay([number], ["code"], ["1"], message_id=f"die-{uuid.uuid4().hex}")
        assert task.get(timeout=TIMEOUT)["counts"]["accepted"] == 1
        return str(task.id)

    event = succeeded_events(send)
    assert "before the worker was lost" in worker.log()  # the path this test is about
    assert "'phone_number': '139****0779'" in event["result"]
    assert number not in event["result"]
