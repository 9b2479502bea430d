"""Several Polyv accounts in one deployment: the accounts file (``SMS_ACCOUNTS_FILE``).

A TOML file with one table per account::

    [accounts.shop-a]
    app_id = "..."
    app_secret_env = "SHOP_A_SECRET"        # or: app_secret_file = "/run/secrets/shop-a"
    # optional: phone_daily_limit, account_daily_limit, bulk_headroom, polyv_rate

A secret never sits in the file itself: a key that looks like one is refused, naming the
account and the key. ``POLYV_APP_ID``/``POLYV_APP_SECRET``, when set, are the account named
``default``; the per-account limits default to the ``SMS_*`` settings.

Producers (``send_sms.delay``) only need the names (:func:`account_names`, no secret read);
workers resolve the secrets (:func:`load_accounts`).
"""

from __future__ import annotations

import math
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from polyv_sms.config import Secret, Settings
from polyv_sms.errors import ConfigError

__all__ = [
    "DEFAULT_ACCOUNT",
    "Account",
    "account_app_ids",
    "account_names",
    "account_settings",
    "load_accounts",
    "widest",
]

#: The account of ``POLYV_APP_ID``/``POLYV_APP_SECRET``, and the task's default.
DEFAULT_ACCOUNT = "default"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_ALLOWED = frozenset(
    {
        "app_id",
        "app_secret_env",
        "app_secret_file",
        "phone_daily_limit",
        "account_daily_limit",
        "bulk_headroom",
        "polyv_rate",
    }
)
#: Keys refused outright: they would put a secret in the file.
_SECRET_KEYS = frozenset({"app_secret", "secret", "appsecret", "password", "app_key", "key"})


@dataclass(frozen=True, kw_only=True)
class Account:
    """One Polyv account and its limits.

    Attributes:
        name: the account's name (the task's ``account`` keyword).
        app_id: Polyv's appId; the ledger's keys carry it.
        app_secret: the secret (never shown).
        phone_daily_limit: accepted sends per number per day.
        account_daily_limit: accepted sends per account per day.
        bulk_headroom: units of the daily limit that bulk messages may not use.
        polyv_rate: Polyv requests per second across every worker.
    """

    name: str
    app_id: str
    app_secret: Secret = field(repr=False)
    phone_daily_limit: int
    account_daily_limit: int
    bulk_headroom: int
    polyv_rate: float

    def __post_init__(self) -> None:
        where = f"account {self.name!r}"
        if self.phone_daily_limit > self.account_daily_limit:
            raise ConfigError(
                f"{where}: phone_daily_limit={self.phone_daily_limit} is above "
                f"account_daily_limit={self.account_daily_limit}"
            )


def _read_file(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"SMS_ACCOUNTS_FILE={path!r}: no such file") from None
    except OSError as exc:
        raise ConfigError(f"SMS_ACCOUNTS_FILE={path!r}: cannot read it ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"SMS_ACCOUNTS_FILE={path!r}: not valid TOML ({exc})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"SMS_ACCOUNTS_FILE={path!r}: not UTF-8 text (TOML is UTF-8)") from None
    tables = data.get("accounts")
    extra = sorted(set(data) - {"accounts"})
    if extra:
        raise ConfigError(
            f"SMS_ACCOUNTS_FILE={path!r}: unknown top-level key {extra[0]!r}; "
            "give one [accounts.NAME] table per account"
        )
    if not isinstance(tables, dict) or not tables:
        raise ConfigError(f"SMS_ACCOUNTS_FILE={path!r}: no [accounts.NAME] table")
    for name, table in tables.items():
        _check_table(path, name, table)
    return tables


def _check_table(path: str, name: str, table: object) -> None:
    where = f"SMS_ACCOUNTS_FILE={path!r}: [accounts.{name}]"
    if not _NAME.fullmatch(name):
        raise ConfigError(
            f"{where}: the name must be 1 to 64 letters, digits, '_', '.' or '-', "
            "starting with a letter or digit"
        )
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: must be a table")
    for key in table:
        if key.lower() in _SECRET_KEYS or ("secret" in key.lower() and key not in _ALLOWED):
            raise ConfigError(
                f"{where}: key {key!r} would put a secret in the file; a secret never sits "
                "there: give app_secret_env (an environment variable) or app_secret_file"
            )
        if key not in _ALLOWED:
            raise ConfigError(f"{where}: unknown key {key!r}; known: {', '.join(sorted(_ALLOWED))}")
    app_id = table.get("app_id")
    if not isinstance(app_id, str) or not app_id.strip():
        raise ConfigError(f"{where}: app_id must be a non-empty string")
    ways = [key for key in ("app_secret_env", "app_secret_file") if key in table]
    if len(ways) != 1:
        raise ConfigError(f"{where}: give exactly one of app_secret_env or app_secret_file")
    if not isinstance(table[ways[0]], str) or not table[ways[0]].strip():
        raise ConfigError(f"{where}: {ways[0]} must be a non-empty string")


