"""The ``polyv-sms`` command: send, look up, run and try polyv-sms.

Settings come from the environment (``.env.example`` lists them). Tables by default, ``--json``
for scripts. Exit codes: 0 done; 1 a failure (unknown message or receipt, Redis or the broker
unreachable, no result in time); 2 bad usage or configuration (the message names the option or
the variable).
"""

from __future__ import annotations

import logging
import os
import sys
import uuid
from collections.abc import Callable
from dataclasses import replace
from typing import Any, cast

import click
import redis

from polyv_sms import __version__
from polyv_sms.cli import formatting as fmt
from polyv_sms.cli.run import (
    CliError,
    CliUsageError,
    exec_supervisor,
    fault_rate_options,
    requeue_kwargs,
    serve_simulator,
)
from polyv_sms.config import DEFAULT_TIMEZONE, Settings
from polyv_sms.errors import ConfigError, InvalidRequest, LedgerBroken, LedgerUnavailable
from polyv_sms.ledger import connect_redis, stored_requests
from polyv_sms.ledger.receipts import Receipts

__all__ = ["main"]

#: Look-ups give up on an unreachable Redis after this long (workers wait SMS_REDIS_OUTAGE).
CLI_REDIS_OUTAGE_S = 2.0
DEFAULT_WAIT_S = 120.0
DEFAULT_SUPERVISORD_CONFIG = "deploy/supervisord.conf"


class _Group(click.Group):
    """Turns our exceptions into messages and exit codes instead of tracebacks."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        """The commands in the order they are defined: sending first, running last."""
        return list(self.commands)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (ConfigError, InvalidRequest) as exc:
            raise CliUsageError(str(exc)) from None
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


def _settings() -> Settings:
    return Settings.from_env()


def _require_results(settings: Settings) -> None:
    """``--wait`` reads the task's result: refuse before enqueueing when there is no backend."""
    if settings.result_backend is None:
        raise ConfigError(
            "--wait needs a result backend: set SMS_RESULT_BACKEND (or SMS_REDIS_URL); the "
            "broker is not Redis"
        )


def _receipts() -> Receipts:
    """Read-only access to the ledger; needs ``POLYV_APP_ID`` but never the secret."""
    from polyv_sms.ledger import build_ledger  # noqa: PLC0415 - keeps --help fast

    settings = _settings()
    if not settings.app_id:
        raise ConfigError("POLYV_APP_ID must be set: the ledger keeps each account apart")
    settings = replace(settings, redis_outage_s=min(settings.redis_outage_s, CLI_REDIS_OUTAGE_S))
    # One error line at the end says it; no warning per retry on the way.
    logging.getLogger("polyv_sms.ledger").setLevel(logging.ERROR)
    client = connect_redis(settings.require_redis_url(), wait_s=settings.redis_outage_s)
    return Receipts(build_ledger(settings, client))


def _wait(async_result: Any, timeout: float, message_id: str) -> dict[str, Any]:
    from celery.exceptions import TimeoutError as ResultTimeout  # noqa: PLC0415

    try:
        result: dict[str, Any] = async_result.get(timeout=timeout)
    except ResultTimeout:
        raise CliError(
            f"no result within {timeout:g}s; the message is queued or waiting for a retry "
            f"(see: polyv-sms status {message_id})"
        ) from None
    except Exception as exc:  # the task's own failure, re-raised by Celery
        raise CliError(f"the task failed: {type(exc).__name__}: {exc}") from None
    return result


def _publish(publish: Callable[[], Any], hint: str = "") -> Any:
    from kombu.exceptions import OperationalError  # noqa: PLC0415

    try:
        return publish()
    except OperationalError as exc:
        raise CliError(f"could not reach the broker (SMS_BROKER_URL): {exc}{hint}") from None


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
    help="A template parameter; repeat it, in the template's order.",
)
@click.option("--message-id", help="Idempotency key (default: the task id).")
@click.option("--wait", is_flag=True, help="Wait for the outcome of every number.")
@click.option(
    "--timeout", type=float, default=DEFAULT_WAIT_S, show_default=True, help="Seconds --wait waits."
)
@json_option
def send(
    *,
    numbers: tuple[str, ...],
    params: tuple[str, ...],
    message_id: str | None,
    wait: bool,
    timeout: float,
    as_json: bool,
) -> None:
    """Enqueue one SMS to NUMBER... (the polyv_sms.send_sms task)."""
    names, values = [], []
    for param in params:
        name, sep, value = param.partition("=")
        if not sep:
            raise click.BadParameter(f"{param!r} is not NAME=VALUE", param_hint="--param")
        names.append(name)
        values.append(value)
    settings = _settings()
    if wait:
        _require_results(settings)
    from polyv_sms.tasks import send_sms  # noqa: PLC0415

    pending = _publish(lambda: send_sms.delay(list(numbers), names, values, message_id=message_id))
    key = message_id or pending.id
    if not wait:
        queued = {"message_id": key, "task_id": pending.id, "state": "enqueued"}
        _emit(queued, as_json, lambda d: f"enqueued message {key} (task {pending.id})")
        return
    _emit(_wait(pending, timeout, key), as_json, fmt.render_result)


