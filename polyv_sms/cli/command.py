"""The ``polyv-sms`` command: send, look up, run and try polyv-sms.

Settings come from the environment (``.env.example`` lists them). Tables by default, ``--json``
for scripts. Exit codes: 0 done; 1 a failure (unknown message or receipt, Redis, the broker or
the result backend unreachable, no result in time); 2 bad usage or configuration (the message
names the option or the variable); 3 ``--wait`` got the outcome and some number did not end
``accepted`` (failed, invalid, over a limit).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import replace
from typing import Any, cast

import click
import redis

from polyv_sms import __version__
from polyv_sms.cli import accounts as cli_accounts
from polyv_sms.cli import formatting as fmt
from polyv_sms.cli.inputs import check_day, check_number, in_cli_words, template_params
from polyv_sms.cli.run import (
    CliError,
    CliUsageError,
    requeue_kwargs,
)
from polyv_sms.cli.running import RUNNING_COMMANDS
from polyv_sms.cli.sending import (
    exit_if_not_accepted,
    publish,
    wait_result,
)
from polyv_sms.config import Settings
from polyv_sms.errors import ConfigError, InvalidRequest, LedgerBroken, LedgerUnavailable
from polyv_sms.ledger import connect_redis, stored_requests
from polyv_sms.ledger.receipts import Receipts

__all__ = ["main"]

#: Look-ups give up on an unreachable Redis after this long (workers wait SMS_REDIS_OUTAGE).
CLI_REDIS_OUTAGE_S = 2.0
DEFAULT_WAIT_S = 120.0


class _Group(click.Group):
    """Turns our exceptions into messages and exit codes instead of tracebacks."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        """The commands in the order they are defined: sending first, running last."""
        return list(self.commands)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ConfigError as exc:
            raise CliUsageError(str(exc)) from None
        except InvalidRequest as exc:
            raise CliUsageError(in_cli_words(str(exc))) from None
        except LedgerUnavailable as exc:
            raise CliError(f"{exc} (SMS_REDIS_URL)") from None
        except LedgerBroken as exc:
            raise CliError(str(exc)) from None
        except redis.RedisError as exc:
            raise CliError(f"Redis: {type(exc).__name__}: {exc}") from None


def _emit(data: object, as_json: bool, render: Callable[[Any], str]) -> None:
    click.echo(fmt.to_json(data) if as_json else render(data))


def json_option(function: Callable[..., Any]) -> Callable[..., Any]:
    """Add ``--json`` (machine-readable output) to a command."""
    return click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")(
        function
    )


def timeout_option(function: Callable[..., Any]) -> Callable[..., Any]:
    """Add ``--timeout`` (how long ``--wait`` waits) to a command."""
    return click.option(
        "--timeout",
        type=click.FloatRange(0),
        default=DEFAULT_WAIT_S,
        show_default=True,
        help="Seconds --wait waits.",
    )(function)


def _settings() -> Settings:
    return Settings.from_env()


def _require_results(settings: Settings) -> None:
    """``--wait`` reads the task's result: refuse before enqueueing when there is no backend."""
    if settings.result_backend is None:
        raise ConfigError(
            "--wait needs a result backend: set SMS_RESULT_BACKEND (or SMS_REDIS_URL); the "
            "broker is not Redis"
        )


def account_option(function: Callable[..., Any]) -> Callable[..., Any]:
    """Add ``--account NAME`` (``default``: POLYV_APP_ID; others: SMS_ACCOUNTS_FILE)."""
    return click.option(
        "--account",
        default="default",
        show_default=True,
        help="The account (default: POLYV_APP_ID; others are named in SMS_ACCOUNTS_FILE).",
    )(function)


def _receipts(account: str = "default") -> Receipts:
    """Read-only access to one account's ledger; needs its appId but never the secret."""
    from polyv_sms.accounts import account_settings  # noqa: PLC0415
    from polyv_sms.ledger import build_ledger  # noqa: PLC0415 - keeps --help fast

    settings = account_settings(_settings(), account)
    if not settings.app_id:
        raise ConfigError("POLYV_APP_ID must be set: the ledger keeps each account apart")
    settings = replace(settings, redis_outage_s=min(settings.redis_outage_s, CLI_REDIS_OUTAGE_S))
    # One error line at the end says it; no warning per retry on the way.
    logging.getLogger("polyv_sms.ledger").setLevel(logging.ERROR)
    client = connect_redis(settings.require_redis_url(), wait_s=settings.redis_outage_s)
    return Receipts(build_ledger(settings, client))


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="polyv-sms")
def main() -> None:
    """Send SMS through Polyv and see what happened to each one.

    Settings come from environment variables (see .env.example). Start with `polyv-sms demo`.
    """