def account_names(settings: Settings) -> frozenset[str] | None:
    """The accounts a producer may name, read from ``SMS_ACCOUNTS_FILE`` without any secret.

    Returns:
        The names (``default`` always included: the worker may have ``POLYV_APP_ID`` when
        the producer does not), or ``None`` when no accounts file is configured (the worker
        then decides).

    Raises:
        ConfigError: the file is missing or malformed; the message names the problem.
    """
    if not settings.accounts_file:
        return None
    return frozenset(_read_file(settings.accounts_file)) | {DEFAULT_ACCOUNT}


def account_app_ids(settings: Settings) -> dict[str, str]:
    """The appId of each account a producer knows (``POLYV_APP_ID`` as ``default``, and the
    accounts file's), read without any secret."""
    app_ids = {DEFAULT_ACCOUNT: settings.app_id} if settings.app_id else {}
    if settings.accounts_file:
        for name, table in _read_file(settings.accounts_file).items():
            app_ids.setdefault(name, str(table["app_id"]).strip())
    return app_ids


def widest(settings: Settings) -> Settings:
    """``settings`` with ``account_daily_limit`` raised to the largest account's, for what must
    fit a message of any account: the request size a producer accepts and the task's time
    limit. Each account's own limit still applies to its messages (in the worker)."""
    if not settings.accounts_file:
        return settings
    path = settings.accounts_file
    largest = settings.account_daily_limit
    for name, table in _read_file(path).items():
        where = f"SMS_ACCOUNTS_FILE={path!r}: [accounts.{name}]"
        limit = _limit(where, table, "account_daily_limit", settings.account_daily_limit, 1)
        largest = max(largest, limit)
    if largest == settings.account_daily_limit:
        return settings
    return replace(settings, account_daily_limit=largest)


def account_settings(settings: Settings, name: str) -> Settings:
    """``settings`` as one account sees them (its appId and limits), read without its secret:
    for look-ups (the ``polyv-sms`` commands' ``--account``).

    Raises:
        ConfigError: no such account; the message lists the known ones.
    """
    if name == DEFAULT_ACCOUNT and (settings.app_id or not settings.accounts_file):
        return settings  # (without POLYV_APP_ID, the caller names the missing variable)
    tables = _read_file(settings.accounts_file) if settings.accounts_file else {}
    table = tables.get(name)
    if table is None:
        known = sorted({*tables, *([DEFAULT_ACCOUNT] if settings.app_id else [])})
        raise ConfigError(
            f"--account {name!r}: no such account (known: {', '.join(known) or 'none'}; "
            "POLYV_APP_ID is 'default', others come from SMS_ACCOUNTS_FILE)"
        )
    where = f"SMS_ACCOUNTS_FILE={settings.accounts_file!r}: [accounts.{name}]"
    return replace(
        settings,
        app_id=str(table["app_id"]).strip(),
        phone_daily_limit=_limit(where, table, "phone_daily_limit", settings.phone_daily_limit, 1),
        account_daily_limit=_limit(
            where, table, "account_daily_limit", settings.account_daily_limit, 1
        ),
        bulk_headroom=_limit(where, table, "bulk_headroom", settings.bulk_headroom, 0),
        polyv_rate=_rate(where, table, settings.polyv_rate),
    )


def _secret(path: str, name: str, table: Mapping[str, Any], env: Mapping[str, str]) -> Secret:
    where = f"SMS_ACCOUNTS_FILE={path!r}: [accounts.{name}]"
    if "app_secret_env" in table:
        variable = str(table["app_secret_env"]).strip()
        value = env.get(variable, "").strip()
        if not value:
            raise ConfigError(f"{where}: app_secret_env names {_shown_variable(variable)}")
        return Secret(value)
    secret_path = Path(str(table["app_secret_file"]).strip())
    shown = _shown_path(str(secret_path))
    try:
        value = secret_path.read_text("utf-8").strip()
    except OSError as exc:
        raise ConfigError(
            f"{where}: app_secret_file {shown} cannot be read ({exc.strerror})"
        ) from None
    except UnicodeDecodeError:
        # (not the error's own text: it shows a byte of the secret)
        raise ConfigError(f"{where}: app_secret_file {shown} is not UTF-8 text") from None
    if not value:
        raise ConfigError(f"{where}: app_secret_file {shown} is empty")
    return Secret(value)


