"""docker-compose.yml, the Dockerfile and deploy/supervisord.conf agree with each other and with
.env.example. There is no Docker engine here: the files are parsed and compared."""

from __future__ import annotations

import configparser
import json
import re

import pytest
import yaml
from helpers import ROOT

CONFIG = "deploy/supervisord.conf"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def example_variables() -> set[str]:
    text = (ROOT / ".env.example").read_text()
    return set(re.findall(r"^([A-Z][A-Z0-9_]*)=", text, re.MULTILINE))


@pytest.fixture(scope="module")
def program() -> configparser.SectionProxy:
    parser = configparser.RawConfigParser(inline_comment_prefixes=(";",))
    parser.read(ROOT / CONFIG)
    return parser["program:polyv-sms-worker"]


def _environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def _command(service: dict) -> list[str]:
    command = service["command"]
    return command.split() if isinstance(command, str) else [str(c) for c in command]


def test_services_and_profiles(compose) -> None:
    services = compose["services"]
    assert set(services) == {
        "redis",
        "worker",
        "simulator",
        "flower",
        "rabbitmq",
        "worker-rabbitmq",
    }
    # Redis and the worker run by default; the simulator and Flower only when asked for.
    assert "profiles" not in services["redis"]
    assert "profiles" not in services["worker"]
    assert services["simulator"]["profiles"] == ["tools"]
    assert services["flower"]["profiles"] == ["tools"]
    assert services["rabbitmq"]["profiles"] == ["rabbitmq"]
    assert services["worker-rabbitmq"]["profiles"] == ["rabbitmq"]


def test_rabbitmq_profile_runs_quorum_queues(compose) -> None:
    services = compose["services"]
    rabbit = services["rabbitmq"]
    assert rabbit["image"].startswith("rabbitmq:3.")  # quorum queues: RabbitMQ 3.8+
    assert any(volume.endswith(":/var/lib/rabbitmq") for volume in rabbit["volumes"])
    assert rabbit["volumes"][0].split(":")[0] in compose["volumes"]
    worker = services["worker-rabbitmq"]
    env = _environment(worker)
    user = _environment(rabbit)
    assert env["SMS_BROKER_URL"] == (
        f"amqp://{user['RABBITMQ_DEFAULT_USER']}:{user['RABBITMQ_DEFAULT_PASS']}@rabbitmq:5672//"
    )
    assert env["SMS_QUEUE_TYPE"] == "quorum"
    for name in ("SMS_RESULT_BACKEND", "SMS_REDIS_URL"):
        assert env[name].startswith("redis://redis:6379/"), name
    assert worker["depends_on"]["rabbitmq"]["condition"] == "service_healthy"
    assert _command(worker) == _command(services["worker"])
    # the settings are real: they build a configuration
    from polyv_sms.config import Settings
    from polyv_sms.worker import celery_config

    config = celery_config(Settings.from_env(env))
    assert config["task_default_queue_type"] == "quorum"


def test_redis_keeps_data_and_never_evicts(compose) -> None:
    redis = compose["services"]["redis"]
    command = _command(redis)
    assert command[0] == "redis-server"
    flags = dict(zip(command[1::2], command[2::2], strict=True))
    assert flags["--appendonly"] == "yes"
    assert flags["--maxmemory-policy"] == "noeviction"
    assert flags["--lazyfree-lazy-expire"] == "yes"
    assert any(volume.endswith(":/data") for volume in redis["volumes"])
    assert redis["volumes"][0].split(":")[0] in compose["volumes"]


def test_worker_runs_supervisord_with_the_repository_config(compose, program) -> None:
    worker = compose["services"]["worker"]
    command = _command(worker)
    assert command[0] == "supervisord"
    assert "-n" in command
    assert command[command.index("-c") + 1] == CONFIG
    assert (ROOT / CONFIG).is_file()
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^COPY deploy ", dockerfile, re.MULTILINE)
    assert f'"-c", "{CONFIG}"' in dockerfile
    assert re.search(r"pip install .*supervisor", dockerfile)
    env = _environment(worker)
    # What supervisord.conf reads from the environment is set, for every worker process.
    used = set(re.findall(r"%\(ENV_(\w+)\)s", (ROOT / CONFIG).read_text().split("\n[", 1)[1]))
    assert used <= set(env)
    # The workers find Redis by its service name.
    for name in ("SMS_BROKER_URL", "SMS_RESULT_BACKEND", "SMS_REDIS_URL"):
        assert env[name].startswith("redis://redis:6379/"), name
    # Each worker process serves metrics on SMS_METRICS_PORT + its number: all published.
    first = int(env["SMS_METRICS_PORT"])
    last = first + int(program["numprocs"]) - 1
    assert f"127.0.0.1:{first}-{last}:{first}-{last}" in worker["ports"]
    # docker stop waits longer than supervisord waits for a warm shutdown.
    grace = int(str(worker["stop_grace_period"]).rstrip("s"))
    assert grace >= int(program["stopwaitsecs"]) + 10


