"""The baseline: a bare Celery task that makes only the signed HTTP request.

It is what ``polyv_sms.send_sms`` would be without validation, ledger, receipts, retries, logs
and metrics: the same broker and result backend, the same serializer, ``acks_late``,
``reject_on_worker_lost`` and prefetch settings, the same threads pool and concurrency, and the
same request (a fresh timestamp signed with :func:`polyv_sms.polyv.signing.sign`, the same
JSON body, a pooled :class:`requests.Session` with the same pool size and timeout).

Run it as ``celery -A benchmarks.baseline worker -Q bench_baseline -P threads -c N`` with the
environment of a polyv-sms worker (``POLYV_APP_ID``, ``POLYV_APP_SECRET``, ``POLYV_API_BASE``,
``SMS_BROKER_URL``, ``SMS_RESULT_BACKEND``, ``SMS_WORKER_CONCURRENCY``).
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import requests
from celery import Celery
from requests.adapters import HTTPAdapter

from polyv_sms.polyv.client import SEND_PATH
from polyv_sms.polyv.signing import sign

QUEUE = "bench_baseline"
TASK_NAME = "benchmarks.baseline.send"
_DEFAULT_BROKER = "redis://localhost:6379/0"


def _config() -> dict[str, Any]:
    broker = os.environ.get("SMS_BROKER_URL", _DEFAULT_BROKER)
    return {
        "broker_url": broker,
        "result_backend": os.environ.get("SMS_RESULT_BACKEND", broker),
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "task_default_queue": QUEUE,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "worker_pool": "threads",
        "worker_concurrency": int(os.environ.get("SMS_WORKER_CONCURRENCY", "16")),
        "broker_connection_retry_on_startup": True,
    }


app = Celery("bench_baseline")
app.add_defaults(_config)

_lock = threading.Lock()
_session: requests.Session | None = None


def session() -> requests.Session:
    """This process's pooled session (the pool sized like the polyv-sms worker's)."""
    global _session  # noqa: PLW0603 - one session per worker process
    with _lock:
        if _session is None:
            pool = max(10, int(os.environ.get("SMS_WORKER_CONCURRENCY", "16")))
            _session = requests.Session()
            adapter = HTTPAdapter(pool_connections=1, pool_maxsize=pool)
            _session.mount("http://", adapter)
            _session.mount("https://", adapter)
        return _session


@app.task(name=TASK_NAME, queue=QUEUE, acks_late=True, reject_on_worker_lost=True)
def send(
    phone_numbers: list[str],
    template_param_names: list[str],
    template_param_values: list[str],
    message_id: str | None = None,
) -> dict[str, int]:
    """POST the signed request once and count the accepted numbers."""
    app_id = os.environ["POLYV_APP_ID"]
    params = {"appId": app_id, "timestamp": str(int(time.time() * 1000))}
    params["sign"] = sign(params, os.environ["POLYV_APP_SECRET"])
    body = {
        "phoneNumbers": list(phone_numbers),
        "templateParamNames": list(template_param_names),
        "templateParamValues": list(template_param_values),
    }
    timeout = float(os.environ.get("POLYV_HTTP_TIMEOUT", "10"))
    url = os.environ.get("POLYV_API_BASE", "https://api.polyv.net").rstrip("/") + SEND_PATH
    response = session().post(url, params=params, json=body, timeout=(timeout, timeout))
    response.raise_for_status()
    data = response.json()["data"]
    return {"accepted": sum(1 for entry in data if entry.get("status") == 12)}
