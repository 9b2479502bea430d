"""Settings, read once from the environment at the edges (worker start, CLI).

Everything else takes what it needs as arguments. Every variable, its default and its meaning
is listed in ``.env.example`` and docs/configuration.md. A missing or malformed value raises
:class:`~polyv_sms.errors.ConfigError` naming the variable.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any
from urllib.parse import quote, unquote, urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from polyv_sms.errors import ConfigError

__all__ = [
    "DEFAULT_ACCOUNT_DAILY_LIMIT",
    "DEFAULT_API_BASE",
    "DEFAULT_BROKER_URL",
    "DEFAULT_BULK_HEADROOM",
    "DEFAULT_CONNECT_RETRY_BUDGET_S",
    "DEFAULT_HTTP_TIMEOUT_S",
    "DEFAULT_MAX_ATTEMPTS",
    "DEFAULT_PHONE_DAILY_LIMIT",
    "DEFAULT_POLYV_RATE",
    "DEFAULT_QUEUE_TYPE",
    "DEFAULT_RABBITMQ_CONSUMER_TIMEOUT_S",
    "DEFAULT_RECEIPT_TTL_DAYS",
    "DEFAULT_RETRY_BACKOFF_MAX_S",
    "DEFAULT_RETRY_BACKOFF_S",
    "DEFAULT_TAKEOVER_GRACE_S",
    "DEFAULT_TIMEZONE",
    "DEFAULT_VISIBILITY_TIMEOUT_S",
    "MAX_PORT",
    "POLYV_MAX_NUMBERS_PER_REQUEST",
    "QUEUE_TYPES",
    "Secret",
    "SentinelUrl",
    "Settings",
    "exchange_deadline_s",
    "parse_sentinel_url",
    "redact_url",
]

DEFAULT_API_BASE = "https://api.polyv.net"
DEFAULT_HTTP_TIMEOUT_S = 10.0
DEFAULT_BROKER_URL = "redis://localhost:6379/0"
DEFAULT_PHONE_DAILY_LIMIT = 10
DEFAULT_ACCOUNT_DAILY_LIMIT = 2000
DEFAULT_TIMEZONE = "Asia/Shanghai"
DEFAULT_MAX_ATTEMPTS = 5
DEFAULT_RETRY_BACKOFF_S = 2.0
DEFAULT_RETRY_BACKOFF_MAX_S = 600.0
DEFAULT_RECEIPT_TTL_DAYS = 30
DEFAULT_VISIBILITY_TIMEOUT_S = 3600.0
DEFAULT_REDIS_OUTAGE_S = 30.0
DEFAULT_RECONCILE_INTERVAL_S = 30.0
DEFAULT_RECONCILE_GRACE_S = 120.0
DEFAULT_WORKER_CONCURRENCY = 16
#: Units of an account's daily limit that bulk messages may not use (kept for login codes).
DEFAULT_BULK_HEADROOM = 200
#: Polyv requests per second, across every worker sharing the ledger Redis.
DEFAULT_POLYV_RATE = 100.0
#: Polyv refuses more than this many numbers in one request.
POLYV_MAX_NUMBERS_PER_REQUEST = 200
#: ``SMS_QUEUE_TYPE``: RabbitMQ queue type of the ``sms`` queue(s).
DEFAULT_QUEUE_TYPE = "classic"
QUEUE_TYPES = ("classic", "quorum")
#: RabbitMQ's own ``consumer_timeout`` (30 min by default): a delivery left unacknowledged
#: longer closes the channel. ``SMS_RABBITMQ_CONSUMER_TIMEOUT`` states the server's value.
DEFAULT_RABBITMQ_CONSUMER_TIMEOUT_S = 1800.0
DEFAULT_SENTINEL_PORT = 26379
#: How long a starting worker waits for an unreachable ledger before it exits (its supervisor
#: then starts it again).
DEFAULT_LEDGER_START_WAIT_S = 300.0
#: In-place retries of a connection that never reached Polyv take at most this long together.
DEFAULT_CONNECT_RETRY_BUDGET_S = 2.0
#: The highest TCP port: SMS_METRICS_PORT plus a worker's index may not exceed it.
MAX_PORT = 65535
#: How long an expired lease is left to its holder before another run takes over (its answer
#: may be in its journal, waiting for the ledger to come back).
DEFAULT_TAKEOVER_GRACE_S = 10.0
#: What a lease adds to the exchange and the settle: the client's own slack past its
#: deadline, the journal's flush to disk and scheduling.
LEASE_MARGIN_S = 5.0
#: Where worker processes keep ``SMS_RUN_DIR`` when it is not set (see polyv_sms.cli.run).
RUN_DIR_ENV = "SMS_RUN_DIR"
JOURNAL_DIR_ENV = "SMS_JOURNAL_DIR"


def default_journal_dir(env: Mapping[str, str]) -> str:
    """``$SMS_RUN_DIR/journal``, or ``<temp dir>/polyv-sms-<uid>/journal``."""
    import tempfile  # noqa: PLC0415 - only at start-up

    run_dir = (env.get(RUN_DIR_ENV) or "").strip()
    if not run_dir:
        uid = os.getuid() if hasattr(os, "getuid") else 0
        run_dir = os.path.join(tempfile.gettempdir(), f"polyv-sms-{uid}")
    return os.path.join(run_dir, "journal")


def exchange_deadline_s(http_timeout_s: float) -> float:
    """The wall-clock bound on one Polyv exchange: DNS, connect (with its in-place retries),
    sending the request and every byte of the answer. A lease must outlive it."""
    return 2 * http_timeout_s + DEFAULT_CONNECT_RETRY_BUDGET_S


class Secret:
    """A string that does not show itself in ``repr``, ``str``, logs or tracebacks."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """Return the secret itself; only for computing a sign."""
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(("Secret", self._value))

    def __reduce__(self) -> Any:
        raise TypeError("a Secret is not serialisable; pass it explicitly where it is needed")


def _text(env: Mapping[str, str], name: str, default: str | None) -> str | None:
    raw = env.get(name)
    if raw is None or not raw.strip():
        return default
    return raw.strip()


def _required_text(env: Mapping[str, str], name: str, default: str) -> str:
    value = _text(env, name, default)
    assert value is not None
    return value


def _number(
    env: Mapping[str, str], name: str, default: float, *, minimum: float, integer: bool = False
) -> float:
    raw = _text(env, name, None)
    if raw is None:
        return default
    kind = "an integer" if integer else "a number of seconds"
    try:
        value = float(int(raw)) if integer else float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not {kind}") from None
    if not math.isfinite(value) or value < minimum:
        raise ConfigError(f"{name}={raw!r} must be {kind} >= {minimum:g}")
    return value


def _integer(env: Mapping[str, str], name: str, default: int, *, minimum: int) -> int:
    return int(_number(env, name, default, minimum=minimum, integer=True))


def _port(env: Mapping[str, str], name: str) -> int:
    port = _integer(env, name, 0, minimum=1)
    if port > MAX_PORT:
        raise ConfigError(f"{name}={port} is not a TCP port (1 to {MAX_PORT})")
    return port


def _url(env: Mapping[str, str], name: str, default: str, schemes: tuple[str, ...]) -> str:
    value = _required_text(env, name, default)
    parts = urlsplit(value)
    if parts.scheme not in schemes:
        raise ConfigError(f"{name}: scheme {parts.scheme!r} is not one of {', '.join(schemes)}")
    if not parts.netloc and parts.scheme not in ("memory",):
        raise ConfigError(f"{name}: {_redact_url(value)!r} has no host")
    return value


def redact_url(url: str) -> str:
    """``url`` with its password, if any, shown as ``***``."""
    return _redact_url(url)


def _redact_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.password:
        return url.replace(f":{parts.password}@", ":***@")
    return url


_BROKER_SCHEMES = ("redis", "rediss", "amqp", "amqps", "pyamqp", "sentinel", "memory")
_REDIS_SCHEMES = ("redis", "rediss", "unix")
#: The ledger may also live behind Sentinel (``sentinel://``).
_LEDGER_SCHEMES = (*_REDIS_SCHEMES, "sentinel")
_AMQP_SCHEMES = ("amqp", "amqps", "pyamqp")
#: Brokers whose URL Celery also takes as a result backend (``sentinel://`` included).
_REDIS_BROKER_SCHEMES = ("redis", "rediss", "sentinel")


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Every setting of polyv-sms; build it with :meth:`from_env` or directly in tests.

    Durations are seconds as floats (fractions allowed). The secret is a :class:`Secret`.
    """

    app_id: str | None = None
    app_secret: Secret | None = field(default=None, repr=False)
    api_base: str = DEFAULT_API_BASE
    http_timeout_s: float = DEFAULT_HTTP_TIMEOUT_S
    broker_url: str = DEFAULT_BROKER_URL
    #: ``None``: Celery runs without a result backend (``AsyncResult.get()`` cannot work).
    result_backend: str | None = DEFAULT_BROKER_URL
    #: The ledger's Redis; ``None`` when unknown (a producer needs none). Where the ledger
    #: is used, :meth:`require_redis_url` says which variable to set.
    redis_url: str | None = DEFAULT_BROKER_URL
    phone_daily_limit: int = DEFAULT_PHONE_DAILY_LIMIT
    account_daily_limit: int = DEFAULT_ACCOUNT_DAILY_LIMIT
    timezone: str = DEFAULT_TIMEZONE
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    retry_backoff_s: float = DEFAULT_RETRY_BACKOFF_S
    retry_backoff_max_s: float = DEFAULT_RETRY_BACKOFF_MAX_S
    receipt_ttl_days: int = DEFAULT_RECEIPT_TTL_DAYS
    visibility_timeout_s: float = DEFAULT_VISIBILITY_TIMEOUT_S
    redis_outage_s: float = DEFAULT_REDIS_OUTAGE_S
    retry_ambiguous: bool = True
    reconcile_interval_s: float = DEFAULT_RECONCILE_INTERVAL_S
    reconcile_grace_s: float = DEFAULT_RECONCILE_GRACE_S
    worker_concurrency: int = DEFAULT_WORKER_CONCURRENCY
    metrics_port: int | None = None
    # --- accounts, lanes and the rate guard (issue 12) ---
    #: ``SMS_ACCOUNTS_FILE``: TOML file of further accounts (see :mod:`polyv_sms.accounts`).
    accounts_file: str | None = None
    bulk_headroom: int = DEFAULT_BULK_HEADROOM
    polyv_rate: float = DEFAULT_POLYV_RATE
    #: ``classic`` or ``quorum`` (RabbitMQ only; see :func:`polyv_sms.worker.celery_config`).
    queue_type: str = DEFAULT_QUEUE_TYPE
    #: A module of Celery settings that win over the project's (``SMS_CELERY_CONFIG``).
    celery_config_module: str | None = None
    rabbitmq_consumer_timeout_s: float = DEFAULT_RABBITMQ_CONSUMER_TIMEOUT_S
    ledger_start_wait_s: float = DEFAULT_LEDGER_START_WAIT_S
    takeover_grace_s: float = DEFAULT_TAKEOVER_GRACE_S
    #: Where a worker keeps Polyv's answers until the ledger has them; ``None``: no journal.
    journal_dir: str | None = None

    def __post_init__(self) -> None:
        try:
            ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ConfigError(f"SMS_TIMEZONE={self.timezone!r} is not a known time zone") from None
        if self.retry_backoff_max_s * 3 >= self.visibility_timeout_s:
            raise ConfigError(
                f"SMS_RETRY_BACKOFF_MAX={self.retry_backoff_max_s:g} must stay below a third of "
                f"SMS_VISIBILITY_TIMEOUT={self.visibility_timeout_s:g}, or the Redis broker "
                "redelivers a task that is still waiting for its retry"
            )
        if self.retry_backoff_s > self.retry_backoff_max_s:
            raise ConfigError(
                f"SMS_RETRY_BACKOFF={self.retry_backoff_s:g} is above "
                f"SMS_RETRY_BACKOFF_MAX={self.retry_backoff_max_s:g}"
            )
        self._check_broker_kind()
        if self.phone_daily_limit > self.account_daily_limit:
            raise ConfigError(
                f"SMS_PHONE_DAILY_LIMIT={self.phone_daily_limit} is above "
                f"SMS_ACCOUNT_DAILY_LIMIT={self.account_daily_limit}"
            )

    def _check_broker_kind(self) -> None:
        """What only a RabbitMQ broker has: quorum queues and a ``consumer_timeout``."""
        if self.queue_type not in QUEUE_TYPES:
            raise ConfigError(
                f"SMS_QUEUE_TYPE={self.queue_type!r} is not one of {', '.join(QUEUE_TYPES)}"
            )
        amqp = urlsplit(self.broker_url).scheme in _AMQP_SCHEMES
        if self.queue_type == "quorum" and not amqp:
            raise ConfigError(
                "SMS_QUEUE_TYPE=quorum needs a RabbitMQ broker (amqp://); SMS_BROKER_URL is "
                f"{_redact_url(self.broker_url)!r}"
            )
        # A countdown retry on a classic queue waits in the worker, unacknowledged (quorum
        # queues hold it in RabbitMQ's delay queues instead): RabbitMQ closes the channel of a
        # delivery unacknowledged for longer than its consumer_timeout, and the run is redone.
        waits = self.retry_backoff_max_s if self.queue_type == "classic" else 0.0
        if amqp and waits + self.task_time_limit_s >= self.rabbitmq_consumer_timeout_s:
            raise ConfigError(
                f"SMS_RETRY_BACKOFF_MAX={waits:g} plus the task time limit "
                f"({self.task_time_limit_s:g}s) must stay below SMS_RABBITMQ_CONSUMER_TIMEOUT="
                f"{self.rabbitmq_consumer_timeout_s:g} (RabbitMQ's consumer_timeout), or "
                "RabbitMQ closes the channel of a worker holding a task unacknowledged"
            )

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read the settings from environment variables.

        Args:
            env: the variables; ``os.environ`` when omitted.

        Returns:
            The settings. Credentials and the ledger's Redis may be absent: producers only
            enqueue. Call :meth:`require_credentials` where sending happens and
            :meth:`require_redis_url` where the ledger is used.

        Raises:
            ConfigError: a variable is malformed; the message names it.
        """
        env = os.environ if env is None else env
        broker = _url(env, "SMS_BROKER_URL", DEFAULT_BROKER_URL, _BROKER_SCHEMES)
        broker_scheme = urlsplit(broker).scheme
        redis_url: str | None = None
        if _text(env, "SMS_REDIS_URL", None) is not None:
            redis_url = _url(env, "SMS_REDIS_URL", broker, _LEDGER_SCHEMES)
        elif broker_scheme in _LEDGER_SCHEMES:
            redis_url = broker
        # A Redis broker is also the result backend; otherwise the ledger's Redis, if any
        # (Celery 5 has no amqp:// result backend); otherwise none.
        result_default = broker if broker_scheme in _REDIS_BROKER_SCHEMES else redis_url
        result_backend = _text(env, "SMS_RESULT_BACKEND", result_default)
        for name, url in (
            ("SMS_BROKER_URL", broker),
            ("SMS_RESULT_BACKEND", result_backend),
            ("SMS_REDIS_URL", redis_url),
        ):
            if url is not None and url.startswith("sentinel:"):
                parse_sentinel_url(url, name)  # fails here, naming the variable
        secret = _text(env, "POLYV_APP_SECRET", None)
        metrics_port = _text(env, "SMS_METRICS_PORT", None)
        return cls(
            app_id=_text(env, "POLYV_APP_ID", None),
            app_secret=Secret(secret) if secret else None,
            api_base=_url(env, "POLYV_API_BASE", DEFAULT_API_BASE, ("http", "https")).rstrip("/"),
            http_timeout_s=_number(
                env, "POLYV_HTTP_TIMEOUT", DEFAULT_HTTP_TIMEOUT_S, minimum=0.001
            ),
            broker_url=broker,
            result_backend=result_backend,
            redis_url=redis_url,
            phone_daily_limit=_integer(
                env, "SMS_PHONE_DAILY_LIMIT", DEFAULT_PHONE_DAILY_LIMIT, minimum=1
            ),
            account_daily_limit=_integer(
                env, "SMS_ACCOUNT_DAILY_LIMIT", DEFAULT_ACCOUNT_DAILY_LIMIT, minimum=1
            ),
            timezone=_required_text(env, "SMS_TIMEZONE", DEFAULT_TIMEZONE),
            max_attempts=_integer(env, "SMS_MAX_ATTEMPTS", DEFAULT_MAX_ATTEMPTS, minimum=1),
            retry_backoff_s=_number(env, "SMS_RETRY_BACKOFF", DEFAULT_RETRY_BACKOFF_S, minimum=0),
            retry_backoff_max_s=_number(
                env, "SMS_RETRY_BACKOFF_MAX", DEFAULT_RETRY_BACKOFF_MAX_S, minimum=0
            ),
            receipt_ttl_days=_integer(
                env, "SMS_RECEIPT_TTL_DAYS", DEFAULT_RECEIPT_TTL_DAYS, minimum=1
            ),
            visibility_timeout_s=_number(
                env, "SMS_VISIBILITY_TIMEOUT", DEFAULT_VISIBILITY_TIMEOUT_S, minimum=1
            ),
            redis_outage_s=_number(env, "SMS_REDIS_OUTAGE", DEFAULT_REDIS_OUTAGE_S, minimum=0),
            retry_ambiguous=_flag(env, "SMS_RETRY_AMBIGUOUS", default=True),
            reconcile_interval_s=_number(
                env, "SMS_RECONCILE_INTERVAL", DEFAULT_RECONCILE_INTERVAL_S, minimum=0
            ),
            reconcile_grace_s=_number(
                env, "SMS_RECONCILE_GRACE", DEFAULT_RECONCILE_GRACE_S, minimum=0
            ),
            worker_concurrency=_integer(
                env, "SMS_WORKER_CONCURRENCY", DEFAULT_WORKER_CONCURRENCY, minimum=1
            ),
            metrics_port=None if metrics_port is None else _port(env, "SMS_METRICS_PORT"),
            # --- accounts, lanes and the rate guard (issue 12) ---
            accounts_file=_text(env, "SMS_ACCOUNTS_FILE", None),
            bulk_headroom=_integer(env, "SMS_BULK_HEADROOM", DEFAULT_BULK_HEADROOM, minimum=0),
            polyv_rate=_number(env, "SMS_POLYV_RATE", DEFAULT_POLYV_RATE, minimum=0.001),
            queue_type=_required_text(env, "SMS_QUEUE_TYPE", DEFAULT_QUEUE_TYPE).lower(),
            celery_config_module=_text(env, "SMS_CELERY_CONFIG", None),
            rabbitmq_consumer_timeout_s=_number(
                env,
                "SMS_RABBITMQ_CONSUMER_TIMEOUT",
                DEFAULT_RABBITMQ_CONSUMER_TIMEOUT_S,
                minimum=1,
            ),
            ledger_start_wait_s=_number(
                env, "SMS_LEDGER_START_WAIT", DEFAULT_LEDGER_START_WAIT_S, minimum=0
            ),
            takeover_grace_s=_number(
                env, "SMS_TAKEOVER_GRACE", DEFAULT_TAKEOVER_GRACE_S, minimum=0
            ),
            journal_dir=_journal_dir(env),
        )

    def require_credentials(self) -> tuple[str, Secret]:
        """Return ``(app_id, app_secret)`` or fail naming the missing variable.

        Raises:
            ConfigError: ``POLYV_APP_ID`` or ``POLYV_APP_SECRET`` is not set.
        """
        pairs = (("POLYV_APP_ID", self.app_id), ("POLYV_APP_SECRET", self.app_secret))
        missing = [name for name, value in pairs if not value]
        if missing:
            raise ConfigError(f"{' and '.join(missing)} must be set to send SMS (see .env.example)")
        assert self.app_id is not None
        assert self.app_secret is not None
        return self.app_id, self.app_secret

    def require_redis_url(self) -> str:
        """Return the ledger's Redis URL or fail naming ``SMS_REDIS_URL``.

        Raises:
            ConfigError: ``SMS_REDIS_URL`` is not set and the broker is not a Redis URL.
        """
        if self.redis_url is None:
            raise ConfigError(
                f"SMS_REDIS_URL must be set: the broker {_redact_url(self.broker_url)!r} is not "
                "Redis (redis://, rediss://, unix:// or sentinel://), and quotas and receipts "
                "live in Redis"
            )
        return self.redis_url

    @property
    def task_time_limit_s(self) -> float:
        """Hard limit for one run of the task: every chunk's HTTP call at its worst, plus
        the ledger's outage budget, plus a margin."""
        chunks = math.ceil(self.account_daily_limit / POLYV_MAX_NUMBERS_PER_REQUEST)
        return math.ceil(chunks * self.exchange_deadline_s + 2 * self.redis_outage_s + 30)

    @property
    def exchange_deadline_s(self) -> float:
        """The wall-clock bound on one Polyv exchange (see :func:`exchange_deadline_s`)."""
        return exchange_deadline_s(self.http_timeout_s)

    @property
    def lease_s(self) -> float:
        """How long one run may hold a message's pending numbers, from ``reserve`` to
        ``settle`` of one HTTP request, before another run may take them over."""
        return self.exchange_deadline_s + self.redis_outage_s + LEASE_MARGIN_S

    def describe(self) -> dict[str, object]:
        """The settings as a dict for display, with the secret and URL passwords hidden."""
        shown: dict[str, object] = {}
        for item in fields(self):
            value = getattr(self, item.name)
            if item.name == "app_secret":
                value = "(set)" if value else "(not set)"
            elif isinstance(value, str) and "://" in value:
                value = _redact_url(value)
            shown[item.name] = value
        return shown


