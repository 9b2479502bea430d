"""Helpers of the ``polyv-sms`` command: its errors, the simulator, the supervisord launchers."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NoReturn

import click

from polyv_sms.ledger import stored_requests

__all__ = [
    "EXIT_FAILURE",
    "EXIT_NOT_ACCEPTED",
    "EXIT_USAGE",
    "FAULT_RATES",
    "RUN_DIR_ENV",
    "CliError",
    "CliUsageError",
    "exec_supervisor",
    "fault_rate_options",
    "requeue_kwargs",
    "run_dir",
    "serve_simulator",
]

EXIT_FAILURE = 1
EXIT_USAGE = 2
#: ``--wait`` got the outcome, and some number did not end accepted.
EXIT_NOT_ACCEPTED = 3
RUN_DIR_ENV = "SMS_RUN_DIR"
#: The simulator's fault shares and what each does to an answer (``--<name>-rate``).
FAULT_HELP = {
    "status11": "Share of valid numbers answered status 11 (Aliyun failed; retried).",
    "http500": "Share of requests answered HTTP 500.",
    "drop": "Share of requests whose connection is closed without an answer.",
    "garbage": "Share of requests answered with a body that is not JSON.",
    "rate_limit": "Share of requests answered with Polyv's rate-limit error.",
    "slow": "Share of answers delayed by --slow-latency more seconds.",
}
FAULT_RATES = tuple(FAULT_HELP)


class CliError(click.ClickException):
    """A failure, shown as ``polyv-sms: error: ...``; exit code 1."""

    exit_code = EXIT_FAILURE

    def show(self, file: Any = None) -> None:
        """Write the message to stderr."""
        click.echo(f"polyv-sms: error: {self.message}", err=True, file=file)


class CliUsageError(CliError):
    """Bad usage or configuration; exit code 2."""

    exit_code = EXIT_USAGE


def fault_rate_options(function: Callable[..., Any]) -> Callable[..., Any]:
    """Add ``--<fault>-rate`` options for the simulator's fault shares."""
    for name in reversed(FAULT_RATES):
        option = click.option(
            f"--{name.replace('_', '-')}-rate",
            f"{name}_rate",
            type=click.FloatRange(0, 1),
            default=0.0,
            show_default=True,
            help=f"{FAULT_HELP[name]} 0 to 1.",
        )
        function = option(function)
    return function


def _simulated_accounts(options: dict[str, Any]) -> tuple[str, str, dict[str, str]]:
    """The simulator's accounts: ``--app-id``/``--app-secret`` (POLYV_APP_ID/SECRET) and every
    account of SMS_ACCOUNTS_FILE, so that a deployment of several accounts can be tried.

    Raises:
        CliUsageError: no account at all, or ``--app-id`` without ``--app-secret``.
    """
    from polyv_sms.accounts import load_accounts  # noqa: PLC0415
    from polyv_sms.config import Settings  # noqa: PLC0415
    from polyv_sms.errors import ConfigError  # noqa: PLC0415

    app_id, app_secret = options.get("app_id"), options.get("app_secret")
    if bool(app_id) != bool(app_secret):
        missing = "--app-secret (POLYV_APP_SECRET)" if app_id else "--app-id (POLYV_APP_ID)"
        raise CliUsageError(f"the simulator needs {missing} too")
    # Only the file: the simulator needs none of the worker's other settings.
    path = (os.environ.get("SMS_ACCOUNTS_FILE") or "").strip() or None
    try:
        accounts = load_accounts(Settings(accounts_file=path))
    except ConfigError as exc:
        if not app_id:
            raise CliUsageError(str(exc)) from None
        # (a simulator container may lack the workers' file or secrets: --app-id still works)
        click.echo(f"polyv-sms simulator: {exc}; knowing only --app-id {app_id}", err=True)
        accounts = {}
    others = {a.app_id: a.app_secret.reveal() for a in accounts.values()}
    if not app_id:
        if not others:
            raise CliUsageError(
                "the simulator needs an account: --app-id and --app-secret (POLYV_APP_ID, "
                "POLYV_APP_SECRET) or SMS_ACCOUNTS_FILE"
            )
        app_id = next(iter(others))
        app_secret = others[app_id]
    return str(app_id), str(app_secret), others


