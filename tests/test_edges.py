"""The edges a user touches fail fast and clearly (issue 13): an unreachable broker or result
backend, bad look-up input, the exit statuses, a worker that cannot start its background parts,
a mis-routed task, the help texts. The command runs as the installed console script."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest
import redis
from conftest import worker_env
from helpers import ROOT, RedisServer, WorkerProcess, wait_for

from polyv_sms import BrokerUnavailable, TransientError
from polyv_sms.cli.command import main
from polyv_sms.config import Settings
from polyv_sms.errors import ConfigError
from polyv_sms.tasks import ENQUEUE_BOUND_S, EXIT_BACKGROUND_FAILED

POLYV_SMS = str(Path(sys.executable).parent / "polyv-sms")
#: A command's own start-up (imports) on top of ENQUEUE_BOUND_S, on a loaded machine.
CLI_START_UP_S = 5.0


def clean_env(**values: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("POLYV_", "SMS_"))}
    return env | {"PYTHONUNBUFFERED": "1"} | values


def polyv_sms(env: dict[str, str], *args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    return subprocess.run(
        [POLYV_SMS, *args],
        check=False,
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def stopped_redis(tmp_path: Path) -> str:
    """The URL of a redis-server that ran and was stopped: its port refuses connections."""
    server = RedisServer(tmp_path / "stopped").start()
    server.stop()
    return f"redis://127.0.0.1:{server.port}"


@pytest.fixture
def own_redis(tmp_path: Path):
    server = RedisServer(tmp_path / "own").start()
    yield server
    server.stop()


_DELAY = textwrap.dedent(
    """
    import json, time
    from polyv_sms import BrokerUnavailable
    from polyv_sms.tasks import send_sms
    started = time.monotonic()
    try:
        send_sms.delay(["13900000001"], ["code"], ["1"], message_id="down-1")
        out = {"published": True}
    except BrokerUnavailable as exc:
        out = {
            "variable": exc.variable,
            "message": str(exc),
            "maybe_published": exc.maybe_published,
            "message_id": exc.message_id,
        }
    except BaseException as exc:
        out = {"other": f"{type(exc).__name__}: {exc}"}
    out["elapsed"] = time.monotonic() - started
    print(json.dumps(out))
    """
)


def delay_in_fresh_process(env: dict[str, str], script: str = _DELAY) -> dict[str, Any]:
    """Run ``script`` (by default one ``delay()``) in a new Python; its last line, as JSON."""
    done = subprocess.run(
        [sys.executable, "-c", script],
        check=True,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def layout_env(layout: str, up: str, down: str) -> tuple[dict[str, str], str, str]:
    """A producer's environment where ``down`` (a Redis URL without db) is the broker and the
    result backend ("one redis ..."), the result backend only ("results ...") or the broker only
    ("broker ..."), ``up`` the other: (env, broker URL, the variable the error must name)."""
    broker, results, variable = {
        "one": (f"{down}/0", None, "SMS_RESULT_BACKEND"),
        "results": (f"{up}/0", f"{down}/1", "SMS_RESULT_BACKEND"),
        "broker": (f"{down}/0", f"{up}/1", "SMS_BROKER_URL"),
    }[layout.split(maxsplit=1)[0]]
    env = clean_env(SMS_BROKER_URL=broker)
    if results is not None:
        env["SMS_RESULT_BACKEND"] = results
    return env, broker, variable


def test_broker_unavailable_is_documented_and_transient() -> None:
    assert issubclass(BrokerUnavailable, TransientError)
    assert "BrokerUnavailable" in __import__("polyv_sms").__all__


@pytest.mark.parametrize("layout", ["one redis", "results down", "broker down"])
def test_delay_fails_within_the_bound_and_publishes_nothing(
    layout: str, stopped_redis: str, own_redis: RedisServer
) -> None:
    env, _, variable = layout_env(layout, f"redis://127.0.0.1:{own_redis.port}", stopped_redis)
    out = delay_in_fresh_process(env)
    assert out.get("variable") == variable, out
    assert "the task was not published" in str(out["message"])
    assert float(out["elapsed"]) < ENQUEUE_BOUND_S, out
    with own_redis.client(0) as probe:
        assert probe.llen("sms") == 0  # nothing half-published


@pytest.mark.parametrize("layout", ["one redis", "results frozen", "broker frozen"])
def test_delay_fails_within_the_bound_when_redis_accepts_and_never_answers(
    layout: str, tmp_path: Path, own_redis: RedisServer
) -> None:
    """A Redis stopped with SIGSTOP (or stuck) takes connections and never answers: before the
    socket timeouts, ``delay()`` waited as long as the connection stayed open."""
    frozen = RedisServer(tmp_path / "frozen").start()
    assert frozen.process is not None
    up, down = own_redis.url(0).rsplit("/", 1)[0], frozen.url(0).rsplit("/", 1)[0]
    env, broker, variable = layout_env(layout, up, down)
    frozen.process.send_signal(signal.SIGSTOP)
    try:
        out = delay_in_fresh_process(env)
    finally:
        frozen.process.send_signal(signal.SIGCONT)
    try:
        assert out.get("variable") == variable, out
        assert float(out["elapsed"]) < ENQUEUE_BOUND_S, out
        if variable == "SMS_RESULT_BACKEND":
            # Checked before the publish: nothing reached the broker, even once it wakes.
            assert "the task was not published" in str(out["message"])
            assert out["maybe_published"] is False
            time.sleep(0.5)
            with redis.Redis.from_url(broker) as probe:
                assert probe.llen("sms") == 0
        else:
            assert out["maybe_published"] is True
            assert out["message_id"] == "down-1"
            assert "enqueue again with message_id='down-1'" in str(out["message"])
    finally:
        frozen.stop()


@pytest.fixture
def dropping_port() -> Iterator[int]:
    """A port whose connection attempts are never answered (a host that drops packets): a
    listening socket that never accepts, its backlog full."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    fillers = []
    for _ in range(4):
        filler = socket.socket()
        filler.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            filler.connect(listener.getsockname())
        fillers.append(filler)
    time.sleep(0.2)
    yield listener.getsockname()[1]
    for sock in [*fillers, listener]:
        sock.close()