def _journal_dir(env: Mapping[str, str]) -> str | None:
    """``SMS_JOURNAL_DIR``: a directory, ``off`` (no journal), or unset (the default)."""
    raw = _text(env, JOURNAL_DIR_ENV, None)
    if raw is None:
        return default_journal_dir(env)
    return None if raw.lower() == "off" else raw


def _flag(env: Mapping[str, str], name: str, *, default: bool) -> bool:
    raw = _text(env, name, None)
    if raw is None:
        return default
    lowered = raw.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name}={raw!r} is not a boolean (true/false)")


@dataclass(frozen=True)
class SentinelUrl:
    """``sentinel://[:password@]host:port[,host:port...]/MASTER_NAME[/DB]``, parsed.

    The one URL form for a Redis behind Sentinel, for the ledger, the broker and the result
    backend alike. The password is the master's (and its replicas'); sentinels that need one
    of their own take it from the Celery setting ``broker_transport_options['sentinel_kwargs']``
    (see ``SMS_CELERY_CONFIG``); the ledger sends the sentinels no password, so the
    sentinels the ledger asks must not require one.
    """

    sentinels: tuple[tuple[str, int], ...]
    master_name: str
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    def kombu_url(self) -> str:
        """The URL kombu's and Celery's Sentinel support read: one ``sentinel://`` per
        sentinel, ``;``-separated (the master's name goes in the transport options)."""
        auth = ""
        if self.password is not None:
            auth = f"{quote(self.username or '', safe='')}:{quote(self.password, safe='')}@"
        return ";".join(
            f"sentinel://{auth}{host}:{port}/{self.db}" for host, port in self.sentinels
        )