@main.command()
@click.argument("message_id")
@json_option
def status(message_id: str, as_json: bool) -> None:
    """A message's per-number outcomes, attempts and serialNos."""
    message = _receipts().message(message_id)
    if message is None:
        raise CliError(
            f"no message {message_id!r} in the ledger of this account (POLYV_APP_ID); records "
            "are kept SMS_RECEIPT_TTL_DAYS days"
        )
    _emit(message, as_json, fmt.render_message)


@main.command()
@click.argument("serial_no")
@json_option
def receipt(serial_no: str, as_json: bool) -> None:
    """One receipt: number, message and when Polyv accepted it."""
    found = _receipts().receipt(serial_no)
    if found is None:
        raise CliError(f"no receipt {serial_no!r} in the ledger of this account (POLYV_APP_ID)")
    _emit(found, as_json, fmt.render_receipt)


@main.command()
@click.argument("number")
@click.option("--limit", type=click.IntRange(1, 1000), default=20, show_default=True)
@json_option
def phone(number: str, limit: int, as_json: bool) -> None:
    """A number's latest receipts and today's count against its daily limit."""
    _emit(_receipts().phone(number, limit), as_json, fmt.render_phone)


@main.command()
@click.option("--day", metavar="YYYYMMDD", help="Another day than today (SMS_TIMEZONE).")
@click.option("--top", type=click.IntRange(0, 1000), default=10, show_default=True)
@json_option
def quota(day: str | None, top: int, as_json: bool) -> None:
    """The account's use of the day against its limit, and the busiest numbers."""
    _emit(_receipts().quota(day, top), as_json, fmt.render_quota)


@main.command()
@click.option("--limit", type=click.IntRange(1, 1000), default=50, show_default=True)
@click.option(
    "--requeue",
    "requeue_id",
    metavar="MESSAGE_ID",
    help="Send that message's failed numbers again.",
)
@click.option("--wait", is_flag=True, help="With --requeue: wait for the new outcomes.")
@click.option("--timeout", type=float, default=DEFAULT_WAIT_S, show_default=True)
@json_option
def dead(*, limit: int, requeue_id: str | None, wait: bool, timeout: float, as_json: bool) -> None:
    """Messages with numbers that ended failed; --requeue sends one again."""
    if requeue_id is not None and wait:
        _require_results(_settings())
    receipts = _receipts()
    if requeue_id is None:
        _emit(receipts.dead(limit), as_json, fmt.render_dead)
        return
    ledger = receipts.ledger
    record = cast(
        dict[str, str], ledger.call(ledger.redis.hgetall, ledger.keys.message(requeue_id))
    )
    message = receipts.message(requeue_id)
    if message is None or not stored_requests(record):
        raise CliError(f"no message {requeue_id!r} in the ledger of this account (POLYV_APP_ID)")
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
    publish = lambda: send_sms.apply_async(kwargs=kwargs, task_id=str(uuid.uuid4()))  # noqa: E731
    pending = _publish(publish, hint)
    if not wait:
        queued = {"message_id": requeue_id, "task_id": pending.id, "requeued": again}
        _emit(queued, as_json, lambda d: f"requeued {', '.join(again)} of message {requeue_id}")
        return
    _emit(_wait(pending, timeout, requeue_id), as_json, fmt.render_result)


@main.command()
@json_option
def reconcile(as_json: bool) -> None:
    """One reconciler sweep: enqueue again messages whose retry never ran."""
    from polyv_sms.ledger.reconcile import Reconciler  # noqa: PLC0415
    from polyv_sms.tasks import enqueue_again  # noqa: PLC0415

    ledger = _receipts().ledger
    if ledger.call(ledger.redis.exists, ledger.keys.reconcile_lock):
        report: dict[str, Any] = {"skipped": "a worker's reconciler is sweeping right now"}
    else:
        report = {
            "enqueued": _publish(lambda: Reconciler(ledger, enqueue_again, interval_s=1).sweep())
        }

    def render(data: dict[str, Any]) -> str:
        if "skipped" in data:
            return f"skipped: {data['skipped']}; try again in a moment"
        return f"enqueued again: {', '.join(data['enqueued']) or 'nothing was overdue'}"

    _emit(report, as_json, render)


