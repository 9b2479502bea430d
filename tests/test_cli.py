"""The ``polyv-sms`` command, run as the installed console script against real parts."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import worker_env
from helpers import ROOT, free_port, wait_for

from polyv_sms import Receipts
from polyv_sms.config import Settings
from polyv_sms.ledger import build_ledger, connect_redis
from polyv_sms.polyv.client import PolyvClient

POLYV_SMS = str(Path(sys.executable).parent / "polyv-sms")


def run(env: dict[str, str], *args: str, code: int = 0) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [POLYV_SMS, *args],
        check=False,
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert done.returncode == code, (args, done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr
    return done


def run_json(env: dict[str, str], *args: str, code: int = 0) -> object:
    return json.loads(run(env, *args, "--json", code=code).stdout)


@pytest.fixture
def env(account, sim, redis_server) -> dict[str, str]:
    return worker_env(account, sim, redis_server)


def test_send_and_look_everything_up(start_worker, sim, env, account) -> None:
    start_worker(SMS_MAX_ATTEMPTS=2)
    good, bad = "13900000901", "13900000902"
    sim.set_faults(fail_numbers={bad: 1000})
    # Exit 3: the outcome came, and some numbers did not end accepted.
    sent = run_json(
        env,
        "send",
        good,
        bad,
        "12345",
        "-p",
        "code=1234",
        "--message-id",
        "cli-1",
        "--wait",
        code=3,
    )
    assert sent["message_id"] == "cli-1"
    assert [(r["phone_number"], r["outcome"]) for r in sent["results"]] == [
        (good, "accepted"),
        (bad, "failed"),
        ("12345", "invalid"),
    ]
    serial = sent["results"][0]["serial_no"]

    # The look-ups, each its own process, run side by side.
    lookups = {
        "status": ("status", "cli-1", "--json"),
        "status table": ("status", "cli-1"),
        "receipt": ("receipt", serial, "--json"),
        "receipt table": ("receipt", serial),
        "phone": ("phone", good, "--json"),
        "phone table": ("phone", good),
        "quota": ("quota", "--json"),
        "dead": ("dead", "--json"),
        "dead table": ("dead",),
    }
    with concurrent.futures.ThreadPoolExecutor(len(lookups)) as pool:
        futures = {name: pool.submit(run, env, *args) for name, args in lookups.items()}
    out = {name: future.result().stdout for name, future in futures.items()}

    status = json.loads(out["status"])
    assert status["pending"] == 0
    assert {n["phone_number"]: n["state"] for n in status["numbers"]} == {
        good: "accepted",
        bad: "failed",
        "12345": "invalid",
    }
    assert "NUMBER" in out["status table"]
    assert serial in out["status table"]
    assert "gave up after 2 attempts" in out["status table"]

    receipt = json.loads(out["receipt"])
    assert (receipt["phone_number"], receipt["message_id"], receipt["attempt"]) == (
        good,
        "cli-1",
        1,
    )
    assert good in out["receipt table"]

    phone = json.loads(out["phone"])
    assert [r["serial_no"] for r in phone["receipts"]] == [serial]
    assert phone["today"]["count"] == 1
    assert "1 of 10 SMS today" in out["phone table"]

    quota = json.loads(out["quota"])
    assert quota["account"] == {"used": 1, "limit": 2000}
    assert quota["top"][0] == {"phone_number": good, "count": 1}

    dead = json.loads(out["dead"])
    assert [(d["message_id"], [f["phone_number"] for f in d["failed"]]) for d in dead] == [
        ("cli-1", [bad])
    ]
    assert "cli-1" in out["dead table"]

    # Requeue: the failed number is sent again, the accepted one is not.
    sim.set_faults(fail_numbers={})
    again = run_json(env, "dead", "--requeue", "cli-1", "--wait", code=3)  # 12345 is invalid
    assert {r["phone_number"]: r["outcome"] for r in again["results"]} == {
        good: "accepted",
        bad: "accepted",
        "12345": "invalid",
    }
    assert sim.received(good) == 1
    assert run_json(env, "dead") == []
    refused = run(env, "dead", "--requeue", "cli-1", code=1)
    assert "no failed numbers" in refused.stderr


def test_errors_are_messages_with_exit_codes(env) -> None:
    no_account = {k: v for k, v in env.items() if k != "POLYV_APP_ID"}
    cases = [
        (env, ("status", "no-such-message"), 1, "no message 'no-such-message'"),
        (env, ("receipt", "000^0"), 1, "no receipt '000^0'"),
        (no_account, ("status", "x"), 2, "POLYV_APP_ID must be set"),
        (env | {"SMS_PHONE_DAILY_LIMIT": "ten"}, ("quota",), 2, "SMS_PHONE_DAILY_LIMIT"),
        (env | {"SMS_REDIS_URL": "redis://127.0.0.1:1/0"}, ("quota",), 1, "SMS_REDIS_URL"),
        (env, ("send", "13900000911", "-p", "code"), 2, "NAME=VALUE"),
        (env, ("send", "13900000911", "-p", "code=1", "--message-id", "a b"), 2, "--message-id"),
        (env | {"POLYV_APP_SECRET": ""}, ("worker",), 2, "POLYV_APP_SECRET must be set"),
        (env, ("dead", "--requeue", "no-such-message"), 1, "no message"),
    ]
    with concurrent.futures.ThreadPoolExecutor(len(cases)) as pool:
        done = list(pool.map(lambda case: run(case[0], *case[1], code=case[2]), cases))
    for (_, args, _, message), result in zip(cases, done, strict=True):
        assert message in result.stderr, (args, result.stderr)
        assert result.stderr.startswith(("polyv-sms: error:", "Usage:")), result.stderr
        assert env["POLYV_APP_SECRET"] not in result.stderr + result.stdout


def test_reconcile_enqueues_a_message_whose_retry_never_ran(
    start_worker, sim, env, account, redis_server
) -> None:
    start_worker()
    settings = Settings.from_env(env)
    # A run that reserved a number ten minutes ago and died before its retry was published.
    stale = build_ledger(
        settings, connect_redis(settings.redis_url), clock=lambda: time.time() - 600
    )
    number = "13900000921"
    meta = {
        "task_id": "lost-task-1",
        "phone_numbers": [number],
        "template_param_names": ["code"],
        "template_param_values": ["1"],
        "created_at": time.time() - 600,
    }
    stale.reserve("stuck-1", [number], token="dead-run", meta=meta)
    assert sim.received() == 0

    assert run_json(env, "reconcile") == {"enqueued": ["stuck-1"]}
    receipts = Receipts(build_ledger(settings, connect_redis(settings.redis_url)))
    wait_for(lambda: (receipts.message("stuck-1") or {}).get("pending") == 0, 30)
    assert receipts.message("stuck-1")["numbers"][0]["state"] == "accepted"
    assert sim.received(number) == 1
    # A sweep holds a lock for a moment; then nothing is overdue any more.
    wait_for(lambda: run_json(env, "reconcile") == {"enqueued": []}, 10, 0.2)


def test_simulator_command(account) -> None:
    app_id, secret = account
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("POLYV_", "SMS_"))}
    env |= {"POLYV_APP_ID": app_id, "POLYV_APP_SECRET": secret}
    command = [POLYV_SMS, "simulator", "--port", str(port), "--fail-number", "13900000931=1"]
    process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
    try:
        with PolyvClient(app_id, secret, f"http://127.0.0.1:{port}", 2) as client:

            def send() -> list[int]:
                return [r.status for r in client.send(["13900000931"], ["code"], ["1"]).results]

            assert wait_for(lambda: _answers(send), 10, what="the simulator") == [11]
            assert send() == [12]
    finally:
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=10)
    assert process.returncode == 0
    assert f"listening on http://127.0.0.1:{port}" in err
    assert secret not in err


def _answers(send):  # type: ignore[no-untyped-def]
    try:
        return send()
    except Exception:
        return None
