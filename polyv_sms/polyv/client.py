"""A client for Polyv's "send Aliyun SMS notification" endpoint, usable without Celery.

One pooled :class:`requests.Session`; a fresh timestamp and sign for every HTTP request
(a retry ten minutes later must not reuse a stale one); JSON body; TLS verification on.
The session's settings (TLS verification, client certificate, proxies from the session and the
environment) are resolved once, and each request goes straight to the urllib3 connection pool
requests would use for the URL, with the same options requests passes it: the per-request
work of ``Session.request`` and of building a ``requests.Response`` (cookies, redirects,
hooks, header dictionaries) cost more CPU than the rest of a message's own work.

Failures map to :mod:`polyv_sms.errors`:

- connect error (nothing reached the server): retried in place, bounded, then
  :class:`~polyv_sms.errors.PolyvUnavailable`;
- TLS handshake failure (nothing was sent): :class:`~polyv_sms.errors.PolyvUnavailable`;
- anything else once the request may have left -- read timeout, connection dropped, an answer
  whose body is cut short, stalls or does not decode: :class:`~polyv_sms.errors.AmbiguousSend`
  (Polyv may have sent it; never retried in place);
- HTTP 5xx: :class:`~polyv_sms.errors.PolyvUnavailable`;
- rate limiting: :class:`~polyv_sms.errors.RateLimited`;
- any other error envelope: :class:`~polyv_sms.errors.PermanentError` with Polyv's code/desc;
- a body that is not the documented JSON: :class:`~polyv_sms.errors.UnexpectedResponse`;
  when only some per-number entries are malformed (or carry an unknown status), it carries
  the entries that parsed in ``response``.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple
from urllib.parse import urlencode

import requests
import tenacity
import urllib3
import urllib3.connectionpool
import urllib3.exceptions
from requests.adapters import BaseAdapter, HTTPAdapter
from requests.structures import CaseInsensitiveDict

from polyv_sms.config import (
    DEFAULT_API_BASE,
    DEFAULT_CONNECT_RETRY_BUDGET_S,
    DEFAULT_HTTP_TIMEOUT_S,
    POLYV_MAX_NUMBERS_PER_REQUEST,
    Secret,
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
_RATE_LIMIT_MARKERS = ("qps", "exceeds number of calls", "rate limit", "too many requests")
_LOGGED_NUMBERS = 5
_FIRST_CONNECT_RETRY_S = 0.1
_SHOWN_MALFORMED = 3
_JSON_HEADERS = {"Content-Type": "application/json"}
#: requests' own HTTPAdapter.send: when something patched it (a test double), use it.
_HTTPADAPTER_SEND = HTTPAdapter.send


class _Answer(NamedTuple):
    """An HTTP answer whose body has been read in full."""

    status: int
    content_type: str
    body: bytes


class _AnswerCutShort(requests.exceptions.RequestException):
    """The answer's status line and headers arrived but reading its body failed.

    Wraps the ``requests`` error (``cause``) so that its classification knows the request
    reached the server, whatever the error's type (even an SSL error).
    """

    def __init__(self, cause: requests.exceptions.RequestException) -> None:
        super().__init__(cause)
        self.cause = cause


def _is_connect_error(exc: BaseException) -> bool:
    """True when the request provably never reached the server."""
    if isinstance(exc, requests.exceptions.ConnectTimeout | requests.exceptions.ProxyError):
        # urllib3 gives a ProxyError only before the connection to the proxy (or the tunnel
        # through it) is up: no byte of the request has left.
        return True
    if isinstance(exc, requests.exceptions.ConnectionError) and exc.args:
        reason = getattr(exc.args[0], "reason", exc.args[0])
        return isinstance(
            reason, (urllib3.exceptions.NewConnectionError, urllib3.exceptions.ClosedPoolError)
        )
    return False


#: Functions that run before a single byte of the request is written to a TLS connection.
_TLS_SETUP_FUNCTIONS = frozenset({"do_handshake", "_ssl_wrap_socket_and_match_hostname"})


def _in_tls_setup(exc: BaseException) -> bool:
    """True when a TLS error was raised while the connection was being set up.

    requests (and urllib3) give the same type to a failed handshake and to a broken TLS
    record after the request went out; only where the underlying error was raised tells
    them apart, so the chain of causes is searched for a handshake frame.
    """
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        error = todo.pop()
        if id(error) in seen or len(seen) > 20:
            continue
        seen.add(id(error))
        tb = error.__traceback__
        while tb is not None:
            if tb.tb_frame.f_code.co_name in _TLS_SETUP_FUNCTIONS:
                return True
            tb = tb.tb_next
        linked = [error.__cause__, error.__context__, getattr(error, "reason", None)]
        linked += [arg for arg in error.args if isinstance(arg, BaseException)]
        todo += [link for link in linked if isinstance(link, BaseException)]
    return False


class PolyvClient:
    """Send SMS notifications through Polyv.

    Args:
        app_id: the account's appId.
        app_secret: the account's appSecret (a ``str`` or a :class:`~polyv_sms.config.Secret`).
        base_url: scheme and host, e.g. ``https://api.polyv.net``.
        timeout: seconds for connecting and, separately, for reading the answer.
        session: a ``requests.Session`` to use instead of the client's own.
        clock: returns the current time in seconds; the timestamp is taken per request.
        connect_attempts: tries for a connection that fails before anything is sent.
        connect_retry_budget_s: the most time those tries may take together.
        pool_maxsize: pooled connections kept to Polyv (one per concurrent sender).
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
        pool_maxsize: int = 32,
    ) -> None:
        if not app_id:
            raise InvalidRequest("app_id: the appId is empty")
        self.app_id = app_id
        self._secret = app_secret if isinstance(app_secret, Secret) else Secret(app_secret)
        if not self._secret.reveal():
            raise InvalidRequest("app_secret: the appSecret is empty")
        self.base_url = base_url.rstrip("/")
        self.url = self.base_url + SEND_PATH
        self.timeout = timeout
        self._clock = clock
        self._own_session = session is None
        if session is None:
            session = requests.Session()
            adapter = HTTPAdapter(pool_connections=1, pool_maxsize=pool_maxsize)
            session.mount("https://", adapter)
            session.mount("http://", adapter)
        self._session = session
        # What requests would look up in the environment on every call (HTTP(S)_PROXY,
        # NO_PROXY, REQUESTS_CA_BUNDLE, ...) is resolved once: the URL never changes, and the
        # look-ups cost more CPU than the rest of a message's own work.
        environment = session.merge_environment_settings(self.url, {}, None, None, None)
        self._send_options: dict[str, Any] = {
            "proxies": environment["proxies"],
            "verify": environment["verify"],
            "cert": environment["cert"],
        }
        if self._own_session:
            session.trust_env = False
        self._adapter: BaseAdapter = session.get_adapter(self.url)
        merged = CaseInsensitiveDict(session.headers)  # as requests merges them
        merged.update(_JSON_HEADERS)
        merged.pop("Content-Length", None)  # each request sets its own
        self._headers: dict[str, str] = {
            key: value.decode("latin-1") if isinstance(value, bytes) else value
            for key, value in merged.items()
        }
        self._probe = requests.PreparedRequest()
        self._probe.prepare(method="POST", url=self.url)
        # Only requests' own adapter is bypassed: a subclass (or a patched send, as test
        # doubles like `responses` install) is used through its send().
        self._direct = type(self._adapter) is HTTPAdapter
        self._target = self._probe.path_url
        self._retries: urllib3.Retry | None = None
        if isinstance(self._adapter, HTTPAdapter):
            # The request target: the path, or the absolute URL through an HTTP proxy.
            self._target = self._adapter.request_url(self._probe, self._send_options["proxies"])
            self._retries = self._adapter.max_retries
        self._urllib3_timeout = urllib3.Timeout(connect=timeout, read=timeout)
        self._pool: urllib3.connectionpool.ConnectionPool | None = None
        self._connect_attempts = connect_attempts
        self._retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception(_is_connect_error),
            stop=tenacity.stop_after_attempt(max(1, connect_attempts - 1))
            | tenacity.stop_after_delay(connect_retry_budget_s),
            wait=tenacity.wait_exponential(multiplier=0.2, max=0.5),
            reraise=True,
        )

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
            # urllib3 2 no longer closes the pools a pool manager lets go: close ours.
            pool, self._pool = self._pool, None
            if pool is not None:
                pool.close()

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
        """Send one request of at most 200 numbers.

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
        try:
            http = self._post_retrying_connect_errors(payload)
        except requests.exceptions.RequestException as exc:
            failure = self._transport_error(exc)
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
            response = self._parse(http, elapsed)
        except (PermanentError, PolyvUnavailable, RateLimited, UnexpectedResponse) as exc:
            log.warning(
                "polyv send refused http=%d numbers=%d [%s] elapsed_ms=%.0f error=%s",
                http.status,
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

    def _post_retrying_connect_errors(self, payload: bytes) -> _Answer:
        try:
            return self._post(payload)
        except requests.exceptions.RequestException as exc:
            if not _is_connect_error(exc) or self._connect_attempts <= 1:
                raise
        # Nothing reached the server: try again in place, a bounded number of times.
        time.sleep(_FIRST_CONNECT_RETRY_S)
        return self._retrying(self._post, payload)

    def _post(self, payload: bytes) -> _Answer:
        query = urlencode(self.signed_query())
        if not self._direct or HTTPAdapter.send is not _HTTPADAPTER_SEND:
            return self._post_through_adapter(query, payload)
        target = f"{self._target}?{query}"
        headers = {**self._headers, "Content-Length": str(len(payload))}
        pool = self._connection_pool()
        assert isinstance(pool, urllib3.HTTPConnectionPool)
        try:
            # the options requests' HTTPAdapter.send passes
            raw = pool.urlopen(
                "POST",
                target,
                body=payload,
                headers=headers,
                redirect=False,
                assert_same_host=False,
                preload_content=False,
                decode_content=False,
                retries=self._retries,
                timeout=self._urllib3_timeout,
            )
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            if isinstance(exc, urllib3.exceptions.ClosedPoolError):
                self._pool = None  # close() ran meanwhile: nothing was sent; fetch it anew
            raise _as_requests_error(exc) from exc
        # Read the whole body here, where a failure is a transport error (the request has
        # reached the server by now), not later in _parse.
        try:
            body = raw.read(decode_content=True)
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise _AnswerCutShort(_as_requests_body_error(exc)) from exc
        finally:
            raw.release_conn()
        content_type = raw.headers.get("Content-Type") or "no content type"
        return _Answer(raw.status, content_type, body)

    def _connection_pool(self) -> urllib3.connectionpool.ConnectionPool:
        """The urllib3 pool requests would use for the URL (looked up once, then kept)."""
        pool = self._pool
        if pool is None:
            adapter = self._adapter
            assert isinstance(adapter, HTTPAdapter)
            verify, cert = self._send_options["verify"], self._send_options["cert"]
            pool = adapter.get_connection_with_tls_context(
                self._probe, verify, proxies=self._send_options["proxies"], cert=cert
            )
            adapter.cert_verify(pool, self.url, verify, cert)  # type: ignore[no-untyped-call]
            self._pool = pool
        return pool

    def _post_through_adapter(self, query: str, payload: bytes) -> _Answer:
        """A session whose adapter for the URL is not requests' own: use it as it is."""
        request = requests.PreparedRequest()
        request.prepare(
            method="POST", url=f"{self.url}?{query}", headers=self._headers, data=payload
        )
        response = self._adapter.send(
            request, timeout=(self.timeout, self.timeout), **self._send_options
        )
        try:
            body = response.content
        except requests.exceptions.RequestException as exc:
            response.close()
            raise _AnswerCutShort(exc) from exc
        content_type = response.headers.get("Content-Type") or "no content type"
        return _Answer(response.status_code, content_type, body)

    def _transport_error(self, exc: requests.exceptions.RequestException) -> Exception:
        """Only what provably happened before the request reached Polyv is unambiguous.

        The messages name the error's type and the base URL, never the full URL (it carries
        the sign) nor the error's text (which quotes it).
        """
        if isinstance(exc, _AnswerCutShort):
            cause = exc.cause
            kind = type(cause).__name__
            if _is_read_timeout(cause):
                return AmbiguousSend(
                    f"the answer from {self.base_url} stalled for {self.timeout:g}s after its "
                    f"headers ({kind}); Polyv may have sent the SMS"
                )
            return AmbiguousSend(
                f"the answer from {self.base_url} was cut short after its headers ({kind}); "
                "Polyv may have sent the SMS"
            )
        kind = type(exc).__name__
        if _is_connect_error(exc):
            return PolyvUnavailable(f"could not connect to {self.base_url} ({kind})")
        if isinstance(exc, requests.exceptions.SSLError) and _in_tls_setup(exc):
            return PolyvUnavailable(f"TLS handshake with {self.base_url} failed ({kind})")
        if _is_read_timeout(exc):
            return AmbiguousSend(
                f"no answer from {self.base_url} within {self.timeout:g}s ({kind}); "
                "Polyv may have sent the SMS"
            )
        if isinstance(exc, requests.exceptions.ConnectionError):
            return AmbiguousSend(
                f"connection to {self.base_url} dropped before an answer ({kind}); "
                "Polyv may have sent the SMS"
            )
        return AmbiguousSend(
            f"request to {self.base_url} failed after it may have been sent ({kind}); "
            "Polyv may have sent the SMS"
        )

    def _parse(self, http: _Answer, elapsed: float) -> PolyvResponse:
        status = http.status
        body = _json_body(http)
        if not isinstance(body, dict):
            kind = http.content_type
            if status >= 500:
                raise PolyvUnavailable(f"Polyv answered HTTP {status} ({kind})")
            raise UnexpectedResponse(
                f"Polyv answered HTTP {status} with a body that is not a JSON object "
                f"({kind}, {len(http.body)} bytes)"
            )
        request_id = str(body.get("requestId") or "")
        if status != 200 or body.get("code") != 200 or body.get("success") is False:
            raise _envelope_error(status, body, request_id)
        data = body.get("data")
        if not isinstance(data, list):
            raise UnexpectedResponse(f"Polyv's answer has no data list (requestId {request_id})")
        # Each entry on its own: one malformed entry must not throw away the others (a
        # status-12 entry lost here would be sent again). The numbers of malformed entries
        # are missing from the results, which the dispatcher treats as ambiguous.
        results = []
        unknown = set()
        malformed = []
        for index, entry in enumerate(data):
            result = _parse_entry(entry)
            if isinstance(result, str):
                malformed.append(f"entry {index} {result}")
                continue
            results.append(result)
            if result.status not in KNOWN_STATUSES:
                unknown.add(result.status)
        response = PolyvResponse(request_id, tuple(results), elapsed)
        if unknown or malformed:
            problems = []
            if unknown:
                problems.append(f"unknown per-number status(es) {sorted(unknown)}")
            if malformed:
                shown = "; ".join(malformed[:_SHOWN_MALFORMED])
                more = len(malformed) - _SHOWN_MALFORMED
                shown += f"; +{more} more" if more > 0 else ""
                problems.append(f"{len(malformed)} malformed data entr(y/ies) ({shown})")
            raise UnexpectedResponse(
                f"Polyv answered {' and '.join(problems)} (requestId {request_id})",
                response=response,
            )
        return response


