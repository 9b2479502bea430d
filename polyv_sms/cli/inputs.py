"""What ``polyv-sms`` checks in its input before it looks anything up or enqueues: bad input
is a usage error (exit 2) that says what is expected, in the command's words."""

from __future__ import annotations

import datetime
import re

import click

from polyv_sms.polyv.phones import check_phone

__all__ = ["check_day", "check_number", "in_cli_words", "template_params"]

#: The Python API's argument names, as the command's user knows them.
_CLI_NAMES = {
    "phone_numbers": "NUMBERS",
    "template_param_names": "-p NAME",
    "template_param_values": "-p VALUE",
    "message_id": "--message-id",
}
_FIELD = re.compile(r"(\w+)(?:\[(\d+)\])?: ")


def in_cli_words(message: str) -> str:
    """An :class:`~polyv_sms.errors.InvalidRequest` message with the field it names said as
    the command's option (``template_param_values[1]: ...`` -> ``-p VALUE #2: ...``)."""
    found = _FIELD.match(message)
    if found is None or found.group(1) not in _CLI_NAMES:
        return message
    where = _CLI_NAMES[found.group(1)]
    if found.group(2) is not None:
        where += f" #{int(found.group(2)) + 1}"
    return f"{where}: {message[found.end() :]}"


def template_params(params: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """``-p NAME=VALUE`` options as names and values; a usage error for anything else."""
    if not params:
        raise click.BadParameter(
            "give at least one -p NAME=VALUE (the template's parameters, in its order)",
            param_hint="--param",
        )
    names, values = [], []
    for param in params:
        name, sep, value = param.partition("=")
        if not sep:
            raise click.BadParameter(f"{param!r} is not NAME=VALUE", param_hint="--param")
        if not name.strip():
            raise click.BadParameter(f"{param!r} has no NAME before '='", param_hint="--param")
        if not value.strip():
            raise click.BadParameter(
                f"{param!r}: the value of {name} is empty; an SMS with an empty parameter is "
                "never right",
                param_hint="--param",
            )
        names.append(name)
        values.append(value)
    return names, values


def check_day(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    """``--day``: a real calendar day as YYYYMMDD."""
    if value is None:
        return None
    try:
        if len(value) != 8 or not value.isascii() or not value.isdigit():
            raise ValueError
        datetime.datetime.strptime(value, "%Y%m%d")  # a calendar day: no zone
    except ValueError:
        raise click.BadParameter(
            f"{value!r} is not a day as YYYYMMDD (e.g. 20261130)", param_hint="--day"
        ) from None
    return value


def check_number(_ctx: click.Context, _param: click.Parameter, value: str) -> str:
    """``NUMBER``: a mainland mobile number (separators and +86 allowed)."""
    checked = check_phone(value)
    if checked.number is None:
        raise click.BadParameter(
            f"{value!r} {checked.reason}; give a mobile number like 13900000001",
            param_hint="NUMBER",
        )
    return checked.number
