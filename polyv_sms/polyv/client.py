"""A client for Polyv's "send Aliyun SMS notification" endpoint, usable without Celery.

One pooled :class:`requests.Session`, used through its public API: the request is prepared
once (``Session.prepare_request``) and each send is a copy of it with a fresh timestamp and sign
(a retry ten minutes later must not reuse a stale one) and its JSON body, sent with
``Session.send``; TLS verification on. Each send is one exchange with a wall-clock deadline
(:attr:`PolyvClient.deadline_s`, by default :func:`polyv_sms.config.exchange_deadline_s`):
DNS, connect with its in-place retries, sending, the status line, the headers and every byte
of the body; past it the connection is shut down (:mod:`polyv_sms.polyv.transport`).

Failures map to :mod:`polyv_sms.errors`. Whether the request may have reached Polyv is known
from the connection itself (did a byte of the request reach the socket?), not guessed from the
error's type:

- nothing sent -- connect refused or timed out, DNS, proxy, TLS handshake, a closed pool:
  :class:`~polyv_sms.errors.PolyvUnavailable`; connect errors are retried in place, bounded
  by attempts, the retry budget and the deadline (a TLS handshake failure is not);
- anything once the request may have left -- read timeout, connection dropped, an answer
  whose body is cut short, stalls or does not decode, the deadline passing:
  :class:`~polyv_sms.errors.AmbiguousSend` (Polyv may have sent it; never retried in place);
- HTTP 5xx: :class:`~polyv_sms.errors.PolyvUnavailable`;
- rate limiting: :class:`~polyv_sms.errors.RateLimited`;
- any other error envelope: :class:`~polyv_sms.errors.PermanentError` with Polyv's code/desc;
- a body that is not the documented JSON: :class:`~polyv_sms.errors.UnexpectedResponse`;
  when only some per-number entries are malformed (or carry an unknown status), it carries
  the entries that parsed in ``response``.

A session whose transport for the Polyv URL is not requests' own ``HTTPAdapter`` (a test
double, a plug-in, a subclass) is used as it is; the client cannot watch its connections, so
only requests' ``ConnectTimeout`` and ``ProxyError`` count as "never sent" and the deadline is
not enforced (the per-read ``timeout`` still is).
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlencode

import requests
import tenacity
from requests.adapters import HTTPAdapter

from polyv_sms.config import (
    DEFAULT_API_BASE,
    DEFAULT_CONNECT_RETRY_BUDGET_S,
    DEFAULT_HTTP_TIMEOUT_S,
    POLYV_MAX_NUMBERS_PER_REQUEST,
    Secret,
    exchange_deadline_s,
)
from polyv_sms.errors import (
    AmbiguousSend,
    BatchTooLarge,
    InvalidRequest,
    PermanentError,
    PolyvUnavailable,
    RateLimited,
    UnexpectedResponse,
)
from polyv_sms.polyv.answer import json_body, parse_answer
from polyv_sms.polyv.phones import mask
from polyv_sms.polyv.response import (
    KNOWN_STATUSES,
    SEND_PATH,
    STATUS_ACCEPTED,
    STATUS_INVALID,
    STATUS_OVER_LIMIT,
    STATUS_UPSTREAM_FAILED,
    PhoneResult,
    PolyvResponse,
)
from polyv_sms.polyv.signing import sign
from polyv_sms.polyv.transport import DeadlineAdapter, Exchange

__all__ = [
    "KNOWN_STATUSES",
    "STATUS_ACCEPTED",
    "STATUS_INVALID",
    "STATUS_OVER_LIMIT",
    "STATUS_UPSTREAM_FAILED",
    "PhoneResult",
    "PolyvClient",
    "PolyvResponse",
]

log = logging.getLogger("polyv_sms.polyv.client")

DEFAULT_CONNECT_ATTEMPTS = 3
DEFAULT_POOL_MAXSIZE = 32
_LOGGED_NUMBERS = 5
_FIRST_CONNECT_RETRY_S = 0.1
_MAX_CONNECT_RETRY_WAIT_S = 0.5
#: A connect attempt is not started with less time than this left before the deadline.
_MIN_ATTEMPT_S = 0.05
_JSON_HEADERS = {"Content-Type": "application/json"}
#: What a transport the client cannot watch still says for certain: nothing was sent.
_NEVER_SENT = (requests.exceptions.ConnectTimeout, requests.exceptions.ProxyError)


class PolyvClient:
    """Send SMS notifications through Polyv.

    Args:
        app_id: the account's appId.
        app_secret: the account's appSecret (a ``str`` or a :class:`~polyv_sms.config.Secret`).
        base_url: scheme and host, e.g. ``https://api.polyv.net``.
        timeout: seconds for connecting and, separately, for each read of the answer.
        session: a ``requests.Session`` to use instead of the client's own. If its adapter
            for the send URL is requests' plain ``HTTPAdapter``, the client mounts its own
            (the same, with the deadline's watch; same ``max_retries``) for that URL only.
            Its headers, auth, cookies and hooks are read once, when the client is made (the
            request is prepared then); its environment (proxies, CA bundle) on every send.
        clock: returns the current time in seconds; the timestamp is taken per request.
        connect_attempts: tries for a connection that fails before anything is sent.
        connect_retry_budget_s: the most time the tries after the first may take together.
        pool_maxsize: pooled connections kept to Polyv (one per concurrent sender).
        deadline_s: the wall-clock bound on one whole send (default
            :func:`~polyv_sms.config.exchange_deadline_s` of ``timeout``).

    Attributes:
        deadline_s: that bound, in seconds: a send never takes longer (plus a fraction of a
            second to notice), whatever the server does; DNS resolution excepted.
    """

    def __init__(
        self,
        app_id: str,
        app_secret: str | Secret,
        base_url: str = DEFAULT_API_BASE,
        timeout: float = DEFAULT_HTTP_TIMEOUT_S,
        *,
        session: requests.Session | None = None,
        clock: Callable[[], float] = time.time,
        connect_attempts: int = DEFAULT_CONNECT_ATTEMPTS,
        connect_retry_budget_s: float = DEFAULT_CONNECT_RETRY_BUDGET_S,
        pool_maxsize: int = DEFAULT_POOL_MAXSIZE,
        deadline_s: float | None = None,
    ) -> None:
        if not app_id:
            raise InvalidRequest("app_id: the appId is empty")
        self.app_id = app_id
        self._secret = app_secret if isinstance(app_secret, Secret) else Secret(app_secret)
        if not self._secret.reveal():
            raise InvalidRequest("app_secret: the appSecret is empty")
        self.deadline_s = exchange_deadline_s(timeout) if deadline_s is None else deadline_s
        if not self.deadline_s > 0:
            raise InvalidRequest(f"deadline_s: {self.deadline_s!r} is not a positive duration")
        self.base_url = base_url.rstrip("/")
        self.url = self.base_url + SEND_PATH
        self.timeout = timeout
        self._clock = clock
        self._own_session = session is None
        self._send_options: dict[str, Any] = {}
        if session is None:
            session = requests.Session()
            # What requests would look up in the environment on every call (HTTP(S)_PROXY,
            # NO_PROXY, REQUESTS_CA_BUNDLE, ...) is resolved once: the URL never changes.
            environment = session.merge_environment_settings(self.url, {}, None, None, None)
            self._send_options = {k: environment[k] for k in ("proxies", "verify", "cert")}
            session.trust_env = False
        # The request as requests would prepare it, but once: the session's headers, auth,
        # cookies and hooks, the URL normalised. Each send copies it and fills in what changes
        # (the signed query and the body) and goes through Session.send, skipping what
        # Session.post redoes on every call (cookie jars merged, the URL parsed and requoted,
        # the parameters encoded): about 0.15 ms of CPU per request (benchmarks/client_cpu.py).
        self._prepared = session.prepare_request(
            requests.Request("POST", self.url, headers=_JSON_HEADERS)
        )
        adapter = session.get_adapter(self.url)
        if type(adapter) is HTTPAdapter:
            watched = DeadlineAdapter(
                pool_connections=1, pool_maxsize=pool_maxsize, max_retries=adapter.max_retries
            )
            session.mount(self.url, watched)  # the send URL only: the rest stays the caller's
        self._session = session
        self._connect_attempts = connect_attempts
        self._connect_retry_budget_s = connect_retry_budget_s

    def __repr__(self) -> str:
        return f"PolyvClient(app_id={self.app_id!r}, base_url={self.base_url!r})"

    def __enter__(self) -> PolyvClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close pooled connections (only a session the client created itself)."""
        if self._own_session:
            self._session.close()

    def signed_query(self) -> dict[str, str]:
        """The query parameters of one request: appId, a fresh timestamp and its sign."""
        params = {"appId": self.app_id, "timestamp": str(int(self._clock() * 1000))}
        params["sign"] = sign(params, self._secret.reveal())
        return params

    def send(
        self,
        phone_numbers: Sequence[str],
        template_param_names: Sequence[str],
        template_param_values: Sequence[str],
    ) -> PolyvResponse:
        """Send one request of at most 200 numbers, within :attr:`deadline_s`.

        The numbers are sent as given: validating them is the caller's job.

        Args:
            phone_numbers: 1 to 200 numbers.
            template_param_names: the template's parameter names.
            template_param_values: one value per name.

        Returns:
            Polyv's per-number answers.

        Raises:
            BatchTooLarge: more than 200 numbers (nothing is sent).
            InvalidRequest: no numbers, or names and values differ in length.
            TransientError: see the module docstring.
            PermanentError: Polyv refused the request.
        """
        if len(phone_numbers) > POLYV_MAX_NUMBERS_PER_REQUEST:
            raise BatchTooLarge(
                f"phone_numbers: {len(phone_numbers)} numbers; Polyv accepts at most "
                f"{POLYV_MAX_NUMBERS_PER_REQUEST} per request"
            )
        if not phone_numbers:
            raise InvalidRequest("phone_numbers: no numbers to send")
        if len(template_param_names) != len(template_param_values):
            raise InvalidRequest(
                f"template_param_values: {len(template_param_values)} values for "
                f"{len(template_param_names)} names"
            )
        body = {
            "phoneNumbers": [str(n) for n in phone_numbers],
            "templateParamNames": list(template_param_names),
            "templateParamValues": list(template_param_values),
        }
        payload = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        started = time.perf_counter()
        failure: Exception | None = None
        with Exchange(self.deadline_s) as exchange:
            answered = False
            try:
                http = self._post(payload, exchange)
                answered = True
                http.content  # noqa: B018 - every byte of the body, inside the deadline
            except requests.exceptions.RequestException as exc:
                failure = self._transport_error(exc, exchange, answered=answered)
                if answered:
                    http.close()
        if failure is None and exchange.expired and not isinstance(json_body(http), dict):
            # Cut off at the deadline where the end of the connection also ends the answer
            # (headers, or a body without a length): what was read is not all of it.
            failure = self._cut_off("answer ended by the cut")
        elapsed = time.perf_counter() - started
        if failure is not None:
            log.warning(
                "polyv send failed numbers=%d [%s] elapsed_ms=%.0f error=%s",
                len(phone_numbers),
                _masked(phone_numbers),
                elapsed * 1000,
                failure,
            )
            # Raised outside the except block: the requests error (its text quotes the signed
            # URL) must not ride along as __context__ into error trackers or task results.
            raise failure
        try:
            response = parse_answer(http, elapsed)
        except (PermanentError, PolyvUnavailable, RateLimited, UnexpectedResponse) as exc:
            log.warning(
                "polyv send refused http=%d numbers=%d [%s] elapsed_ms=%.0f error=%s",
                http.status_code,
                len(phone_numbers),
                _masked(phone_numbers),
                elapsed * 1000,
                exc,
            )
            raise
        if log.isEnabledFor(logging.INFO):  # the arguments cost more than a disabled call
            counts = Counter(r.status for r in response.results)
            log.info(
                "polyv send requestId=%s numbers=%d [%s] statuses=%s elapsed_ms=%.0f",
                response.request_id,
                len(phone_numbers),
                _masked(phone_numbers),
                dict(sorted(counts.items())),
                elapsed * 1000,
            )
        return response

    def _post(self, payload: bytes, exchange: Exchange) -> requests.Response:
        """POST, retrying in place what provably never reached the server; answer unread."""
        try:
            return self._post_once(payload, exchange)
        except requests.exceptions.RequestException as exc:
            if not self._retry_in_place(exc, exchange):
                raise
        time.sleep(_FIRST_CONNECT_RETRY_S)
        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception(lambda exc: self._retry_in_place(exc, exchange)),
            stop=tenacity.stop_any(
                tenacity.stop_after_attempt(self._connect_attempts - 1),
                tenacity.stop_after_delay(self._connect_retry_budget_s),
                tenacity.stop_before_delay(exchange.remaining() - _MIN_ATTEMPT_S),  # deadline
            ),
            wait=tenacity.wait_exponential(multiplier=0.2, max=_MAX_CONNECT_RETRY_WAIT_S),
            reraise=True,
        )
        return retrying(self._post_once, payload, exchange)

    def _post_once(self, payload: bytes, exchange: Exchange) -> requests.Response:
        # The connect timeout never reaches past the deadline: until the socket exists, the
        # deadline's watchdog has nothing to shut down.
        connect_s = max(min(self.timeout, exchange.remaining()), _MIN_ATTEMPT_S)
        request = self._prepared.copy()
        request.url = f"{self._prepared.url}?{urlencode(self.signed_query())}"
        request.body = payload
        request.headers["Content-Length"] = str(len(payload))
        options = self._send_options or self._session.merge_environment_settings(
            request.url, {}, None, None, None
        )
        return self._session.send(
            request,
            timeout=(connect_s, self.timeout),
            allow_redirects=False,
            stream=True,  # the body is read apart: a failure there is "cut short", not "no answer"
            proxies=options["proxies"],
            verify=options["verify"],
            cert=options["cert"],
        )

    def _never_sent(self, exc: requests.exceptions.RequestException, exchange: Exchange) -> bool:
        # Looked up when needed (on failures only): the session may have been re-mounted.
        if isinstance(self._session.get_adapter(self.url), DeadlineAdapter):
            return not exchange.sent
        return isinstance(exc, _NEVER_SENT)

    def _retry_in_place(self, exc: BaseException, exchange: Exchange) -> bool:
        """A connection that failed before anything was sent, with time left to try again.

        A failed TLS handshake is not retried: a certificate problem does not mend in 100 ms.
        """
        return (
            isinstance(exc, requests.exceptions.ConnectionError)
            and not isinstance(exc, requests.exceptions.SSLError)
            and self._never_sent(exc, exchange)
            and self._connect_attempts > 1
            and not exchange.expired
            and exchange.remaining() > _FIRST_CONNECT_RETRY_S + _MIN_ATTEMPT_S
        )

    def _transport_error(
        self, exc: requests.exceptions.RequestException, exchange: Exchange, *, answered: bool
    ) -> Exception:
        """Only what provably happened before the request reached Polyv is unambiguous.

        The messages name the error's type and the base URL, never the full URL (it carries
        the sign) nor the error's text (which quotes it).
        """
        kind = type(exc).__name__
        base = self.base_url
        maybe = "Polyv may have sent the SMS"
        if self._never_sent(exc, exchange) and not answered:
            if exchange.expired:
                return PolyvUnavailable(
                    f"no connection to {base} within the {self.deadline_s:g}s deadline ({kind})"
                )
            if isinstance(exc, requests.exceptions.SSLError):
                return PolyvUnavailable(f"TLS handshake with {base} failed ({kind})")
            if isinstance(exc, requests.exceptions.ConnectionError):
                return PolyvUnavailable(f"could not connect to {base} ({kind})")
            return PolyvUnavailable(f"request to {base} failed before it was sent ({kind})")
        if exchange.expired:
            return self._cut_off(kind)
        if answered:
            if _timed_out(exc):
                return AmbiguousSend(
                    f"the answer from {base} stalled for {self.timeout:g}s after its headers "
                    f"({kind}); {maybe}"
                )
            return AmbiguousSend(
                f"the answer from {base} was cut short after its headers ({kind}); {maybe}"
            )
        if _timed_out(exc):
            return AmbiguousSend(
                f"no answer from {base} within {self.timeout:g}s ({kind}); {maybe}"
            )
        if isinstance(exc, requests.exceptions.ConnectionError):
            return AmbiguousSend(f"connection to {base} dropped before an answer ({kind}); {maybe}")
        return AmbiguousSend(
            f"request to {base} failed after it may have been sent ({kind}); {maybe}"
        )

    def _cut_off(self, kind: str) -> AmbiguousSend:
        return AmbiguousSend(
            f"the exchange with {self.base_url} outlasted its {self.deadline_s:g}s deadline and "
            f"was cut off ({kind}); Polyv may have sent the SMS"
        )


def _timed_out(exc: BaseException) -> bool:
    """A socket wait ran out of time under this error: requests reports a body read's timeout
    as a plain ``ConnectionError`` whose chain holds the ``TimeoutError``."""
    error: BaseException | None = exc
    for _ in range(8):  # a short chain; never loop on a cycle
        if error is None:
            return False
        if isinstance(error, requests.exceptions.Timeout | TimeoutError):
            return True
        error = error.__cause__ or error.__context__
    return False


def _masked(numbers: Sequence[str]) -> str:
    shown = ", ".join(mask(str(n)) for n in numbers[:_LOGGED_NUMBERS])
    extra = len(numbers) - _LOGGED_NUMBERS
    return f"{shown}, +{extra} more" if extra > 0 else shown
