"""polyv-sms: send SMS through Polyv from Celery workers, with daily quotas and receipts.

Applications enqueue with ``send_sms.delay(phone_numbers, template_param_names,
template_param_values, message_id=...)``; workers run ``celery -A polyv_sms.worker worker -Q sms``.
Importing the package connects to nothing and needs no credentials.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from polyv_sms.config import Settings
from polyv_sms.errors import (
    BrokerUnavailable,
    ConfigError,
    InvalidRequest,
    PermanentError,
    QuotaError,
    SmsError,
    TransientError,
)
from polyv_sms.ledger.receipts import Receipts
from polyv_sms.polyv.client import PhoneResult, PolyvClient, PolyvResponse
from polyv_sms.polyv.signing import sign

if TYPE_CHECKING:
    from polyv_sms.tasks import send_sms

__version__ = "0.1.0"

__all__ = [
    "BrokerUnavailable",
    "ConfigError",
    "InvalidRequest",
    "PermanentError",
    "PhoneResult",
    "PolyvClient",
    "PolyvResponse",
    "QuotaError",
    "Receipts",
    "Settings",
    "SmsError",
    "TransientError",
    "send_sms",
    "sign",
]


def __getattr__(name: str) -> Any:
    # The task is imported on first use so that ``import polyv_sms`` stays free of Celery.
    if name == "send_sms":
        from polyv_sms.tasks import send_sms  # noqa: PLC0415

        return send_sms
    raise AttributeError(f"module 'polyv_sms' has no attribute {name!r}")
