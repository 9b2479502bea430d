"""The worker's long-lived objects (Redis client, ledger, Polyv client, dispatcher), built once
per process from :class:`~polyv_sms.config.Settings` on first use.

Tests replace them with :func:`set_runtime` (an injected clock, say) before a worker runs.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from polyv_sms.accounts import DEFAULT_ACCOUNT, Account, load_accounts
from polyv_sms.config import JOURNAL_DIR_ENV, Settings
from polyv_sms.dispatch import Dispatcher
from polyv_sms.errors import ConfigError, InvalidRequest
from polyv_sms.ledger import Ledger, LedgerClient, build_ledger, connect_redis
from polyv_sms.ledger.journal import Journal
from polyv_sms.ledger.ratelimit import RateGuard
from polyv_sms.polyv.client import PolyvClient

__all__ = ["AccountRuntime", "Runtime", "build_runtime", "get_runtime", "set_runtime"]


@dataclass(frozen=True)
class AccountRuntime:
    """One account's ledger, Polyv client, rate guard, dispatcher and answer journal."""

    account: Account
    ledger: Ledger
    client: PolyvClient
    dispatcher: Dispatcher
    #: Polyv's answers this account's ledger has not taken yet (``None``: no journal).
    journal: Journal | None = None


@dataclass(frozen=True)
class Runtime:
    """Everything a worker process needs to send."""

    settings: Settings
    redis: LedgerClient
    ledger: Ledger
    client: PolyvClient
    dispatcher: Dispatcher
    #: Every account this worker may send through, by name (issue 12); built lazily.
    accounts: dict[str, Account] = field(default_factory=dict)
    clock: Callable[[], float] = time.time
    rng: random.Random | None = None
    #: The first account's journal (each account has its own: :meth:`account`).
    journal: Journal | None = None
    _built: dict[str, AccountRuntime] = field(default_factory=dict, repr=False)
    #: Every account's rate guard: a block Polyv answers through one pauses all (it is the
    #: IP's).
    _guards: list[RateGuard] = field(default_factory=list, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def account(self, name: str) -> AccountRuntime:
        """The objects of one account, built on first use and kept.

        Raises:
            InvalidRequest: this worker knows no account of that name (nothing is sent).
        """
        built = self._built.get(name)
        if built is not None:
            return built
        with self._lock:
            if name not in self._built:
                account = self.accounts.get(name)
                if account is None:
                    known = ", ".join(sorted(self.accounts)) or "none"
                    raise InvalidRequest(
                        f"account: unknown account {name!r}; this worker knows: {known} "
                        "(POLYV_APP_ID is 'default'; others come from SMS_ACCOUNTS_FILE)"
                    )
                self._built[name] = _build_account(
                    self.settings,
                    account,
                    self.redis,
                    clock=self.clock,
                    rng=self.rng,
                    guards=self._guards,
                )
            return self._built[name]

    def close(self) -> None:
        """Release pooled connections."""
        self.client.close()
        for built in self._built.values():
            built.client.close()
        self.redis.close()


#: Threads of this worker process (``celery worker -c`` may differ from
#: ``SMS_WORKER_CONCURRENCY``), recorded at start-up: the HTTP pool keeps a connection per
#: thread, or urllib3 discards and reopens connections under load.
_worker_threads = 0


def set_worker_threads(count: int) -> None:
    """Record how many threads this worker runs tasks in (sizes the HTTP connection pool)."""
    global _worker_threads  # noqa: PLW0603 - one worker per process
    _worker_threads = count


def build_runtime(
    settings: Settings,
    *,
    clock: Callable[[], float] = time.time,
    rng: random.Random | None = None,
) -> Runtime:
    """Build the runtime for ``settings``.

    Raises:
        ConfigError: no account (``POLYV_APP_ID``/``POLYV_APP_SECRET`` nor
            ``SMS_ACCOUNTS_FILE``), a malformed accounts file, or no ledger Redis
            (``SMS_REDIS_URL``), or a journal directory (``SMS_JOURNAL_DIR``) that cannot be
            created.
        LedgerUnavailable: the ledger's Redis did not answer within ``SMS_REDIS_OUTAGE`` (it
            is asked whether it is a cluster node).
    """
    accounts = load_accounts(settings)
    if not accounts:
        settings.require_credentials()  # names the missing variables
    client = connect_redis(settings.require_redis_url(), wait_s=settings.redis_outage_s)
    # The first account (``default`` when POLYV_APP_ID is set) is also the runtime's own.
    first = accounts.get(DEFAULT_ACCOUNT) or next(iter(accounts.values()))
    guards: list[RateGuard] = []
    built = _build_account(settings, first, client, clock=clock, rng=rng, guards=guards)
    return Runtime(
        settings,
        client,
        built.ledger,
        built.client,
        built.dispatcher,
        accounts=accounts,
        clock=clock,
        journal=built.journal,
        rng=rng,
        _built={first.name: built},
        _guards=guards,
    )


def _build_account(
    settings: Settings,
    account: Account,
    client: LedgerClient,
    *,
    clock: Callable[[], float],
    rng: random.Random | None,
    guards: list[RateGuard] | None = None,
) -> AccountRuntime:
    """The objects of one account: its limits in the ledger, its credentials in the client."""
    own = replace(
        settings,
        app_id=account.app_id,
        phone_daily_limit=account.phone_daily_limit,
        account_daily_limit=account.account_daily_limit,
    )
    ledger = build_ledger(own, client, clock=clock)
    journal = None
    if settings.journal_dir:
        try:
            journal = Journal(settings.journal_dir, account.app_id)
        except OSError as exc:
            raise ConfigError(
                f"{JOURNAL_DIR_ENV}={settings.journal_dir!r}: cannot create the journal ({exc})"
            ) from None
    polyv = PolyvClient(
        account.app_id,
        account.app_secret,
        settings.api_base,
        settings.http_timeout_s,
        clock=clock,
        pool_maxsize=max(10, settings.worker_concurrency, _worker_threads),
    )
    dispatcher = Dispatcher(
        ledger,
        polyv,
        max_attempts=settings.max_attempts,
        retry_backoff_s=settings.retry_backoff_s,
        retry_backoff_max_s=settings.retry_backoff_max_s,
        retry_ambiguous=settings.retry_ambiguous,
        rng=rng,
        clock=clock,
        account=account.name,
        bulk_headroom=account.bulk_headroom,
        guard=RateGuard(ledger, account.polyv_rate, peers=guards),
        journal=journal,
    )
    return AccountRuntime(account, ledger, polyv, dispatcher, journal)


_lock = threading.Lock()
_current: tuple[int, Runtime] | None = None


def get_runtime() -> Runtime:
    """The runtime of this process, built from the environment on first use (and again
    after a fork: connections are not shared across processes)."""
    global _current  # noqa: PLW0603 - one runtime per process, by design
    current = _current
    if current is not None and current[0] == os.getpid():
        return current[1]
    with _lock:
        if _current is None or _current[0] != os.getpid():
            _current = (os.getpid(), build_runtime(Settings.from_env()))
        return _current[1]


def set_runtime(runtime: Runtime | None) -> None:
    """Replace this process's runtime (``None``: build from the environment on next use)."""
    global _current  # noqa: PLW0603
    with _lock:
        _current = None if runtime is None else (os.getpid(), runtime)
