"""Compatibility: the Polyv client lives in :mod:`polyv_sms.polyv.client`."""

from __future__ import annotations

from polyv_sms.polyv.client import PolyvClient
from polyv_sms.polyv.response import PhoneResult, PolyvResponse

__all__ = ["PhoneResult", "PolyvClient", "PolyvResponse"]