def _parse_entry(entry: object) -> PhoneResult | str:
    """One per-number entry, or what is wrong with it (never quoting the entry: PII)."""
    if not isinstance(entry, dict):
        return "is not an object"
    number = entry.get("phoneNumber")
    status = entry.get("status")
    serial = entry.get("serialNo")
    if isinstance(number, int) and not isinstance(number, bool):
        number = str(number)
    if not isinstance(number, str):
        return "lacks a phoneNumber"
    if not isinstance(status, int) or isinstance(status, bool):
        return "lacks an integer status"
    if serial is not None and not isinstance(serial, str):
        return "has a serialNo that is not a string"
    return PhoneResult(number, status, serial or None)


def _json_body(http: _Answer) -> Any:
    """The answer's JSON, decoded as requests' ``Response.json`` would: with the charset the
    Content-Type declares, else as UTF-8/16/32; ``None`` when it is not JSON."""
    charset = None
    if "charset" in http.content_type.lower():
        charset = requests.utils.get_encoding_from_headers({"content-type": http.content_type})
    try:
        if charset:
            try:
                return json.loads(http.body.decode(charset, errors="replace"))
            except LookupError:  # a charset Python does not know
                pass
        return json.loads(http.body)
    except ValueError:  # not JSON, or not UTF-8/16/32 text
        return None


