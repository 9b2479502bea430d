"""Where a message goes and which account sends it: the task's side of accounts and lanes.

- :func:`route` (producer): the lane's queue, a refusal of an account the producer's
  ``SMS_ACCOUNTS_FILE`` does not list, and the account's appId in a message header when the
  producer knows it.
- :func:`account_for` (worker): the account's objects; a message whose header names another
  appId than this worker's account of that name is refused, never sent (two deployments on one
  broker: ``dead --requeue`` run with account B's settings must not go out through A).
- :func:`rate_waits` / :func:`retry_options`: retries caused by the rate guard are counted in
  a header of their own, so that they do not count towards giving a message up.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from polyv_sms.accounts import DEFAULT_ACCOUNT, account_app_ids, account_names
from polyv_sms.config import Settings
from polyv_sms.errors import InvalidRequest
from polyv_sms.lanes import queue_for
from polyv_sms.validation import SmsRequest

if TYPE_CHECKING:
    from polyv_sms.runtime import AccountRuntime, Runtime

__all__ = [
    "APP_ID_HEADER",
    "WAITS_HEADER",
    "account_for",
    "producer_accounts",
    "rate_waits",
    "retry_options",
    "route",
]

#: Message header: the appId the producer meant (set by ``dead --requeue`` and by producers
#: that have the accounts file).
APP_ID_HEADER = "polyv_sms_app_id"
#: Message header: task retries that were waits for the rate guard (no attempt consumed).
WAITS_HEADER = "polyv_sms_rate_waits"
_WAIT_REASONS = frozenset({"rate", "paused"})


def producer_accounts(settings: Settings) -> dict[str, Any]:
    """What a producer knows of the accounts, for the Celery configuration (no secret read).

    Returns:
        ``{"polyv_sms_account_names": [...] or None, "polyv_sms_app_ids": {name: appId}}``;
        names are ``None`` without an accounts file (the worker decides then).
    """
    names = account_names(settings)
    return {
        "polyv_sms_account_names": None if names is None else sorted(names),
        "polyv_sms_app_ids": account_app_ids(settings) if names is not None else {},
    }


def route(conf: Mapping[str, Any], request: SmsRequest, options: dict[str, Any]) -> None:
    """Fill a publish's options for ``request``: its lane's queue and the appId header.

    Raises:
        InvalidRequest: the producer has an accounts file that does not list the account.
    """
    names = conf.get("polyv_sms_account_names")
    if names is not None and request.account not in names:
        raise InvalidRequest(
            f"account: unknown account {request.account!r}; SMS_ACCOUNTS_FILE lists "
            f"{', '.join(sorted(names))}"
        )
    if not options.get("routing_key") and not options.get("exchange"):
        options.setdefault("queue", queue_for(request.lane))
    app_id = (conf.get("polyv_sms_app_ids") or {}).get(request.account)
    if app_id and names is not None:
        headers = dict(options.get("headers") or {})
        headers.setdefault(APP_ID_HEADER, app_id)
        options["headers"] = headers


def _header(task_request: Any, name: str) -> Any:
    value = getattr(task_request, name, None)
    if value is None:
        value = (getattr(task_request, "headers", None) or {}).get(name)
    return value


def account_for(runtime: Runtime, request: SmsRequest, task_request: Any) -> AccountRuntime:
    """The account that sends ``request``.

    Raises:
        InvalidRequest: this worker has no such account, or the message was enqueued for
            another appId than this worker's account of that name. Nothing is sent.
    """
    built = runtime.account(request.account or DEFAULT_ACCOUNT)
    limit = built.account.account_daily_limit
    if len(request.phone_numbers) > limit:
        raise InvalidRequest(
            f"phone_numbers: {len(request.phone_numbers)} numbers is more than account "
            f"{request.account!r}'s daily limit of {limit}"
        )
    meant = _header(task_request, APP_ID_HEADER)
    if meant and meant != built.account.app_id:
        raise InvalidRequest(
            f"account: the message was enqueued for appId {meant!r}, but this worker's account "
            f"{request.account!r} is appId {built.account.app_id!r}; not sent (is another "
            "deployment sharing this broker?)"
        )
    return built


def rate_waits(task_request: Any) -> int:
    """How many of the task's retries were waits for the rate guard."""
    try:
        return int(_header(task_request, WAITS_HEADER) or 0)
    except (TypeError, ValueError):
        return 0


def retry_options(task_request: Any, reason: str) -> dict[str, Any]:
    """Options for ``self.retry``: the appId header kept, the rate waits counted."""
    headers: dict[str, Any] = {}
    meant = _header(task_request, APP_ID_HEADER)
    if meant:
        headers[APP_ID_HEADER] = meant
    waits = rate_waits(task_request) + (1 if reason in _WAIT_REASONS else 0)
    if waits:
        headers[WAITS_HEADER] = waits
    return {"headers": headers} if headers else {}
