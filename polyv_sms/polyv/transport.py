"""A wall-clock deadline on one HTTP exchange made through requests' public API.

requests bounds each socket operation (``timeout``), never a whole exchange: an answer whose
bytes trickle in, each inside the timeout, keeps a sender busy for as long as the server likes.
:class:`Exchange` is that missing bound. While it is open in a thread, the requests that thread
makes through a :class:`DeadlineAdapter` are watched: when the deadline passes, the watchdog
shuts the connection's socket down, which wakes whatever read or write is blocked on it (TLS
handshake, request, status line, headers or body) with an error at once; urllib3 then discards
the connection instead of returning it to the pool.

The adapter is requests' own ``HTTPAdapter`` whose urllib3 connections report, to the open
exchange of the thread using them, which connection it is on and whether a byte of the request
itself was handed to the socket (:attr:`Exchange.sent`); a proxy's ``CONNECT`` does not count.
That is what tells "provably never sent" from "Polyv may have it", whatever the error's type.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import os
import socket
import threading
import time
from typing import Any

import urllib3
import urllib3.connection
import urllib3.poolmanager
from requests.adapters import HTTPAdapter

__all__ = ["DeadlineAdapter", "Exchange"]

#: After its deadline, an exchange whose socket did not exist yet (a connect in progress) is
#: looked at again this often until it ends.
_RECHECK_S = 0.05

_local = threading.local()


class Exchange:
    """One exchange's deadline, and what its connection has done so far.

    Use it as a context manager around the requests of one exchange (connect retries
    included), in the thread that makes them.

    Args:
        deadline_s: seconds from now after which the exchange's connection is shut down.

    Attributes:
        deadline: the :func:`time.monotonic` time of the deadline.
        sent: a byte of a request was handed to a socket (Polyv may have it).
        expired: the deadline passed while the exchange was open.
    """

    __slots__ = ("_requesting", "conn", "deadline", "done", "expired", "sent")

    def __init__(self, deadline_s: float) -> None:
        self.deadline = time.monotonic() + deadline_s
        self.sent = False
        self.expired = False
        self.done = False
        self._requesting = False
        self.conn: urllib3.connection.HTTPConnection | None = None

    def remaining(self) -> float:
        """Seconds left before the deadline (negative once it has passed)."""
        return self.deadline - time.monotonic()

    def __enter__(self) -> Exchange:
        _local.exchange = self
        _watchdog.watch(self)
        return self

    def __exit__(self, *exc_info: object) -> None:
        _local.exchange = None
        with _watchdog.lock:
            self.done = True
            self.conn = None  # the watchdog's heap keeps the exchange a while: not the conn

    def _expire(self) -> bool:
        """Shut the connection down (the watchdog's lock is held); False once it has ended."""
        if self.done:
            return False
        self.expired = True
        conn = self.conn
        # Only while the connection is still this exchange's: once released to the pool and
        # taken by another sender, it is not ours to break.
        sock = conn.sock if conn is not None and _owner(conn) is self else None
        if sock is not None:
            # socket.socket's own shutdown, also under a TLS socket (whose shutdown would drop
            # its TLS state under the reading thread's feet): it wakes the blocked call.
            with contextlib.suppress(OSError):  # already closed, or never connected
                socket.socket.shutdown(sock, socket.SHUT_RDWR)
        return True


class _Watchdog:
    """One thread that expires open exchanges at their deadlines.

    A timer thread per request would cost more CPU than the rest of a send; this one sleeps
    until the earliest deadline and, as exchanges nearly always end long before theirs,
    wakes about once per deadline period. Recreated in a forked child (the thread is not).
    """

    def __init__(self) -> None:
        self.lock = threading.Condition(threading.Lock())
        self._heap: list[tuple[float, int, Exchange]] = []
        self._order = itertools.count()
        self._thread: threading.Thread | None = None
        self._wake_at = float("inf")  # when the thread will look next, on its own

    def watch(self, exchange: Exchange) -> None:
        with self.lock:
            heap = self._heap
            while heap and heap[0][2].done:  # ended exchanges leave as they reach the front
                heapq.heappop(heap)
            heapq.heappush(heap, (exchange.deadline, next(self._order), exchange))
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="polyv-deadline", daemon=True
                )
                self._thread.start()
            elif exchange.deadline < self._wake_at:  # rare: deadlines come in order
                self.lock.notify()

    def _run(self) -> None:
        with self.lock:
            heap = self._heap
            while True:
                now = time.monotonic()
                while heap and (heap[0][2].done or heap[0][0] <= now):
                    _, _, exchange = heapq.heappop(heap)
                    if exchange._expire():  # still open: look again until it ends
                        heapq.heappush(heap, (now + _RECHECK_S, next(self._order), exchange))
                self._wake_at = heap[0][0] if heap else float("inf")
                self.lock.wait(self._wake_at - now if heap else None)


_watchdog = _Watchdog()


def _after_fork() -> None:
    global _watchdog  # noqa: PLW0603 - the parent's thread and lock do not exist here
    _watchdog = _Watchdog()


os.register_at_fork(after_in_child=_after_fork)


def _owner(conn: urllib3.connection.HTTPConnection) -> Exchange | None:
    return getattr(conn, "_polyv_exchange", None)


def _claim(conn: urllib3.connection.HTTPConnection) -> Exchange | None:
    """The connection now serves the calling thread's open exchange (if any)."""
    exchange: Exchange | None = getattr(_local, "exchange", None)
    if _owner(conn) is not exchange:
        with _watchdog.lock:
            conn._polyv_exchange = exchange  # type: ignore[attr-defined]
            if exchange is not None:
                exchange.conn = conn
    return exchange


class _WatchedConnection(urllib3.connection.HTTPConnection):
    """An HTTP connection that tells the thread's open exchange what it is doing."""

    @property
    def is_connected(self) -> bool:  # the pool asks this first when it hands a kept one out
        _claim(self)
        return super().is_connected

    def connect(self) -> None:
        _claim(self)
        super().connect()

    def request(self, *args: Any, **kwargs: Any) -> None:
        exchange = _claim(self)
        if exchange is None:
            super().request(*args, **kwargs)
            return
        exchange._requesting = True
        try:
            super().request(*args, **kwargs)
        finally:
            exchange._requesting = False

    def send(self, data: Any) -> None:
        exchange: Exchange | None = getattr(_local, "exchange", None)
        if exchange is not None and exchange._requesting:
            if self.sock is None:  # http.client connects on the first send: not a byte sent yet
                self.connect()
            exchange.sent = True
        super().send(data)


class _WatchedHTTPSConnection(_WatchedConnection, urllib3.connection.HTTPSConnection):
    pass


class _WatchedPool(urllib3.HTTPConnectionPool):
    ConnectionCls = _WatchedConnection


class _WatchedHTTPSPool(urllib3.HTTPSConnectionPool):
    ConnectionCls = _WatchedHTTPSConnection


_POOLS = {"http": _WatchedPool, "https": _WatchedHTTPSPool}


class DeadlineAdapter(HTTPAdapter):
    """requests' ``HTTPAdapter`` whose connections an open :class:`Exchange` can watch.

    Outside an exchange it behaves exactly like ``HTTPAdapter``. SOCKS proxies keep urllib3's
    own connections (not watched: only the per-read timeout applies there).
    """

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = _POOLS

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> urllib3.ProxyManager:
        manager: urllib3.ProxyManager = super().proxy_manager_for(proxy, **proxy_kwargs)
        if manager.pool_classes_by_scheme is urllib3.poolmanager.pool_classes_by_scheme:
            manager.pool_classes_by_scheme = _POOLS
        return manager
