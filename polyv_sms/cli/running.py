"""The ``polyv-sms`` commands that run things: a worker, the simulator, the demo, the health
check and the supervisord launchers (:mod:`polyv_sms.cli.command` adds them to the group)."""

from __future__ import annotations

import os
import socket
import sys
from typing import Any

import click

from polyv_sms.cli.run import exec_supervisor, fault_rate_options, serve_simulator
from polyv_sms.cli.sending import ping_workers
from polyv_sms.config import DEFAULT_TIMEZONE, Settings

__all__ = [
    "DEFAULT_HEALTH_PROCESSES",
    "DEFAULT_HEALTH_TIMEOUT_S",
    "DEFAULT_SUPERVISORD_CONFIG",
    "RUNNING_COMMANDS",
]

DEFAULT_SUPERVISORD_CONFIG = "deploy/supervisord.conf"
#: ``healthcheck``: the worker processes of one host (numprocs in deploy/supervisord.conf).
DEFAULT_HEALTH_PROCESSES = 2
DEFAULT_HEALTH_TIMEOUT_S = 5.0


@click.command(context_settings={"ignore_unknown_options": True})
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
@click.option(
    "--hostname",
    "-n",
    help="Node name (default: polyv-sms-<index>@%h with --process-index or "
    "SMS_WORKER_INDEX, else polyv-sms@%h).",
)
@click.option(
    "--loglevel", "-l", default="INFO", show_default=True, help="DEBUG, INFO, WARNING or ERROR."
)
@click.argument("celery_args", nargs=-1, type=click.UNPROCESSED)
def worker(
    *,
    concurrency: int | None,
    process_index: int | None,
    hostname: str | None,
    loglevel: str,
    celery_args: tuple[str, ...],
) -> None:
    """Run a worker: celery worker -Q sms.urgent,sms,sms.bulk -P threads, urgent first.

    Refuses to start without POLYV_APP_ID and POLYV_APP_SECRET. Extra arguments go to
    `celery worker` as they are.
    """
    settings = Settings.from_env()
    from polyv_sms.accounts import load_accounts  # noqa: PLC0415

    if not load_accounts(settings):  # an accounts file may stand in for POLYV_APP_ID
        settings.require_credentials()
    if process_index is not None:
        os.environ["SMS_WORKER_INDEX"] = str(process_index)
    index = os.environ.get("SMS_WORKER_INDEX", "").strip()
    from celery.bin.celery import celery as celery_command  # noqa: PLC0415

    from polyv_sms.worker import WORKER_QUEUES  # noqa: PLC0415

    argv = [
        "--app=polyv_sms.worker",
        "worker",
        f"--queues={','.join(WORKER_QUEUES)}",  # the lanes, urgent first
        "--pool=threads",
        f"--concurrency={concurrency or settings.worker_concurrency}",
        f"--hostname={hostname or (f'polyv-sms-{index}@%h' if index else 'polyv-sms@%h')}",
        f"--loglevel={loglevel}",
        "--without-gossip",  # heartbeats and remote control stay on: Flower uses them
        "--without-mingle",
        *celery_args,
    ]
    # Standalone: exits with the worker's status (Celery's app.start() drops it under click 8.2+,
    # so a worker stopped by a failure would exit 0).
    celery_command.main(args=argv, prog_name="polyv-sms worker")


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=8080,
    show_default=True,
    help="Port to listen on (0: any free one).",
)
@click.option(
    "--app-id",
    envvar="POLYV_APP_ID",
    help="The appId whose signs it accepts; every account of SMS_ACCOUNTS_FILE too. "
    "[env: POLYV_APP_ID]",
)
@click.option(
    "--app-secret",
    envvar="POLYV_APP_SECRET",
    help="Prefer the environment: a command line shows in ps. [env: POLYV_APP_SECRET]",
)
@click.option(
    "--phone-daily-limit",
    type=click.IntRange(min=0),
    default=10,
    show_default=True,
    help="SMS a number may receive per day; then status -1.",
)
@click.option(
    "--account-daily-limit",
    type=click.IntRange(min=0),
    default=2000,
    show_default=True,
    help="SMS the account may send per day; then an error.",
)
@click.option(
    "--timezone", default=DEFAULT_TIMEZONE, show_default=True, help="Where the day turns."
)
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
@click.option("--seed", type=int, help="Seed for the fault draws (repeatable runs).")
@fault_rate_options
def simulator(**options: Any) -> None:
    """Run the Polyv simulator: a stand-in for the SMS endpoint that sends nothing.

    Point workers at it with POLYV_API_BASE=http://HOST:PORT; the --*-rate options inject
    faults.
    """
    serve_simulator(options)


@click.command()
@click.option(
    "--processes",
    type=click.IntRange(min=1),
    default=DEFAULT_HEALTH_PROCESSES,
    show_default=True,
    help="Worker processes this host runs (numprocs in deploy/supervisord.conf).",
)
@click.option(
    "--host",
    default=socket.gethostname,
    show_default="this host's name",
    help="The host part of the node names (polyv-sms-N@HOST).",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0.1),
    default=DEFAULT_HEALTH_TIMEOUT_S,
    show_default=True,
    help="Seconds to wait for the answers.",
)
def healthcheck(processes: int, host: str, timeout: float) -> None:
    """Exit 0 when every worker process of this host answers a ping over the broker.

    The container health check: supervisord stays up when its workers are FATAL, this does
    not. Asks polyv-sms-0@HOST ... polyv-sms-(N-1)@HOST (the names `polyv-sms worker
    --process-index N` takes); exit 1 naming those that did not answer.
    """
    click.echo(ping_workers(processes, host, timeout))


@click.command()
def demo() -> None:
    """Try polyv-sms in one process: no Redis, no credentials, no network needed."""
    from polyv_sms.cli.demo import run  # noqa: PLC0415

    sys.exit(run(click.echo))


_PASS_THROUGH = {"ignore_unknown_options": True, "help_option_names": ["--launcher-help"]}
_CONFIG = click.option(
    "--config",
    default=DEFAULT_SUPERVISORD_CONFIG,
    show_default=True,
    metavar="FILE",
    help="The supervisord configuration.",
)


@click.command(context_settings=_PASS_THROUGH)
@_CONFIG
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def supervisord(config: str, args: tuple[str, ...]) -> None:
    """Run supervisord (--config FILE, default deploy/supervisord.conf) with SMS_RUN_DIR set.

    SMS_RUN_DIR defaults to a directory under the system temp dir; it is printed on start.
    Other arguments go to supervisord as they are (e.g. -n); --launcher-help shows this help.
    """
    exec_supervisor("supervisord", config, args)


@click.command(context_settings=_PASS_THROUGH)
@_CONFIG
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def supervisorctl(config: str, args: tuple[str, ...]) -> None:
    """Run supervisorctl (--config FILE) against `polyv-sms supervisord` (status, stop all...).

    Other arguments go to supervisorctl as they are; --launcher-help shows this help.
    """
    exec_supervisor("supervisorctl", config, args)


#: In the order ``polyv-sms --help`` lists them.
RUNNING_COMMANDS = (worker, simulator, healthcheck, demo, supervisord, supervisorctl)
