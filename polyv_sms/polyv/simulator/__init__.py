"""A real HTTP server that behaves like Polyv's SMS endpoint, with injectable faults.

``server`` is the endpoint (sign, timestamp window, body, daily limits), ``httpd`` its HTTP
plumbing and ``faults`` what can be injected (status 11, HTTP 500, slow answers, drops...).
"""

from __future__ import annotations

from polyv_sms.polyv.simulator.faults import Faults
from polyv_sms.polyv.simulator.server import SEND_PATH, PolyvSimulator

__all__ = ["SEND_PATH", "Faults", "PolyvSimulator"]
