"""``polyv-sms accounts`` and ``polyv-sms pause``: the accounts a deployment sends through, and
the shared pause that follows a rate-limit answer from Polyv.

Neither reads a secret: the accounts file gives the appIds and limits, and the pause lives in
the ledger Redis.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

import click

from polyv_sms.cli import formatting as fmt

__all__ = ["accounts", "pause"]

#: Look-ups give up on an unreachable Redis after this long.
_CLI_REDIS_OUTAGE_S = 2.0


def _guard(account: str) -> Any:
    """The account's rate guard over the ledger Redis, without the account's secret."""
    from polyv_sms.accounts import account_settings  # noqa: PLC0415 - keeps --help fast
    from polyv_sms.config import Settings  # noqa: PLC0415
    from polyv_sms.errors import ConfigError  # noqa: PLC0415
    from polyv_sms.ledger import build_ledger, connect_redis  # noqa: PLC0415
    from polyv_sms.ledger.ratelimit import RateGuard  # noqa: PLC0415

    settings = account_settings(Settings.from_env(), account)
    if not settings.app_id:
        raise ConfigError("POLYV_APP_ID must be set (or --account NAME from SMS_ACCOUNTS_FILE)")
    settings = replace(settings, redis_outage_s=min(settings.redis_outage_s, _CLI_REDIS_OUTAGE_S))
    logging.getLogger("polyv_sms.ledger").setLevel(logging.ERROR)
    ledger = build_ledger(settings, connect_redis(settings.require_redis_url()))
    return RateGuard(ledger, settings.polyv_rate)


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def accounts(as_json: bool) -> None:
    """The accounts this deployment sends through: appId, limits, rate (no secret shown)."""
    from polyv_sms.accounts import account_app_ids, account_settings  # noqa: PLC0415
    from polyv_sms.config import Settings  # noqa: PLC0415

    settings = Settings.from_env()
    rows = []
    for name in account_app_ids(settings):
        own = account_settings(settings, name)
        rows.append(
            {
                "account": name,
                "app_id": own.app_id,
                "phone_daily_limit": own.phone_daily_limit,
                "account_daily_limit": own.account_daily_limit,
                "bulk_headroom": own.bulk_headroom,
                "bulk_limit": max(0, own.account_daily_limit - own.bulk_headroom),
                "polyv_rate": own.polyv_rate,
            }
        )
    if as_json:
        click.echo(fmt.to_json(rows))
        return
    headers = ["ACCOUNT", "APPID", "PHONE/DAY", "ACCOUNT/DAY", "BULK UP TO", "REQUESTS/S"]
    keys = ["account", "app_id", "phone_daily_limit", "account_daily_limit", "bulk_limit"]
    click.echo(
        fmt.table(headers, [[row[k] for k in keys] + [f"{row['polyv_rate']:g}"] for row in rows])
    )


@click.command()
@click.option(
    "--account",
    default="default",
    show_default=True,
    help="The account (default: POLYV_APP_ID; others are named in SMS_ACCOUNTS_FILE).",
)
@click.option("--clear", is_flag=True, help="Lift the pause now (Polyv unblocked us early).")
@click.option(
    "--set",
    "set_s",
    type=click.FloatRange(min=1),
    metavar="SECONDS",
    help="Pause every worker's sends through the account for SECONDS.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def pause(account: str, clear: bool, set_s: float | None, as_json: bool) -> None:
    """The shared pause: after Polyv answers "rate exceeded", no worker sends through the
    account until it ends (5 minutes, Polyv's block)."""
    if clear and set_s is not None:
        raise click.UsageError("give --clear or --set, not both")
    guard = _guard(account)
    report: dict[str, Any] = {"account": account}
    if clear:
        report["cleared"] = guard.clear()
    elif set_s is not None:
        guard.pause(set_s, reason="set by polyv-sms pause")
    report["paused_for_s"] = guard.paused_for()
    if as_json:
        click.echo(fmt.to_json(report))
        return
    left = report["paused_for_s"]
    state = f"paused for {left:.0f}s more" if left else "not paused"
    click.echo(f"account {account}: {state}")
