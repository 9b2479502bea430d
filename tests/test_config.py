"""Settings from the environment: defaults, fractions, errors that name the variable."""

from __future__ import annotations

import random

import pytest
from celery import Celery
from celery.backends.base import DisabledBackend

from polyv_sms.backoff import backoff_delay
from polyv_sms.config import Secret, Settings, parse_sentinel_url
from polyv_sms.errors import ConfigError
from polyv_sms.worker import celery_config


def test_defaults_follow_the_design() -> None:
    settings = Settings.from_env({})
    assert settings.api_base == "https://api.polyv.net"
    assert settings.http_timeout_s == 10
    assert settings.broker_url == "redis://localhost:6379/0"
    assert settings.result_backend == settings.broker_url
    assert settings.redis_url == settings.broker_url
    assert settings.phone_daily_limit == 10
    assert settings.account_daily_limit == 2000
    assert settings.timezone == "Asia/Shanghai"
    assert settings.max_attempts == 5
    assert settings.retry_backoff_s == 2
    assert settings.retry_backoff_max_s == 600
    assert settings.receipt_ttl_days == 30
    assert settings.visibility_timeout_s == 3600
    assert settings.app_id is None
    assert settings.app_secret is None


def test_every_variable_is_read() -> None:
    env = {
        "POLYV_APP_ID": "abc",
        "POLYV_APP_SECRET": "topsecret",
        "POLYV_API_BASE": "http://127.0.0.1:8080/",
        "POLYV_HTTP_TIMEOUT": "2.5",
        "SMS_BROKER_URL": "amqp://guest:guest@localhost:5672//",
        "SMS_RESULT_BACKEND": "redis://localhost:6379/1",
        "SMS_REDIS_URL": "redis://localhost:6379/2",
        "SMS_PHONE_DAILY_LIMIT": "3",
        "SMS_ACCOUNT_DAILY_LIMIT": "150",
        "SMS_TIMEZONE": "Europe/Berlin",
        "SMS_MAX_ATTEMPTS": "7",
        "SMS_RETRY_BACKOFF": "0.2",
        "SMS_RETRY_BACKOFF_MAX": "1.5",
        "SMS_RECEIPT_TTL_DAYS": "3",
        "SMS_VISIBILITY_TIMEOUT": "60",
    }
    s = Settings.from_env(env)
    assert (s.app_id, s.api_base, s.http_timeout_s) == ("abc", "http://127.0.0.1:8080", 2.5)
    assert s.require_credentials() == ("abc", Secret("topsecret"))
    assert s.broker_url.startswith("amqp://")
    assert (s.result_backend, s.redis_url) == (env["SMS_RESULT_BACKEND"], env["SMS_REDIS_URL"])
    assert (s.phone_daily_limit, s.account_daily_limit, s.max_attempts) == (3, 150, 7)
    assert (s.retry_backoff_s, s.retry_backoff_max_s) == (0.2, 1.5)
    assert (s.timezone, s.receipt_ttl_days, s.visibility_timeout_s) == ("Europe/Berlin", 3, 60)


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"POLYV_HTTP_TIMEOUT": "ten"}, "POLYV_HTTP_TIMEOUT"),
        ({"POLYV_HTTP_TIMEOUT": "0"}, "POLYV_HTTP_TIMEOUT"),
        ({"SMS_PHONE_DAILY_LIMIT": "2.5"}, "SMS_PHONE_DAILY_LIMIT"),
        ({"SMS_ACCOUNT_DAILY_LIMIT": "-1"}, "SMS_ACCOUNT_DAILY_LIMIT"),
        ({"SMS_MAX_ATTEMPTS": "0"}, "SMS_MAX_ATTEMPTS"),
        ({"SMS_RETRY_BACKOFF": "nan"}, "SMS_RETRY_BACKOFF"),
        ({"SMS_TIMEZONE": "Mars/Olympus"}, "SMS_TIMEZONE"),
        ({"SMS_BROKER_URL": "ftp://x"}, "SMS_BROKER_URL"),
        ({"POLYV_API_BASE": "api.polyv.net"}, "POLYV_API_BASE"),
        ({"SMS_RETRY_BACKOFF_MAX": "1300"}, "SMS_RETRY_BACKOFF_MAX"),
        ({"SMS_VISIBILITY_TIMEOUT": "100"}, "SMS_VISIBILITY_TIMEOUT"),
        ({"SMS_BROKER_URL": "amqp://localhost//", "SMS_REDIS_URL": "amqp://x//"}, "SMS_REDIS_URL"),
        ({"SMS_RETRY_AMBIGUOUS": "maybe"}, "SMS_RETRY_AMBIGUOUS"),
    ],
)
def test_malformed_values_name_the_variable(env: dict[str, str], variable: str) -> None:
    with pytest.raises(ConfigError, match=variable):
        Settings.from_env(env)