#: What an environment variable's name looks like by convention (``SHOP_A_SECRET``).
_VARIABLE_NAME = re.compile(r"[A-Z_][A-Z0-9_]*")


def _shown_variable(variable: str) -> str:
    """The error's words for an unset ``app_secret_env``: its name, unless the value does not
    look like a variable's name - then it is likely the secret itself, pasted in the wrong
    place, and must not reach a log."""
    if _VARIABLE_NAME.fullmatch(variable):
        return f"{variable}, which is not set"
    return (
        "a variable that is not set (its value is not shown: it does not look like an "
        "environment variable's name - is the secret itself pasted there? a secret never "
        "sits in the file)"
    )


def _shown_path(path: str) -> str:
    """The error's words for ``app_secret_file``: the path, unless it has neither a ``/`` nor
    a ``.`` - then it may be the secret itself, pasted in the wrong place."""
    if "/" in path or "." in path:
        return repr(path)
    return (
        "(its value is not shown: it does not look like a path - is the secret itself "
        "pasted there?)"
    )


def _limit(where: str, table: Mapping[str, Any], key: str, default: int, minimum: int) -> int:
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{where}: {key}={value!r} must be an integer >= {minimum}")
    return value


def _rate(where: str, table: Mapping[str, Any], default: float) -> float:
    value = table.get("polyv_rate", default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{where}: polyv_rate={value!r} must be a number of requests per second")
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{where}: polyv_rate={value!r} must be > 0")
    return float(value)


def load_accounts(settings: Settings, env: Mapping[str, str] | None = None) -> dict[str, Account]:
    """Every account a worker can send through, secrets resolved.

    Args:
        settings: the settings (``SMS_ACCOUNTS_FILE`` and the defaults of the limits).
        env: where ``app_secret_env`` variables are read; ``os.environ`` when omitted.

    Returns:
        Accounts by name; ``default`` is ``POLYV_APP_ID``/``POLYV_APP_SECRET`` when both are
        set.

    Raises:
        ConfigError: the file is malformed, a secret is missing, or the file also defines
            ``default`` while ``POLYV_APP_ID`` is set; the message names the account and key.
    """
    env = os.environ if env is None else env
    accounts: dict[str, Account] = {}
    if settings.app_id or settings.app_secret:
        settings.require_credentials()  # one without the other: name the missing variable
    if settings.app_id and settings.app_secret:
        accounts[DEFAULT_ACCOUNT] = Account(
            name=DEFAULT_ACCOUNT,
            app_id=settings.app_id,
            app_secret=settings.app_secret,
            phone_daily_limit=settings.phone_daily_limit,
            account_daily_limit=settings.account_daily_limit,
            bulk_headroom=settings.bulk_headroom,
            polyv_rate=settings.polyv_rate,
        )
    if not settings.accounts_file:
        return accounts
    path = settings.accounts_file
    for name, table in _read_file(path).items():
        where = f"SMS_ACCOUNTS_FILE={path!r}: [accounts.{name}]"
        if name in accounts:
            raise ConfigError(
                f"{where}: POLYV_APP_ID is already the account {DEFAULT_ACCOUNT!r}; "
                "rename the table or unset POLYV_APP_ID"
            )
        accounts[name] = Account(
            name=name,
            app_id=str(table["app_id"]).strip(),
            app_secret=_secret(path, name, table, env),
            phone_daily_limit=_limit(
                where, table, "phone_daily_limit", settings.phone_daily_limit, 1
            ),
            account_daily_limit=_limit(
                where, table, "account_daily_limit", settings.account_daily_limit, 1
            ),
            bulk_headroom=_limit(where, table, "bulk_headroom", settings.bulk_headroom, 0),
            polyv_rate=_rate(where, table, settings.polyv_rate),
        )
    by_app_id: dict[str, str] = {}
    for account in accounts.values():
        other = by_app_id.setdefault(account.app_id, account.name)
        if other != account.name:
            # Two names for one appId would share one ledger but not one set of limits.
            raise ConfigError(
                f"SMS_ACCOUNTS_FILE={path!r}: accounts {other!r} and {account.name!r} have "
                "the same app_id; give each Polyv account one name"
            )
    return accounts
