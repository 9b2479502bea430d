"""A worker's Prometheus endpoint and its log lines, scraped and read as an operator would."""

from __future__ import annotations

import urllib.request

from helpers import free_port, wait_for
from prometheus_client.parser import text_string_to_metric_families

from polyv_sms import send_sms

TIMEOUT = 60


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of ``/metrics``: (name, sorted labels) -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as page:
        text = page.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_metrics_and_log_lines_follow_the_sends(start_worker, sim, account) -> None:
    port = free_port()
    worker = start_worker(SMS_METRICS_PORT=port, SMS_PHONE_DAILY_LIMIT=1)
    wait_for(lambda: _reachable(port), 10, what="the metrics endpoint")
    before = scrape(port)
    assert before[("polyv_sms_numbers_per_request_count", ())] == 0

    steady, flaky = "13900000801", "13900000802"
    sim.set_faults(fail_numbers={flaky: 1})
    first = send_sms.delay([steady, "12345"], ["code"], ["1"]).get(timeout=TIMEOUT)
    retried = send_sms.delay([flaky], ["code"], ["1"]).get(timeout=TIMEOUT)
    refused = send_sms.delay([steady], ["code"], ["2"]).get(timeout=TIMEOUT)
    assert [r["outcome"] for r in first["results"]] == ["accepted", "invalid"]
    assert retried["results"][0]["attempts"] == 2
    assert refused["results"][0]["outcome"] == "quota_exceeded"

    after = scrape(port)

    def value(name: str, **labels: str) -> float:
        return after.get((name, tuple(sorted(labels.items()))), 0.0)

    lane = {"account": "default", "lane": "standard"}
    assert value("polyv_sms_outcomes_total", outcome="accepted", **lane) == 2
    assert value("polyv_sms_outcomes_total", outcome="invalid", **lane) == 1
    assert value("polyv_sms_outcomes_total", outcome="quota_exceeded", **lane) == 1
    assert value("polyv_sms_outcomes_total", outcome="failed", **lane) == 0
    assert value("polyv_sms_retries_total", reason="status_11") == 1
    assert value("polyv_sms_quota_refusals_total", kind="quota_exceeded", **lane) == 1
    assert value("polyv_sms_task_retries_total", reason="pending") == 1
    # Three Polyv requests, each answered, one number each; the refusal never reached Polyv.
    assert value("polyv_sms_polyv_request_seconds_count", result="answered") == 3
    assert value("polyv_sms_polyv_request_seconds_bucket", result="answered", le="+Inf") == 3
    assert 0 < value("polyv_sms_polyv_request_seconds_sum", result="answered") < 3
    assert value("polyv_sms_numbers_per_request_count") == 3
    assert value("polyv_sms_numbers_per_request_sum") == 3
    assert sim.received() == 3

    # One log line per Polyv request, with its requestId; numbers masked; the secret never.
    log = worker.log()
    lines = [line for line in log.splitlines() if "polyv send requestId=" in line]
    assert len(lines) == 3
    request_ids = {r["request_id"] for r in sim.requests()}
    assert {line.split("requestId=")[1].split()[0] for line in lines} == request_ids
    assert sum("139****0801" in line for line in lines) == 1
    assert sum("139****0802" in line for line in lines) == 2
    for secret_or_number in (account[1], steady, flaky):
        assert secret_or_number not in log


def _reachable(port: int) -> bool:
    try:
        scrape(port)
    except OSError:
        return False
    return True