def parse_sentinel_url(url: str, name: str = "SMS_REDIS_URL") -> SentinelUrl:
    """Parse a ``sentinel://`` URL of this project's form (see :class:`SentinelUrl`).

    Args:
        url: the URL.
        name: the variable it came from, for the error message.

    Raises:
        ConfigError: the URL is not of that form; the message names ``name``.
    """
    shown = _redact_url(url)
    form = "sentinel://[:password@]host:port[,host:port...]/MASTER_NAME[/DB]"
    if ";" in url:
        raise ConfigError(
            f"{name}: {shown!r} is kombu's own Sentinel form; write it as {form} (one URL for "
            "the ledger, the broker and the result backend; the project translates it)"
        )
    parts = urlsplit(url)
    if parts.scheme != "sentinel":
        raise ConfigError(f"{name}: {shown!r} is not a sentinel:// URL ({form})")
    credentials, _, hosts = parts.netloc.rpartition("@")
    username, password = None, None
    if credentials:
        user, has_password, secret = credentials.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if has_password else None
    sentinels: list[tuple[str, int]] = []
    for item in hosts.split(","):
        host, _, port = item.strip().rpartition(":") if ":" in item else (item.strip(), "", "")
        if not host:
            raise ConfigError(f"{name}: {shown!r} names no sentinel host ({form})")
        if port and not port.isdigit():
            raise ConfigError(f"{name}: {shown!r}: port {port!r} is not a number ({form})")
        sentinels.append((host, int(port) if port else DEFAULT_SENTINEL_PORT))
    path = [segment for segment in parts.path.split("/") if segment]
    if not path or len(path) > 2 or (len(path) == 1 and path[0].isdigit()):
        raise ConfigError(f"{name}: {shown!r} needs the master's name ({form})")
    if len(path) == 2 and not path[1].isdigit():
        raise ConfigError(f"{name}: {shown!r}: database {path[1]!r} is not a number ({form})")
    db = int(path[1]) if len(path) == 2 else 0
    return SentinelUrl(tuple(sentinels), unquote(path[0]), db, username, password)