def _as_requests_error(exc: Exception) -> requests.exceptions.RequestException:
    """The error requests' ``HTTPAdapter.send`` raises for a urllib3 error of ``urlopen``."""
    errors = requests.exceptions
    if isinstance(exc, urllib3.exceptions.MaxRetryError):
        reason = exc.reason
        if isinstance(reason, urllib3.exceptions.ConnectTimeoutError) and not isinstance(
            reason, urllib3.exceptions.NewConnectionError
        ):
            return errors.ConnectTimeout(exc)
        if isinstance(reason, urllib3.exceptions.ResponseError):
            return errors.RetryError(exc)
        if isinstance(reason, urllib3.exceptions.ProxyError):
            return errors.ProxyError(exc)
        if isinstance(reason, urllib3.exceptions.SSLError):
            return errors.SSLError(exc)
        return errors.ConnectionError(exc)
    if isinstance(exc, urllib3.exceptions.ProxyError):
        return errors.ProxyError(exc)
    if isinstance(exc, urllib3.exceptions.SSLError):
        return errors.SSLError(exc)
    if isinstance(exc, urllib3.exceptions.ReadTimeoutError):
        return errors.ReadTimeout(exc)
    if isinstance(exc, urllib3.exceptions.InvalidHeader):
        return errors.InvalidHeader(exc)
    # ProtocolError, ClosedPoolError, OSError and any other urllib3 error
    return errors.ConnectionError(exc)