@main.command(context_settings={"ignore_unknown_options": True})
@click.option(
    "--concurrency",
    "-c",
    type=click.IntRange(min=1),
    help="Threads (default: SMS_WORKER_CONCURRENCY, else 16).",
)
@click.option(
    "--process-index",
    type=click.IntRange(min=0),
    help="This process's number under supervisord: sets SMS_WORKER_INDEX (metrics "
    "port offset) and the node name.",
)
@click.option("--hostname", "-n", help="Node name (default: polyv-sms-<index>@%h).")
@click.option("--loglevel", "-l", default="INFO", show_default=True)
@click.argument("celery_args", nargs=-1, type=click.UNPROCESSED)
def worker(
    *,
    concurrency: int | None,
    process_index: int | None,
    hostname: str | None,
    loglevel: str,
    celery_args: tuple[str, ...],
) -> None:
    """Run a worker: celery worker -Q sms -P threads with the recommended options.

    Refuses to start without POLYV_APP_ID and POLYV_APP_SECRET. Extra arguments go to
    `celery worker` as they are.
    """
    settings = _settings()
    settings.require_credentials()
    if process_index is not None:
        os.environ["SMS_WORKER_INDEX"] = str(process_index)
    index = os.environ.get("SMS_WORKER_INDEX", "").strip()
    from polyv_sms.worker import QUEUE, app  # noqa: PLC0415

    argv = [
        "worker",
        f"--queues={QUEUE}",
        "--pool=threads",
        f"--concurrency={concurrency or settings.worker_concurrency}",
        f"--hostname={hostname or (f'polyv-sms-{index}@%h' if index else 'polyv-sms@%h')}",
        f"--loglevel={loglevel}",
        "--without-gossip",  # heartbeats and remote control stay on: Flower uses them
        "--without-mingle",
        *celery_args,
    ]
    sys.exit(app.start(argv) or 0)


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True)
@click.option("--app-id", envvar="POLYV_APP_ID", required=True, help="[env: POLYV_APP_ID]")
@click.option(
    "--app-secret",
    envvar="POLYV_APP_SECRET",
    required=True,
    help="Prefer the environment: a command line shows in ps. [env: POLYV_APP_SECRET]",
)
@click.option("--phone-daily-limit", type=click.IntRange(min=0), default=10, show_default=True)
@click.option("--account-daily-limit", type=click.IntRange(min=0), default=2000, show_default=True)
@click.option("--timezone", default=DEFAULT_TIMEZONE, show_default=True)
@click.option(
    "--fail-number",
    "fail_numbers",
    multiple=True,
    metavar="NUMBER=COUNT",
    help="Answer status 11 COUNT times for NUMBER, then accept it.",
)
@click.option("--latency", type=click.FloatRange(0), default=0.0, help="Seconds per answer.")
@click.option(
    "--slow-latency",
    type=click.FloatRange(0),
    default=0.0,
    help="Extra seconds for --slow-rate of the answers.",
)
@click.option("--seed", type=int, help="Seed for the fault draws.")
@fault_rate_options
def simulator(**options: Any) -> None:
    """Run the Polyv simulator: a stand-in for the SMS endpoint that sends nothing.

    Point workers at it with POLYV_API_BASE=http://HOST:PORT. Fault shares: --status11-rate,
    --http500-rate, --drop-rate, --garbage-rate, --rate-limit-rate, --slow-rate (0 to 1).
    """
    serve_simulator(options)


@main.command()
def demo() -> None:
    """Try polyv-sms in one process: no Redis, no credentials, no network needed."""
    from polyv_sms.cli.demo import run  # noqa: PLC0415

    sys.exit(run(click.echo))


_PASS_THROUGH = {"ignore_unknown_options": True, "help_option_names": ["--launcher-help"]}
_CONFIG = click.option("--config", default=DEFAULT_SUPERVISORD_CONFIG, show_default=True)


@main.command(context_settings=_PASS_THROUGH)
@_CONFIG
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def supervisord(config: str, args: tuple[str, ...]) -> None:
    """Run supervisord with deploy/supervisord.conf and SMS_RUN_DIR set (default: a
    directory under the system temp dir). Other arguments go to supervisord (e.g. -n)."""
    exec_supervisor("supervisord", config, args)


@main.command(context_settings=_PASS_THROUGH)
@_CONFIG
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def supervisorctl(config: str, args: tuple[str, ...]) -> None:
    """Run supervisorctl against the supervisord that `polyv-sms supervisord` started
    (status, stop all, start all, tail -f ...)."""
    exec_supervisor("supervisorctl", config, args)