@pytest.mark.parametrize("layout", ["one redis", "results dropping", "broker dropping"])
def test_delay_fails_within_the_bound_when_connects_are_never_answered(
    layout: str, dropping_port: int, own_redis: RedisServer
) -> None:
    """A connect that times out sent nothing: not published, and the error says so."""
    up = own_redis.url(0).rsplit("/", 1)[0]
    env, _, variable = layout_env(layout, up, f"redis://127.0.0.1:{dropping_port}")
    out = delay_in_fresh_process(env)
    assert out.get("variable") == variable, out
    assert float(out["elapsed"]) < ENQUEUE_BOUND_S, out
    assert "the task was not published" in str(out["message"]), out
    assert out["maybe_published"] is False
    with own_redis.client(0) as probe:
        assert probe.llen("sms") == 0


def test_a_publish_a_frozen_broker_kept_is_sent_once_with_the_id_the_error_names(
    tmp_path: Path, start_worker, sim, redis_server: RedisServer
) -> None:
    """A producer whose broker freezes mid-publish gets BrokerUnavailable(maybe_published), and
    the server runs the buffered publish when it wakes; enqueueing again with the error's
    ``message_id`` (here the task id: no id was given) sends the number once, not twice."""
    broker = RedisServer(tmp_path / "broker").start()
    assert broker.process is not None
    pid = broker.process.pid
    script = textwrap.dedent(
        f"""
        import json, os, signal, time
        from polyv_sms import BrokerUnavailable
        from polyv_sms.tasks import send_sms
        send_sms.delay(["13900000051"], ["code"], ["1"])  # the connections are open
        os.kill({pid}, signal.SIGSTOP)
        started = time.monotonic()
        try:
            send_sms.delay(["13900000052"], ["code"], ["1"])
            out = {{"published": True}}
        except BrokerUnavailable as exc:
            out = {{"maybe_published": exc.maybe_published, "message_id": exc.message_id}}
        out["elapsed"] = time.monotonic() - started
        os.kill({pid}, signal.SIGCONT)
        if out.get("message_id"):
            again = send_sms.delay(
                ["13900000052"], ["code"], ["1"], message_id=out["message_id"]
            )
            out["again"] = again.id
        print(json.dumps(out))
        """
    )
    env = clean_env(SMS_BROKER_URL=broker.url(0), SMS_RESULT_BACKEND=broker.url(1))
    try:
        out = delay_in_fresh_process(env, script)
    finally:
        broker.process.send_signal(signal.SIGCONT)
    try:
        assert out.get("maybe_published") is True, out
        assert float(out["elapsed"]) < ENQUEUE_BOUND_S, out
        with broker.client(0) as probe:
            # The first, the publish the frozen server ran when it woke, and the second try.
            assert probe.llen("sms") == 3
        start_worker(SMS_BROKER_URL=broker.url(0), SMS_RESULT_BACKEND=broker.url(1))
        with broker.client(1) as results:

            def finished() -> bool:
                metas = [json.loads(v) for v in results.mget(results.keys("celery-task-meta-*"))]
                return len(metas) == 3 and all(m["status"] == "SUCCESS" for m in metas)

            wait_for(finished, 60, what="three results")
            again = json.loads(results.get(f"celery-task-meta-{out['again']}"))
        assert again["result"]["message_id"] == out["message_id"]
        assert again["result"]["counts"]["accepted"] == 1
        sent = [n for r in sim.requests() for n in r["numbers"]]
        assert sorted(sent) == ["13900000051", "13900000052"]  # each once
    finally:
        broker.stop()