@main.command()
@click.argument("numbers", nargs=-1, required=True)
@click.option(
    "--param",
    "-p",
    "params",
    multiple=True,
    metavar="NAME=VALUE",
    help="A template parameter (at least one; no empty values); repeat it, in the template's "
    "order.",
)
@click.option("--message-id", help="Idempotency key (default: the task id).")
@account_option
@click.option(
    "--lane",
    type=click.Choice(["urgent", "standard", "bulk"]),
    default="standard",
    show_default=True,
    help="urgent (login codes) is taken first; bulk stops SMS_BULK_HEADROOM short of the limit.",
)
@click.option(
    "--wait",
    is_flag=True,
    help="Wait for the outcome of every number; exit 3 if any did not end accepted.",
)
@timeout_option
@json_option
def send(
    *,
    numbers: tuple[str, ...],
    params: tuple[str, ...],
    message_id: str | None,
    account: str,
    lane: str,
    wait: bool,
    timeout: float,
    as_json: bool,
) -> None:
    """Enqueue one SMS to NUMBER... (the polyv_sms.send_sms task).

    Exit status: 0 enqueued (with --wait: every number accepted); 1 a failure (the broker or
    result backend unreachable, no result in time); 2 bad usage; 3 (--wait) some number did
    not end accepted.
    """
    names, values = template_params(params)
    settings = _settings()
    if wait:
        _require_results(settings)
    from polyv_sms.tasks import send_sms  # noqa: PLC0415

    pending = publish(
        lambda: send_sms.delay(
            list(numbers), names, values, message_id=message_id, account=account, lane=lane
        )
    )
    key = message_id or pending.id
    if not wait:
        queued = {"message_id": key, "task_id": pending.id, "state": "enqueued"}
        _emit(queued, as_json, lambda d: f"enqueued message {key} (task {pending.id})")
        return
    result = wait_result(pending, timeout, key)
    _emit(result, as_json, fmt.render_result)
    exit_if_not_accepted(result)


def _account_words(account: str) -> str:
    """Which ledger a look-up read, in an error: the account that ``--account`` named."""
    if account == "default":
        return "this account (POLYV_APP_ID; --account names another)"
    return f"account {account!r} (SMS_ACCOUNTS_FILE)"


@main.command()
@click.argument("message_id")
@account_option
@json_option
def status(message_id: str, account: str, as_json: bool) -> None:
    """A message's per-number outcomes, attempts and serialNos."""
    message = _receipts(account).message(message_id)
    if message is None:
        raise CliError(
            f"no message {message_id!r} in the ledger of {_account_words(account)}; records "
            "are kept SMS_RECEIPT_TTL_DAYS days"
        )
    _emit(message, as_json, fmt.render_message)


@main.command()
@click.argument("serial_no")
@account_option
@json_option
def receipt(serial_no: str, account: str, as_json: bool) -> None:
    """One receipt: number, message and when Polyv accepted it."""
    found = _receipts(account).receipt(serial_no)
    if found is None:
        raise CliError(f"no receipt {serial_no!r} in the ledger of {_account_words(account)}")
    _emit(found, as_json, fmt.render_receipt)


@main.command()
@click.argument("number", callback=check_number)
@click.option(
    "--limit",
    type=click.IntRange(1, 1000),
    default=20,
    show_default=True,
    help="Show at most this many receipts.",
)
@account_option
@json_option
def phone(number: str, limit: int, account: str, as_json: bool) -> None:
    """A number's latest receipts and today's count against its daily limit."""
    _emit(_receipts(account).phone(number, limit), as_json, fmt.render_phone)