def test_a_producer_on_rabbitmq_needs_no_ledger_redis() -> None:
    # Enqueueing needs only the broker: no SMS_REDIS_URL, and no amqp:// result backend,
    # which Celery 5 does not have.
    settings = Settings.from_env({"SMS_BROKER_URL": "amqp://guest:pw@localhost:5672//"})
    assert settings.redis_url is None
    assert settings.result_backend is None
    with pytest.raises(ConfigError, match="SMS_REDIS_URL must be set") as caught:
        settings.require_redis_url()
    assert "pw" not in str(caught.value)
    config = celery_config(settings)
    assert config["broker_url"].startswith("amqp://")
    assert config.get("result_backend") is None
    others = [value for name, value in config.items() if name != "broker_url"]
    assert not any(str(value).startswith(("amqp", "pyamqp")) for value in others)
    app = Celery("check", set_as_current=False)
    app.config_from_object(config)
    assert isinstance(app.backend, DisabledBackend)  # Celery accepts it: no result backend
    assert settings.describe()["redis_url"] is None


def test_a_rabbitmq_broker_keeps_results_in_the_ledger_redis() -> None:
    env = {"SMS_BROKER_URL": "amqp://localhost//", "SMS_REDIS_URL": "redis://localhost:6379/2"}
    settings = Settings.from_env(env)
    assert settings.redis_url == settings.require_redis_url() == env["SMS_REDIS_URL"]
    assert settings.result_backend == env["SMS_REDIS_URL"]
    assert celery_config(settings)["result_backend"] == env["SMS_REDIS_URL"]
    explicit = Settings.from_env(env | {"SMS_RESULT_BACKEND": "redis://localhost:6379/1"})
    assert explicit.result_backend == "redis://localhost:6379/1"
    assert explicit.redis_url == env["SMS_REDIS_URL"]


@pytest.mark.parametrize("broker", ["redis://localhost:6379/3", "rediss://h:6380/0"])
def test_a_redis_broker_is_also_ledger_and_result_backend(broker: str) -> None:
    settings = Settings.from_env({"SMS_BROKER_URL": broker})
    assert settings.redis_url == settings.require_redis_url() == broker
    assert settings.result_backend == broker
    assert celery_config(settings)["result_backend"] == broker


def test_one_sentinel_url_serves_the_ledger_the_broker_and_the_results() -> None:
    # Issue 11: sentinel://host:port alone used to be accepted, then the worker died without
    # a master name. One form now, with the master's name, for all three.
    url = "sentinel://:pw@127.0.0.1:26379,127.0.0.1:26380/mymaster/3"
    settings = Settings.from_env({"SMS_BROKER_URL": url})
    assert settings.redis_url == url
    assert settings.result_backend == url
    parsed = parse_sentinel_url(url)
    assert parsed.sentinels == (("127.0.0.1", 26379), ("127.0.0.1", 26380))
    assert (parsed.master_name, parsed.db, parsed.password) == ("mymaster", 3, "pw")
    assert "pw" not in repr(parsed)
    assert parsed.kombu_url() == (
        "sentinel://:pw@127.0.0.1:26379/3;sentinel://:pw@127.0.0.1:26380/3"
    )
    config = celery_config(settings)
    assert config["broker_url"] == parsed.kombu_url()
    assert config["broker_transport_options"]["master_name"] == "mymaster"
    assert config["result_backend"] == parsed.kombu_url()
    assert config["result_backend_transport_options"]["master_name"] == "mymaster"
    assert parse_sentinel_url("sentinel://h/m").sentinels == (("h", 26379),)


