"""Scenario 6 - bad input, property-based: whatever a producer sends, through ``send_sms.delay``
or by name (``send_task("polyv_sms.send_sms", ...)``), the answer is a clear
``InvalidRequest`` or a result where each bad number is ``invalid``; a bad number never reaches
Polyv and never takes quota; the one worker serving every example never falls over.
"""

from __future__ import annotations

import re
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pytest
from celery import Celery
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from polyv_sms import send_sms
from polyv_sms.errors import InvalidRequest
from polyv_sms.polyv.phones import check_phone

from .tools import Results, ledger_quota

ARGUMENTS = ("phone_numbers", "template_param_names", "template_param_values", "message_id")
POOL = [f"1390000{i:04d}" for i in range(40)]
BIG_POOL = [f"1380000{i:04d}" for i in range(201)]
MOBILE = re.compile(r"1[3-9][0-9]{9}")
OUTCOMES = {"accepted", "invalid", "quota_exceeded", "account_quota_exceeded", "failed"}


@dataclass
class Call:
    """One producer call: the path, positional and keyword arguments."""

    path: str  # "delay" or "by_name"
    args: list[Any] = field(default_factory=list)
    kwargs: dict[str, Any] = field(default_factory=dict)

    def numbers(self) -> Any:
        if "phone_numbers" in self.kwargs:
            return self.kwargs["phone_numbers"]
        return self.args[0] if self.args else None


def unique(text: str) -> str:
    return f"{text}-{uuid.uuid4().hex}"  # a valid id that no other example uses