@main.command()
@click.option(
    "--day", metavar="YYYYMMDD", callback=check_day, help="Another day than today (SMS_TIMEZONE)."
)
@click.option(
    "--top",
    type=click.IntRange(0, 1000),
    default=10,
    show_default=True,
    help="Show this many of the busiest numbers.",
)
@account_option
@json_option
def quota(day: str | None, top: int, account: str, as_json: bool) -> None:
    """The account's use of the day against its limit, and the busiest numbers."""
    _emit(_receipts(account).quota(day, top), as_json, fmt.render_quota)


@main.command()
@click.option(
    "--limit",
    type=click.IntRange(1, 1000),
    default=50,
    show_default=True,
    help="Show at most this many messages.",
)
@click.option(
    "--requeue",
    "requeue_id",
    metavar="MESSAGE_ID",
    help="Send that message's failed numbers again.",
)
@click.option(
    "--wait",
    is_flag=True,
    help="With --requeue: wait for the new outcomes; exit 3 if any did not end accepted.",
)
@timeout_option
@account_option
@json_option
def dead(
    *,
    limit: int,
    requeue_id: str | None,
    wait: bool,
    timeout: float,
    account: str,
    as_json: bool,
) -> None:
    """Messages with numbers that ended failed; --requeue sends one again."""
    if requeue_id is not None and wait:
        _require_results(_settings())
    receipts = _receipts(account)
    if requeue_id is None:
        _emit(receipts.dead(limit), as_json, fmt.render_dead)
        return
    ledger = receipts.ledger
    record = cast(
        dict[str, str], ledger.call(ledger.redis.hgetall, ledger.keys.message(requeue_id))
    )
    message = receipts.message(requeue_id)
    if message is None or not stored_requests(record):
        raise CliError(f"no message {requeue_id!r} in the ledger of {_account_words(account)}")
    failed = {n["phone_number"] for n in message["numbers"] if n["state"] == "failed"}
    if not failed:
        raise CliError(f"message {requeue_id!r} has no failed numbers; nothing to send again")
    kwargs = requeue_kwargs(requeue_id, record, failed)
    from polyv_sms.tasks import send_sms  # noqa: PLC0415

    again = ledger.requeue(requeue_id)
    # A task id of its own: --wait must not read the first run's stored result.
    hint = (
        f"; its failed numbers were reset: send it again with polyv-sms send ... "
        f"--message-id {requeue_id} (accepted numbers are skipped)"
    )
    from polyv_sms.routing import APP_ID_HEADER  # noqa: PLC0415

    # The appId header: a worker whose account of that name is another appId refuses it.
    requeue = lambda: send_sms.apply_async(  # noqa: E731
        kwargs=kwargs, task_id=str(uuid.uuid4()), headers={APP_ID_HEADER: ledger.app_id}
    )
    pending = publish(requeue, hint)
    if not wait:
        queued = {"message_id": requeue_id, "task_id": pending.id, "requeued": again}
        _emit(queued, as_json, lambda d: f"requeued {', '.join(again)} of message {requeue_id}")
        return
    result = wait_result(pending, timeout, requeue_id)
    _emit(result, as_json, fmt.render_result)
    exit_if_not_accepted(result)


@main.command()
@account_option
@json_option
def reconcile(account: str, as_json: bool) -> None:
    """One reconciler sweep: enqueue again messages whose retry never ran."""
    from polyv_sms.ledger.reconcile import Reconciler  # noqa: PLC0415
    from polyv_sms.tasks import enqueue_again  # noqa: PLC0415

    ledger = _receipts(account).ledger
    if ledger.call(ledger.redis.exists, ledger.keys.reconcile_lock):
        report: dict[str, Any] = {"skipped": "a worker's reconciler is sweeping right now"}
    else:
        report = {
            "enqueued": publish(lambda: Reconciler(ledger, enqueue_again, interval_s=1).sweep())
        }

    def render(data: dict[str, Any]) -> str:
        if "skipped" in data:
            return f"skipped: {data['skipped']}; try again in a moment"
        return f"enqueued again: {', '.join(data['enqueued']) or 'nothing was overdue'}"

    _emit(report, as_json, render)


for _command in RUNNING_COMMANDS:
    main.add_command(_command)
# Accounts and the shared pause, defined in their own module.
main.add_command(cli_accounts.accounts)
main.add_command(cli_accounts.pause)