@pytest.mark.parametrize(
    ("variable", "url", "problem"),
    [
        ("SMS_BROKER_URL", "sentinel://localhost:26379", "master's name"),
        ("SMS_BROKER_URL", "sentinel://localhost:26379/0", "master's name"),
        ("SMS_REDIS_URL", "sentinel://localhost:26379/m/x", "database 'x'"),
        ("SMS_RESULT_BACKEND", "sentinel://a:1;sentinel://b:2", "kombu's own"),
        ("SMS_REDIS_URL", "sentinel://a:port/m", "not a number"),
        ("SMS_REDIS_URL", "sentinel://:hunter2@a:1/", "master's name"),
    ],
)
def test_a_bad_sentinel_url_names_its_variable(variable: str, url: str, problem: str) -> None:
    env = {variable: url}
    if variable != "SMS_BROKER_URL":
        env["SMS_BROKER_URL"] = "redis://127.0.0.1:1/0"
    with pytest.raises(ConfigError, match=variable) as caught:
        Settings.from_env(env)
    assert problem in str(caught.value)
    assert "hunter2" not in str(caught.value)


def test_quorum_queues_need_rabbitmq_and_set_up_delayed_delivery() -> None:
    with pytest.raises(ConfigError, match="SMS_QUEUE_TYPE=quorum needs a RabbitMQ"):
        Settings.from_env({"SMS_QUEUE_TYPE": "quorum"})
    with pytest.raises(ConfigError, match="SMS_QUEUE_TYPE='lazy'"):
        Settings.from_env({"SMS_QUEUE_TYPE": "lazy"})
    amqp = {"SMS_BROKER_URL": "amqp://guest:guest@127.0.0.1:5672//"}
    classic = celery_config(Settings.from_env(amqp))
    assert "task_default_queue_type" not in classic
    assert classic["broker_transport_options"]["confirm_publish"] is True
    quorum = celery_config(Settings.from_env({**amqp, "SMS_QUEUE_TYPE": "quorum"}))
    assert quorum["task_default_queue_type"] == "quorum"
    assert quorum["task_default_exchange_type"] == "topic"
    assert quorum["task_create_missing_queue_type"] == "quorum"
    assert quorum["broker_native_delayed_delivery_queue_type"] == "quorum"
    assert quorum["broker_transport_options"]["confirm_publish"] is True


def test_retry_backoff_max_is_checked_against_rabbitmqs_consumer_timeout() -> None:
    amqp = {"SMS_BROKER_URL": "amqp://127.0.0.1//", "SMS_VISIBILITY_TIMEOUT": "86400"}
    with pytest.raises(ConfigError, match="SMS_RABBITMQ_CONSUMER_TIMEOUT=1800"):
        Settings.from_env({**amqp, "SMS_RETRY_BACKOFF_MAX": "1700"})
    # Quorum queues hold a countdown retry in RabbitMQ, not unacknowledged in the worker.
    Settings.from_env({**amqp, "SMS_RETRY_BACKOFF_MAX": "1700", "SMS_QUEUE_TYPE": "quorum"})
    # A Redis broker has no consumer_timeout.
    Settings.from_env({"SMS_RETRY_BACKOFF_MAX": "1700", "SMS_VISIBILITY_TIMEOUT": "86400"})
    Settings.from_env(
        {**amqp, "SMS_RETRY_BACKOFF_MAX": "1700", "SMS_RABBITMQ_CONSUMER_TIMEOUT": "7200"}
    )


def test_missing_credentials_name_both_variables() -> None:
    with pytest.raises(ConfigError, match="POLYV_APP_ID and POLYV_APP_SECRET"):
        Settings.from_env({}).require_credentials()
    with pytest.raises(ConfigError, match="POLYV_APP_SECRET") as caught:
        Settings.from_env({"POLYV_APP_ID": "a"}).require_credentials()
    assert "POLYV_APP_ID" not in str(caught.value)


def test_secret_never_shows() -> None:
    settings = Settings.from_env({"POLYV_APP_ID": "a", "POLYV_APP_SECRET": "hunter2-secret"})
    for text in (
        repr(settings),
        str(settings),
        repr(settings.app_secret),
        str(settings.describe()),
    ):
        assert "hunter2-secret" not in text
    assert settings.app_secret is not None
    assert settings.app_secret.reveal() == "hunter2-secret"


def test_backoff_doubles_with_jitter_and_caps() -> None:
    rng = random.Random(7)
    delays = [backoff_delay(n, 2.0, 600.0, rng) for n in range(1, 12)]
    for attempt, delay in enumerate(delays, start=1):
        nominal = min(600.0, 2.0 * 2 ** (attempt - 1))
        assert nominal * 0.8 <= delay <= min(600.0, nominal * 1.2)
    assert delays[-1] <= 600.0
    assert len({round(d, 6) for d in delays[:5]}) == 5
    assert backoff_delay(1, 0.2, 5.0, random.Random(1)) <= 0.24