valid_number = st.sampled_from(POOL)
formatted_number = valid_number.flatmap(
    lambda n: st.sampled_from(
        [n, int(n), f"+86 {n[:3]}-{n[3:7]}-{n[7:]}", f"0086{n}", f"86{n}", f" ({n[:3]}) {n[3:]} "]
    )
)
bad_number = st.one_of(
    st.text(max_size=14),
    st.from_regex(r"1[3-9][0-9]{2,4}[a-zA-Z\-x][0-9]{4,6}", fullmatch=True),
    st.integers(min_value=-(10**13), max_value=10**13),
    st.sampled_from(
        [
            "１３９００００１２３４",  # full-width digits
            "١٣٩٠٠٠٠١٢٣٤",  # Arabic-Indic digits
            "139000012345",
            "1390000123",
            "12345678901",
            "+85 13900001234",
            "13900001234" * 3,
            "",
            "   ",
        ]
    ),
    st.none(),
    st.booleans(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
phone_numbers = st.one_of(
    st.lists(st.one_of(formatted_number, bad_number), min_size=1, max_size=6),
    st.lists(bad_number, min_size=1, max_size=4),
    st.just([]),
    st.none(),
    st.text(max_size=5),
    st.integers(),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
names = st.one_of(
    st.just(["code"]),
    st.lists(st.text(max_size=8), max_size=3),
    st.lists(st.one_of(st.integers(), st.none(), st.text(max_size=3)), max_size=2),
    st.none(),
    st.text(max_size=4),
)
value = st.one_of(
    st.text(max_size=12), st.integers(), st.floats(allow_nan=False, allow_infinity=False)
)
values = st.one_of(
    st.just(["1"]),
    st.lists(value, max_size=3),
    st.lists(st.one_of(value, st.none(), st.booleans(), st.lists(st.integers())), max_size=2),
    st.none(),
    st.text(max_size=4),
)
#: Message ids that are valid (no space, no control character) and new to the ledger.
fresh_message_id = st.text(
    st.characters(exclude_categories=("Z", "Cc", "Cs")), min_size=1, max_size=8
).map(unique)
message_id = st.one_of(
    st.none(),
    fresh_message_id,
    st.text(max_size=4).map(lambda s: s + " with a space"),
    st.just("x" * 201),
    st.integers(),
)


@st.composite
def calls(draw: st.DrawFn) -> Call:
    path = draw(st.sampled_from(["delay", "by_name"]))
    if draw(st.sampled_from(["well-formed call", "well-formed call", "anything"])) != "anything":
        # A well-formed call whose numbers are a mix of good and bad ones.
        numbers = draw(st.lists(st.one_of(formatted_number, bad_number), min_size=1, max_size=6))
        mid = draw(st.one_of(st.none(), fresh_message_id))
        given = {"phone_numbers": numbers, "template_param_names": ["code", "名字"]}
        given |= {"template_param_values": [draw(value), draw(value)]}
        if mid is not None:
            given["message_id"] = mid
        if draw(st.booleans()):
            return Call(path, [], given)
        return Call(path, [given[name] for name in ARGUMENTS if name in given], {})
    given = {
        "phone_numbers": draw(phone_numbers),
        "template_param_names": draw(names),
        "template_param_values": draw(values),
    }
    mid = draw(message_id)
    if mid is not None:
        given["message_id"] = mid
    shape = draw(st.sampled_from(["keywords", "positional", "mixed", "extra", "too_many"]))
    if shape == "keywords":
        return Call(path, [], given)
    ordered = [given[name] for name in ARGUMENTS if name in given]
    if shape == "positional":
        return Call(path, ordered, {})
    if shape == "mixed":
        return Call(path, ordered[:1], {k: v for k, v in given.items() if k != "phone_numbers"})
    if shape == "extra":
        return Call(path, [], given | {draw(st.sampled_from(["phone", "sign", "queue"])): 1})
    return Call(path, [*ordered, None, None, None][:5], {})


def call(path: str, numbers: Any, **extra: Any) -> Call:
    kwargs = {"phone_numbers": numbers, "template_param_names": ["code"]}
    return Call(path, [], kwargs | {"template_param_values": ["1"]} | extra)


MIXED_200 = [f"13{i:03d}abc{i:03d}" for i in range(150)] + POOL[:40] + [None] * 10
HUGE = [POOL[0]] * 2001


@pytest.fixture
def bad_input_worker(start_worker):
    """One worker for every example of the property test."""
    return start_worker(concurrency=4)


@pytest.mark.slow
@settings(
    max_examples=100,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(calls())
@example(call("delay", MIXED_200, message_id=unique("two-hundred")))
@example(call("by_name", BIG_POOL, message_id=unique("two-hundred-one")))
@example(call("delay", HUGE))
@example(call("by_name", HUGE))
@example(call("by_name", []))
@example(call("delay", None))
@example(Call("by_name", [], {"phone_numbers": [POOL[1]], "template_param_names": ["a", "b"]}))
@example(call("by_name", [POOL[2], "1390000000x", 1, True, 13.9, "１３９００００１２３４"]))
def test_bad_input_is_refused_clearly_and_never_sent(
    bad_input_worker, sim, account, redis_server, call: Call
) -> None:
    results = Results(redis_server.client(1))
    ledger = redis_server.client(2)
    quota_before = ledger_quota(ledger, account[0])
    since = time.time()

    task_id = refusal = None
    if call.path == "delay":
        try:
            task_id = send_sms.delay(*call.args, **call.kwargs).id
        except InvalidRequest as exc:
            refusal = str(exc)
    else:
        task_id = (
            by_name_app(redis_server)
            .send_task("polyv_sms.send_sms", args=call.args, kwargs=call.kwargs, queue="sms")
            .id
        )
    if task_id is not None:
        meta = results.wait([task_id], timeout=60, interval=0.02)[task_id]
        if meta["status"] == "FAILURE":
            # Only the producer-less path can fail in the worker, and only this way.
            assert call.path == "by_name", meta
            assert meta["result"]["exc_type"] == "InvalidRequest", meta
            refusal = meta["result"]["exc_message"][0]
        else:
            counts = meta["result"]["counts"]
            event(f"{call.path}: sent, {'some' if counts['accepted'] else 'none'} accepted")
            check_result(call, meta["result"], sim, since)
            check_quota(meta["result"], quota_before, ledger_quota(ledger, account[0]))
            refusal = None
    if refusal is not None:
        event(f"{call.path}: refused ({refusal.split(':')[0].split('[')[0].split(' ')[0]})")
        # Refused: the message names the argument at fault; nothing sent, no quota taken.
        assert re.match(rf"({'|'.join(ARGUMENTS)}|send_sms|phone|sign|queue)\b", refusal), refusal
        assert sim.requests(since=since) == []
        assert ledger_quota(ledger, account[0]) == quota_before
    # The one worker is still up and has not logged a single traceback.
    assert bad_input_worker.alive()
    assert "Traceback" not in bad_input_worker.log()


_apps: dict[str, Celery] = {}


def by_name_app(redis_server) -> Celery:
    """A producer that enqueues by name only (one per test session's broker)."""
    url = redis_server.url(0)
    if url not in _apps:
        app = Celery("bad-input-producer", broker=url)
        app.conf.update(task_serializer="json", accept_content=["json"])
        _apps[url] = app
    return _apps[url]


def check_result(call: Call, result: dict[str, Any], sim, since: float) -> None:
    """Every input number has its outcome, in order; bad ones ``invalid`` and never sent."""
    keys: list[str] = []
    valid: set[str] = set()
    for raw in call.numbers():
        checked = check_phone(raw)
        key = checked.number if checked.number is not None else checked.raw
        if key not in keys:
            keys.append(key)
        if checked.number is not None:
            valid.add(checked.number)
    entries = result["results"]
    assert [e["phone_number"] for e in entries] == keys
    assert sum(result["counts"].values()) == len(entries)
    sent_now = Counter(n for r in sim.requests(since=since) for n in r["numbers"])
    for entry in entries:
        assert entry["outcome"] in OUTCOMES
        if entry["phone_number"] in valid:
            assert entry["outcome"] != "invalid"
            assert sent_now[entry["phone_number"]] == (entry["status"] is not None)
        else:
            assert entry["outcome"] == "invalid", entry
            assert (entry["status"], entry["attempts"]) == (None, 0)
            assert entry["error"]
    # Polyv only ever saw well-formed, normalised numbers of this request.
    assert all(MOBILE.fullmatch(n) and n in valid for n in sent_now)


def check_quota(result: dict[str, Any], before: Counter[str], after: Counter[str]) -> None:
    """Units were taken for accepted numbers only."""
    accepted = Counter(e["phone_number"] for e in result["results"] if e["outcome"] == "accepted")
    expected = accepted + Counter({"_total": sum(accepted.values())})
    assert after - before == expected
    assert before - after == Counter()
