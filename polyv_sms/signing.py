"""Compatibility: the sign rule lives in :mod:`polyv_sms.polyv.signing`.

``polyv_sms.signing.sign(params, secret, method="MD5")`` is part of the public interface.
"""

from __future__ import annotations

from polyv_sms.polyv.signing import SIGN_METHODS, sign, signing_string

__all__ = ["SIGN_METHODS", "sign", "signing_string"]