def test_cli_send_with_redis_down_prints_one_line(stopped_redis: str) -> None:
    env = clean_env(SMS_BROKER_URL=f"{stopped_redis}/0")
    started = time.monotonic()
    done = polyv_sms(env, "send", "13900000032", "-p", "code=1")
    took = time.monotonic() - started
    assert done.returncode == 1, done
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("polyv-sms: error: cannot reach the result backend")
    assert "SMS_BROKER_URL" in lines[0]  # the results live there by default
    assert took < ENQUEUE_BOUND_S + CLI_START_UP_S


def test_cli_send_with_the_broker_down_names_it(stopped_redis: str, own_redis) -> None:
    env = clean_env(SMS_BROKER_URL=f"{stopped_redis}/0", SMS_RESULT_BACKEND=own_redis.url(1))
    started = time.monotonic()
    done = polyv_sms(env, "send", "13900000032", "-p", "code=1", "--wait")
    took = time.monotonic() - started
    assert done.returncode == 1, done
    assert done.stderr.count("\n") == 1, done.stderr
    assert "cannot reach the broker (SMS_BROKER_URL)" in done.stderr
    assert took < ENQUEUE_BOUND_S + CLI_START_UP_S


@pytest.mark.parametrize("timeout", ["0", "0.5"])
def test_wait_timeout_is_one_line(timeout: str, own_redis: RedisServer) -> None:
    env = clean_env(SMS_BROKER_URL=own_redis.url(0))  # no worker: no result comes
    done = polyv_sms(env, "send", "13900000033", "-p", "code=1", "--wait", "--timeout", timeout)
    assert done.returncode == 1
    assert done.stderr.startswith(f"polyv-sms: error: no result within {timeout}s")
    assert done.stderr.count("\n") == 1, done.stderr
    assert "Exception ignored" not in done.stderr


def test_exit_3_when_a_number_is_not_accepted(start_worker, sim, account, redis_server) -> None:
    start_worker(SMS_MAX_ATTEMPTS=1)
    env = worker_env(account, sim, redis_server)
    sim.set_faults(fail_numbers={"13900000042": 1000})
    accepted = polyv_sms(env, "send", "13900000041", "-p", "code=1", "--wait")
    assert accepted.returncode == 0, accepted
    failed = polyv_sms(env, "send", "13900000042", "-p", "code=1", "--wait", "--json")
    assert failed.returncode == 3, failed
    assert json.loads(failed.stdout)["results"][0]["outcome"] == "failed"
    invalid = polyv_sms(env, "send", "13900000041", "12345", "-p", "code=1", "--wait")
    assert invalid.returncode == 3, invalid
    assert "invalid" in invalid.stdout


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("quota", "--day", "foo"), "'foo' is not a day as YYYYMMDD"),
        (("quota", "--day", "20261301"), "'20261301' is not a day as YYYYMMDD"),
        (("quota", "--day", "2026-11-30"), "'2026-11-30' is not a day as YYYYMMDD"),
        (("phone", "abc"), "'abc' contains characters other than digits"),
        (("phone", "1390000"), "'1390000' has 7 digits"),
        (("send", "13900000001"), "give at least one -p NAME=VALUE"),
        (("send", "13900000001", "-p", "=x"), "'=x' has no NAME before '='"),
        (("send", "13900000001", "-p", "code="), "the value of code is empty"),
        (("send", "13900000001", "-p", "code= "), "the value of code is empty"),
        (("dead", "--timeout", "-1"), "--timeout"),
        (("send", "13900000001", "-p", "code=1", "-p", "code=2"), "-p NAME: names repeat"),
        (("send", "13900000001", "-p", "code=1", "--message-id", "a b"), "--message-id: must"),
    ],
)
def test_bad_input_exits_2_with_what_is_expected(args: tuple[str, ...], expected: str) -> None:
    # The account and Redis are fine: only the input is wrong, and nothing is looked up.
    done = polyv_sms(clean_env(POLYV_APP_ID="app-edges"), *args)
    assert done.returncode == 2, done
    assert expected in done.stderr, done.stderr
    assert "template_param" not in done.stderr  # CLI words, not the Python API's
    assert "Traceback" not in done.stderr