def _as_requests_body_error(exc: Exception) -> requests.exceptions.RequestException:
    """The error requests raises for a urllib3 error while reading a body (``iter_content``)."""
    errors = requests.exceptions
    if isinstance(exc, urllib3.exceptions.ProtocolError):
        return errors.ChunkedEncodingError(exc)
    if isinstance(exc, urllib3.exceptions.DecodeError):
        return errors.ContentDecodingError(exc)
    if isinstance(exc, urllib3.exceptions.SSLError):
        return errors.SSLError(exc)
    return errors.ConnectionError(exc)  # ReadTimeoutError and the rest, as requests does


def _is_read_timeout(exc: requests.exceptions.RequestException) -> bool:
    """A timeout while waiting for (part of) the answer: requests wraps it in two ways."""
    if isinstance(exc, requests.exceptions.Timeout):
        return True
    reason = exc.args[0] if exc.args else None
    reason = getattr(reason, "reason", reason)
    return isinstance(reason, urllib3.exceptions.ReadTimeoutError)


def _envelope_error(status: int, body: dict[str, Any], request_id: str) -> Exception:
    raw_error = body.get("error")
    error: dict[str, Any] = raw_error if isinstance(raw_error, dict) else {}
    code = error.get("code")
    code = code if isinstance(code, int) and not isinstance(code, bool) else None
    desc = str(error.get("desc") or body.get("message") or "").strip()
    where = f"HTTP {status}, requestId {request_id or '-'}"
    if status == 429 or any(marker in desc.lower() for marker in _RATE_LIMIT_MARKERS):
        return RateLimited(f"Polyv rate limiting: {desc or 'too many requests'} ({where})")
    if status >= 500:
        return PolyvUnavailable(f"Polyv answered HTTP {status}: {desc or 'server error'}")
    if code is None and not desc:
        return UnexpectedResponse(f"Polyv answered an error without code or desc ({where})")
    return PermanentError(
        f"Polyv refused the request: error {code}: {desc} ({where})",
        code=code,
        desc=desc,
        request_id=request_id or None,
        http_status=status,
    )


def _masked(numbers: Sequence[str]) -> str:
    shown = ", ".join(mask(str(n)) for n in numbers[:_LOGGED_NUMBERS])
    extra = len(numbers) - _LOGGED_NUMBERS
    return f"{shown}, +{extra} more" if extra > 0 else shown
