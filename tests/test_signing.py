"""polyv_sms.polyv.signing against Polyv's published rule and examples, computed by hand."""

from __future__ import annotations

import hashlib

import pytest

from polyv_sms.polyv.signing import sign, signing_string

# Polyv's own example (live API "签名生成规则" page): page and size are null and left out.
POLYV_EXAMPLE = {
    "channelIds": "2477096,2272655",
    "startDay": "2022-05-20",
    "endDay": "2022-06-18",
    "appId": "g4rqgmmjuo",
    "timestamp": 1660270926732,
    "page": None,
    "size": None,
}
POLYV_EXAMPLE_SECRET = "fsq2k5weced1h8vui657xtdva66whf0g"
POLYV_EXAMPLE_STRING = (
    "fsq2k5weced1h8vui657xtdva66whf0g"
    "appIdg4rqgmmjuochannelIds2477096,2272655endDay2022-06-18startDay2022-05-20"
    "timestamp1660270926732"
    "fsq2k5weced1h8vui657xtdva66whf0g"
)
POLYV_EXAMPLE_SIGN = "0D2BDA2FD04D93A2B8832B91FD973C4D"


def test_polyv_published_example_string_and_sign() -> None:
    assert signing_string(POLYV_EXAMPLE, POLYV_EXAMPLE_SECRET) == POLYV_EXAMPLE_STRING
    assert sign(POLYV_EXAMPLE, POLYV_EXAMPLE_SECRET) == POLYV_EXAMPLE_SIGN


def test_sms_endpoint_string_is_secret_appid_timestamp_secret() -> None:
    params = {"timestamp": "1656903040000", "appId": "frlr1zazn3"}
    expected_string = "s3cretappIdfrlr1zazn3timestamp1656903040000s3cret"
    assert signing_string(params, "s3cret") == expected_string
    assert sign(params, "s3cret") == hashlib.md5(expected_string.encode()).hexdigest().upper()


def test_md5_is_32_uppercase_hex() -> None:
    digest = sign({"appId": "a", "timestamp": 1}, "x")
    assert len(digest) == 32
    assert digest == digest.upper()
    int(digest, 16)


def test_sha256_variant_signs_signature_method_too() -> None:
    params = {"appId": "a1", "timestamp": 1700000000000, "signatureMethod": "SHA256"}
    text = "kkappIda1signatureMethodSHA256timestamp1700000000000kk"
    assert signing_string(params, "kk") == text
    digest = sign(params, "kk", method="SHA256")
    assert digest == hashlib.sha256(text.encode()).hexdigest().upper()
    assert len(digest) == 64


def test_blank_and_null_values_are_dropped_but_zero_and_false_are_not() -> None:
    params = {"b": "", "c": "   ", "d": None, "e": 0, "f": False, "a": "x", "sign": "OLD"}
    assert signing_string(params, "S") == "Saxe0ffalseS"


def test_booleans_lists_and_dicts_render_like_polyvs_java_sdk() -> None:
    params = {"flag": True, "ids": [1, 2, "三"], "obj": {"k": "v", "n": 1}}
    assert signing_string(params, "S") == 'Sflagtrueids[1,2,"三"]obj{"k":"v","n":1}S'


def test_sort_is_ascii_order_uppercase_before_lowercase() -> None:
    params = {"b": "2", "B": "1", "a": "3", "_": "4"}
    assert signing_string(params, "") == "" + "B1_4a3b2" + ""


def test_utf8_bytes_are_hashed() -> None:
    params = {"name": "短信"}
    expected = hashlib.md5("Sname短信S".encode()).hexdigest().upper()
    assert sign(params, "S") == expected


def test_unknown_method_and_empty_secret_are_refused() -> None:
    with pytest.raises(ValueError, match="method"):
        sign({"a": "1"}, "S", method="SHA1")
    with pytest.raises(ValueError, match="secret"):
        sign({"a": "1"}, "")