def serve_simulator(options: dict[str, Any]) -> None:
    """Run the simulator with the ``simulator`` command's options until SIGTERM or Ctrl-C."""
    from polyv_sms.polyv.simulator import Faults, PolyvSimulator  # noqa: PLC0415

    counts: dict[str, int] = {}
    for item in options["fail_numbers"]:
        number, _, count = item.partition("=")
        if not count.isdigit():
            raise click.BadParameter(f"{item!r} is not NUMBER=COUNT", param_hint="--fail-number")
        counts[number] = int(count)
    rates = {f"{name}_rate": options[f"{name}_rate"] for name in FAULT_RATES}
    try:
        faults = Faults(
            fail_numbers=counts,
            latency_s=options["latency"],
            slow_latency_s=options["slow_latency"],
            seed=options["seed"],
            **rates,
        )
        app_id, app_secret, others = _simulated_accounts(options)
        sim = PolyvSimulator(
            app_id,
            app_secret,
            other_accounts=others,
            host=options["host"],
            port=options["port"],
            phone_daily_limit=options["phone_daily_limit"],
            account_daily_limit=options["account_daily_limit"],
            timezone=options["timezone"],
            faults=faults,
        )
    except ValueError as exc:
        raise CliUsageError(str(exc)) from None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    def stop(signum: int, _frame: object) -> NoReturn:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        sim.serve_forever()
    except KeyboardInterrupt:
        click.echo("simulator stopped", err=True)
    except OSError as exc:
        raise CliError(f"cannot listen on {options['host']}:{options['port']}: {exc}") from None


def run_dir() -> Path:
    """``SMS_RUN_DIR``, by default ``<temp dir>/polyv-sms-<uid>``; created (mode 0700)."""
    raw = os.environ.get(RUN_DIR_ENV, "").strip()
    path = Path(raw) if raw else Path(tempfile.gettempdir()) / f"polyv-sms-{os.getuid()}"
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def exec_supervisor(program: str, config: str, args: tuple[str, ...]) -> NoReturn:
    """Replace this process with ``program -c config ARGS`` and ``SMS_RUN_DIR`` set."""
    here = Path(sys.executable).parent
    found = here / program if (here / program).exists() else shutil.which(program)
    if not found:
        raise CliUsageError(f"{program} not found: pip install supervisor")
    if not Path(config).is_file():
        raise CliUsageError(f"no {config}: run from the repository root or pass --config")
    env = dict(os.environ)
    env[RUN_DIR_ENV] = str(run_dir())
    # The workers' command is `polyv-sms`: the one installed beside this Python.
    env["PATH"] = os.pathsep.join([str(here), env.get("PATH", "")])
    if program == "supervisord":  # where its logs go; supervisorctl would repeat it each call
        click.echo(f"{RUN_DIR_ENV}={env[RUN_DIR_ENV]}", err=True)
    os.execve(str(found), [str(found), "-c", config, *args], env)  # noqa: S606 - no shell


def requeue_kwargs(message_id: str, record: Mapping[str, str], failed: set[str]) -> dict[str, Any]:
    """The ``send_sms`` arguments that send a message's failed numbers again.

    One message id is one content (the ledger refuses another): the message's stored request,
    its input as given, byte for byte. Accepted numbers among them are skipped by the ledger.
    (``failed`` is kept for callers; every stored request of a message has the same content.)
    """
    del failed
    first = stored_requests(record)[0]
    return {
        "phone_numbers": first["phone_numbers"],
        "template_param_names": first["template_param_names"],
        "template_param_values": first["template_param_values"],
        "message_id": message_id,
    } | {
        # The account and lane it was enqueued with: never another account's.
        key: first[key]
        for key, default in (("account", "default"), ("lane", "standard"))
        if first.get(key, default) != default
    }
