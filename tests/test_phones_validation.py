"""Number normalisation and request validation: every rejection says why."""

from __future__ import annotations

import pytest

from polyv_sms.errors import InvalidRequest
from polyv_sms.logs import redact
from polyv_sms.polyv.phones import check_phone, mask
from polyv_sms.validation import validate_request


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("17680476163", "17680476163"),
        (17680476163, "17680476163"),
        (" 176 8047 6163 ", "17680476163"),
        ("176-8047-6163", "17680476163"),
        ("+86 176 8047 6163", "17680476163"),
        ("+8617680476163", "17680476163"),
        ("8617680476163", "17680476163"),
        ("008617680476163", "17680476163"),
    ],
)
def test_valid_numbers_normalise_to_11_digits(given: object, expected: str) -> None:
    assert check_phone(given).number == expected


@pytest.mark.parametrize(
    ("given", "reason"),
    [
        ("1768909", "has 7 digits"),
        ("176804761634", "has 12 digits"),
        ("1768o476163", "characters other than digits"),
        ("", "empty"),
        ("   ", "empty"),
        ("27680476163", "mainland China mobile"),
        ("12680476163", "mainland China mobile"),
        (None, "not NoneType"),
        (True, "not bool"),
        (1.7680476163e10, "not float"),
        (["17680476163"], "not list"),
        ("１７６８０４７６１６３", "has digits other than ASCII 0-9 (full-width, say)"),
        ("1", "has 1 digit;"),
        ("9" * 500, "characters long"),
    ],
)
def test_invalid_numbers_have_a_reason(given: object, reason: str) -> None:
    check = check_phone(given)
    assert check.number is None
    assert check.reason is not None
    assert reason in check.reason


def test_mask_and_log_redaction() -> None:
    assert mask("17680476163") == "176****6163"
    text = "sent to 17680476163 and 13800138000; serial 605320356903663783^0; secret xyz"
    out = redact(text, ("xyz",))
    assert "17680476163" not in out
    assert "176****6163" in out
    assert "138****8000" in out
    assert "605320356903663783^0" in out  # longer digit runs are not phone numbers
    assert "xyz" not in out


def test_redaction_masks_numbers_with_a_country_code_and_leaves_hex_ids_whole() -> None:
    """A Polyv requestId or a uuid4().hex message id may hold 11 digits that look like a
    number: an operator greps logs for the id, so it stays whole (it once did not: a CI run's
    requestId 1944d18587034786b7d778615c8705ac was logged as 1944d185****4786b7...)."""
    ids = ["1944d18587034786b7d778615c8705ac", "message_id=ab13800138000cd77ffeee0"]
    for text in ids:
        assert redact(text) == text
    out = redact("to +8613800138000, 8617680476163 and 0086 13900000001; SN13900000002x")
    assert out == "to +86138****8000, 86176****6163 and 0086 139****0001; SN139****0002x"
    # A word too short to be an id is not one: its number is masked.
    assert redact("ab13800138000cd") == "ab138****8000cd"


def ok(**changes: object) -> dict[str, object]:
    kwargs: dict[str, object] = {
        "phone_numbers": ["17680476163"],
        "template_param_names": ["code"],
        "template_param_values": ["1234"],
    }
    kwargs.update(changes)
    return kwargs


def test_valid_request_normalises_ints_to_strings() -> None:
    request = validate_request(
        (),
        ok(phone_numbers=[17680476163, "x"], template_param_values=[9802]),
        account_daily_limit=2000,
    )
    assert request.phone_numbers == ("17680476163", "x")
    assert request.template_param_values == ("9802",)
    assert request.message_id is None


def test_positional_arguments_are_accepted() -> None:
    request = validate_request(
        (["17680476163"], ["code"], ["1"]), {"message_id": "m-1"}, account_daily_limit=10
    )
    assert request.message_id == "m-1"


@pytest.mark.parametrize(
    ("changes", "field", "problem"),
    [
        ({"phone_numbers": []}, "phone_numbers", "empty"),
        ({"phone_numbers": None}, "phone_numbers", "missing"),
        ({"phone_numbers": "17680476163"}, "phone_numbers", "must be a list"),
        ({"phone_numbers": ["13800000000"] * 11}, "phone_numbers", "daily limit"),
        ({"template_param_names": []}, "template_param_names", "empty"),
        ({"template_param_names": [1]}, "template_param_names[0]", "must be a string"),
        (
            {"template_param_names": ["code", "code"], "template_param_values": ["1", "2"]},
            "template_param_names",
            "repeat",
        ),
        ({"template_param_values": ["1", "2"]}, "template_param_values", "2 values for 1"),
        ({"template_param_values": [None]}, "template_param_values[0]", "NoneType"),
        ({"template_param_values": [True]}, "template_param_values[0]", "bool"),
        ({"template_param_values": ["x" * 501]}, "template_param_values[0]", "at most"),
        ({"template_param_values": [""]}, "template_param_values[0]", "'code' is empty"),
        (
            {"template_param_names": ["name", "code"], "template_param_values": ["Li", "  "]},
            "template_param_values[1]",
            "'code' is empty",
        ),
        ({"message_id": 5}, "message_id", "must be a string"),
        ({"message_id": "has space"}, "message_id", "without spaces"),
        ({"message_id": ""}, "message_id", "1 to"),
        ({"bogus": 1}, "bogus", "unexpected argument"),
    ],
)
def test_bad_requests_name_the_field(changes: dict[str, object], field: str, problem: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        validate_request((), ok(**changes), account_daily_limit=10)
    message = str(caught.value)
    assert message.startswith(field)
    assert problem in message