def test_credentials_come_from_the_env_file(compose) -> None:
    services = compose["services"]
    for name in ("worker", "simulator"):
        assert services[name]["env_file"] == [".env"], name
    for service in services.values():
        assert not {"POLYV_APP_ID", "POLYV_APP_SECRET"} & set(_environment(service))
    # Flower needs the broker only, never the secret.
    assert "env_file" not in services["flower"]
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".env" in ignored
    assert ".venv" in ignored


def test_every_variable_set_is_documented(compose, example_variables, program) -> None:
    for name, service in compose["services"].items():
        if name not in ("redis", "rabbitmq"):
            assert set(_environment(service)) <= example_variables, name
    dockerfile_env = set(
        re.findall(r"^ENV (SMS_\w+|POLYV_\w+)=", (ROOT / "Dockerfile").read_text(), re.M)
    )
    assert dockerfile_env <= example_variables
    in_program = set(re.findall(r"(\w+)=", program["environment"]))
    assert {v for v in in_program if v.startswith("SMS_")} <= example_variables


def test_tools_use_the_same_image_and_commands(compose) -> None:
    services = compose["services"]
    simulator = _command(services["simulator"])
    assert simulator[:2] == ["polyv-sms", "simulator"]
    assert simulator[simulator.index("--host") + 1] == "0.0.0.0"
    port = simulator[simulator.index("--port") + 1]
    assert f"127.0.0.1:{port}:{port}" in services["simulator"]["ports"]
    flower = _command(services["flower"])
    assert flower[:4] == ["celery", "-A", "polyv_sms.worker", "flower"]
    images = {
        services[name]["image"] for name in ("worker", "worker-rabbitmq", "simulator", "flower")
    }
    assert images == {"polyv-sms:latest"}
    assert all(services[name]["build"] == "." for name in ("worker", "simulator", "flower"))


def test_the_worker_has_a_health_check_and_the_tools_are_pinned(compose, program) -> None:
    services = compose["services"]
    check = services["worker"]["healthcheck"]
    test = [str(part) for part in check["test"]]
    assert test[:3] == ["CMD", "polyv-sms", "healthcheck"]
    # It asks every worker process supervisord runs, not just supervisord.
    assert test[test.index("--processes") + 1] == program["numprocs"]
    # The check's own wait (5 s by default) fits in Docker's timeout for it.
    assert int(str(check["timeout"]).rstrip("s")) > 5
    assert int(str(check["start_period"]).rstrip("s")) >= int(program["startsecs"])
    dockerfile = (ROOT / "Dockerfile").read_text()
    image_check = re.search(r"^HEALTHCHECK [^\n]*\\\n\s*CMD (\[.*\])$", dockerfile, re.M)
    assert image_check
    assert json.loads(image_check.group(1)) == test[1:]
    # The simulator and Flower run other commands from the same image: not the worker's check.
    for name in ("simulator", "flower"):
        assert services[name]["healthcheck"] == {"disable": True}, name
    # What the image installs beside the package is pinned to exact versions.
    install = re.search(r"^RUN pip install (.*)$", dockerfile, re.M)
    assert install
    extras = install.group(1).split()[1:]
    assert [re.sub(r"==.*", "", e.strip('"')) for e in extras] == ["supervisor", "flower"]
    assert all(re.fullmatch(r'"[a-z]+==\d+(\.\d+)+"', e) for e in extras), extras


def test_the_answer_journal_is_on_a_volume_the_worker_may_write(compose) -> None:
    # The default journal ($SMS_RUN_DIR/journal) is in the container's /tmp: recreating the
    # container would lose answers the ledger has not taken yet.
    dockerfile = (ROOT / "Dockerfile").read_text()
    seen = set()
    for name in ("worker", "worker-rabbitmq"):
        service = compose["services"][name]
        journal = _environment(service)["SMS_JOURNAL_DIR"]
        mounts = {v.split(":")[1]: v.split(":")[0] for v in service["volumes"]}
        assert mounts[journal] in compose["volumes"], name
        seen.add(mounts[journal])
        # A new named volume takes the owner of the image's directory: the unprivileged user.
        assert re.search(rf"chown sms [^\n]*{re.escape(journal)}", dockerfile), journal
    assert len(seen) == 2  # two deployments of the image must not replay each other's answers