def test_metrics_port_is_a_tcp_port() -> None:
    with pytest.raises(ConfigError, match=r"SMS_METRICS_PORT=99999 is not a TCP port"):
        Settings.from_env({"SMS_METRICS_PORT": "99999"})
    with pytest.raises(ConfigError, match="SMS_METRICS_PORT"):
        Settings.from_env({"SMS_METRICS_PORT": "0"})
    assert Settings.from_env({"SMS_METRICS_PORT": "65535"}).metrics_port == 65535
    done = polyv_sms(
        clean_env(POLYV_APP_ID="a", POLYV_APP_SECRET="b", SMS_METRICS_PORT="99999"), "worker"
    )
    assert done.returncode == 2
    assert "SMS_METRICS_PORT=99999 is not a TCP port (1 to 65535)" in done.stderr


@pytest.mark.parametrize("cause", ["port busy", "port past 65535"])
def test_a_background_part_that_cannot_start_stops_the_worker(
    cause: str, account, sim, redis_server, tmp_path: Path
) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("0.0.0.0", 0))  # where the metrics server binds
        busy.listen()
        port, index = busy.getsockname()[1], "0"
        if cause == "port past 65535":
            port, index = 65535, "1"
        env = worker_env(account, sim, redis_server, SMS_METRICS_PORT=port, SMS_WORKER_INDEX=index)
        worker = WorkerProcess(env, tmp_path / "worker.log").start(wait=False)
        try:
            assert worker.process is not None
            code = worker.process.wait(60)
        finally:
            worker.stop()
    assert code == EXIT_BACKGROUND_FAILED, worker.log()
    assert f"metrics: cannot listen on port {int(port) + int(index)}" in worker.log()
    assert "stopping the worker" in worker.log()


def test_a_task_sent_to_the_default_queue_is_moved_and_runs(
    start_worker, sim, account, redis_server, tmp_path: Path
) -> None:
    worker = start_worker()
    # A plain Celery client, enqueueing by name and forgetting queue="sms".
    client = textwrap.dedent(
        f"""
        import json
        from celery import Celery
        app = Celery(broker={redis_server.url(0)!r}, backend={redis_server.url(1)!r})
        app.send_task("someone.else", args=[1])  # another application's task: left alone
        result = app.send_task(
            "polyv_sms.send_sms",
            kwargs={{"phone_numbers": ["13900000051"], "template_param_names": ["code"],
                    "template_param_values": ["1"], "message_id": "misrouted-1"}},
        )
        print(json.dumps(result.get(timeout=60)))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", client],
        check=False,
        capture_output=True,
        text=True,
        timeout=90,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["results"][0]["outcome"] == "accepted"
    assert sim.received("13900000051") == 1
    wait_for(lambda: "moved it to 'sms'" in worker.log(), 10, what="the warning")
    assert "Enqueue by name with queue='sms'" in worker.log()
    with redis_server.client(0) as broker:
        left = broker.lrange("celery", 0, -1)
        broker.delete("celery")
    assert [json.loads(m)["headers"]["task"] for m in left] == ["someone.else"]


def _options(command: click.Command) -> list[click.Option]:
    return [p for p in command.params if isinstance(p, click.Option)]


def test_every_option_has_its_own_help() -> None:
    for name, command in main.commands.items():
        helps = [o.help for o in _options(command)]
        for option in _options(command):
            assert option.help, (name, option.name)
        assert len(set(helps)) == len(helps), (name, helps)


def test_help_texts_a_user_sees() -> None:
    overview = polyv_sms(clean_env(), "--help").stdout
    assert "--config FILE" in overview  # supervisord/supervisorctl take it
    launcher = polyv_sms(clean_env(), "supervisorctl", "--launcher-help").stdout
    assert "--config FILE" in launcher
    assert "The supervisord configuration." in launcher
    dead = polyv_sms(clean_env(), "dead", "--help").stdout
    assert "Seconds --wait waits." in dead
    assert "exit 3" in polyv_sms(clean_env(), "send", "--help").stdout


def test_supervisorctl_does_not_repeat_the_run_dir(tmp_path: Path) -> None:
    env = clean_env(SMS_RUN_DIR=str(tmp_path))
    done = polyv_sms(env, "supervisorctl", "status")  # no supervisord runs: it says so
    assert "SMS_RUN_DIR=" not in done.stderr + done.stdout


def test_healthcheck_answers_for_every_worker_process(
    account, sim, redis_server, tmp_path: Path
) -> None:
    host = f"edges-{uuid.uuid4().hex[:8]}"
    env = worker_env(account, sim, redis_server)
    worker = WorkerProcess(env, tmp_path / "w0.log", extra_args=("-n", f"polyv-sms-0@{host}"))
    worker.start()
    try:
        check = ("healthcheck", "--host", host, "--timeout", "3")
        one = polyv_sms(env, *check, "--processes", "1")
        assert one.returncode == 0, one
        assert "1 of 1 workers answered" in one.stdout
        two = polyv_sms(env, *check, "--processes", "2")
        assert two.returncode == 1, two
        assert f"no answer within 3s from polyv-sms-1@{host}" in two.stderr
        assert f"polyv-sms-0@{host}" not in two.stderr
    finally:
        worker.stop()
    gone = polyv_sms(env, *check, "--processes", "1")
    assert gone.returncode == 1


_RECOVER = textwrap.dedent(
    """
    import sys
    from polyv_sms import BrokerUnavailable
    from polyv_sms.tasks import send_sms
    try:
        send_sms.delay(["13900000001"], ["code"], ["1"])
        sys.exit("published while Redis was down")
    except BrokerUnavailable:
        pass
    print("down", flush=True)
    sys.stdin.readline()  # the test starts Redis again
    print("published", send_sms.delay(["13900000001"], ["code"], ["1"]).id, flush=True)
    """
)


def test_a_producer_enqueues_again_once_redis_is_back(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "back").start()
    server.stop()
    env = clean_env(SMS_BROKER_URL=server.url(0))
    producer = subprocess.Popen(
        [sys.executable, "-c", _RECOVER],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert producer.stdout is not None
        assert producer.stdin is not None
        assert producer.stdout.readline().strip() == "down"
        server.start()
        producer.stdin.write("\n")
        producer.stdin.flush()
        out, err = producer.communicate(timeout=60)
        assert producer.returncode == 0, err
        assert out.startswith("published ")
        with server.client(0) as broker:
            assert broker.llen("sms") == 1
    finally:
        if producer.poll() is None:
            producer.kill()
        server.stop()


def test_the_mover_takes_only_send_sms_messages(own_redis: RedisServer) -> None:
    from polyv_sms.misrouted import MisroutedMover

    def message(task: str, task_id: str) -> str:
        return json.dumps(
            {
                "body": "W10=",
                "headers": {"task": task, "id": task_id},
                "properties": {"delivery_info": {"exchange": "", "routing_key": "celery"}},
            }
        )

    ours, theirs = message("polyv_sms.send_sms", "t-1"), message("someone.else", "t-2")
    broken = '{"not json but mentions polyv_sms.send_sms'
    with own_redis.client(0) as broker:
        broker.lpush("celery", ours, theirs, broken)  # ours is at the head (BRPOP end)
        mover = MisroutedMover.for_broker(own_redis.url(0))
        assert mover is not None
        assert mover.sweep() == ["t-1"]
        assert mover.sweep() == []
        assert broker.lrange("celery", 0, -1) == [broken, theirs]
        (moved,) = broker.lrange("sms", 0, -1)
        assert json.loads(moved)["properties"]["delivery_info"]["routing_key"] == "sms"
        assert json.loads(moved)["headers"] == json.loads(ours)["headers"]
        mover.client.close()
    assert MisroutedMover.for_broker("amqp://guest@127.0.0.1//") is None


def test_healthcheck_with_the_broker_down_is_unhealthy(stopped_redis: str) -> None:
    done = polyv_sms(clean_env(SMS_BROKER_URL=f"{stopped_redis}/0"), "healthcheck")
    assert done.returncode == 1
    assert done.stderr.startswith("polyv-sms: error: cannot ask the workers over the broker")
    assert done.stderr.count("\n") == 1, done.stderr
