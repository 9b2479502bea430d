"""The ledger's Redis client: one Redis, a Redis Cluster or a Redis behind Sentinel.

:func:`connect_redis` takes ``SMS_REDIS_URL`` and returns the client redis-py made for it:

- ``redis://host:port/0`` of a plain Redis: :class:`redis.Redis`;
- ``redis://host:port/0`` of any node of a Redis Cluster (found out with ``INFO cluster``):
  :class:`redis.cluster.RedisCluster`, which learns the slot map from that node and follows
  ``MOVED``/``ASK`` redirections while slots move (a reshard). Every ledger key of an account
  carries the hash tag ``{appId}``, so each Lua script and each pipeline touches one slot;
- ``sentinel://[:password@]host:port[,host:port...]/MASTER_NAME[/DB]``: the master that
  :class:`redis.sentinel.Sentinel` names, asked again after a failover.

No cluster or failover logic lives here: redis-py does it.
"""

from __future__ import annotations

import errno
import logging
import socket
import struct
import sys
import time
from typing import Any, ClassVar, TypeAlias

import redis
from redis.backoff import ExponentialBackoff
from redis.cluster import RedisCluster
from redis.retry import Retry
from redis.sentinel import Sentinel

from polyv_sms.config import parse_sentinel_url
from polyv_sms.errors import ConfigError, LedgerUnavailable

__all__ = [
    "DEFAULT_REDIS_CONNECT_TIMEOUT_S",
    "DEFAULT_REDIS_SOCKET_TIMEOUT_S",
    "KernelTimeoutConnection",
    "LedgerClient",
    "connect_redis",
    "is_cluster_node",
]

log = logging.getLogger("polyv_sms.ledger")

DEFAULT_REDIS_SOCKET_TIMEOUT_S = 5.0
DEFAULT_REDIS_CONNECT_TIMEOUT_S = 5.0
#: Finding out whether ``SMS_REDIS_URL`` is a cluster node waits this long for it by default.
DEFAULT_DETECT_WAIT_S = 30.0
_DETECT_PAUSE_S = 0.5

#: Linux's ``SO_MEMINFO`` (``<asm-generic/socket.h>``): nine counters, the first the bytes
#: allocated to the receive queue (0: nothing to read); and ``TCP_INFO``'s first byte, the
#: TCP state, whose value 1 is ``TCP_ESTABLISHED``.
_SO_MEMINFO = 55
_MEMINFO_SIZE = 9 * 4
_TCP_ESTABLISHED = 1
_SOCKOPT_CHECK = sys.platform.startswith("linux") and hasattr(socket, "TCP_INFO")
#: What ``getsockopt`` fails with where the kernel (or a sandbox, an emulator, a seccomp filter)
#: does not offer an option: the check then falls back to redis-py's ``poll()``, for good.
_UNSUPPORTED_ERRNOS = frozenset(
    {errno.ENOPROTOOPT, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS, errno.EPERM}
)

#: What :func:`connect_redis` returns; both have the commands the ledger uses.
LedgerClient: TypeAlias = redis.Redis | RedisCluster


def _options(socket_timeout: float, connect_timeout: float) -> dict[str, Any]:
    return {
        "decode_responses": True,
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": connect_timeout,
        "health_check_interval": 30,
    }


class KernelTimeoutConnection(redis.Connection):
    """redis-py's TCP connection whose waits are bounded by the kernel, not by Python.

    A Python socket with a timeout runs ``poll()`` before every send and every receive, and
    each of those system calls releases and takes back the GIL: with a worker's threads all
    busy, every one is a hand-off between threads (futex calls, context switches). Measured on
    the 1-number path, that was about 4 of the worker's GIL-releasing calls per message. This
    connection keeps its socket in blocking mode and sets ``SO_RCVTIMEO``/``SO_SNDTIMEO`` to
    ``socket_timeout`` instead: a send or a receive that waits longer fails with ``EAGAIN``,
    which redis-py reports as a ``ConnectionError`` (and drops the connection), the same
    outage to the ledger as a ``TimeoutError``. Connecting keeps Python's connect timeout.

    Args:
        kernel_timeout: the bound, in seconds, of one send or receive (``socket_timeout``).
    """

    #: Set when the kernel refused the options of :meth:`can_read`'s check (for the process).
    _sockopt_refused: ClassVar[bool] = False

    def __init__(self, *args: Any, kernel_timeout: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]
        self.kernel_timeout = kernel_timeout

    def _connect(self) -> socket.socket:
        sock: socket.socket = super()._connect()  # type: ignore[no-untyped-call]
        seconds = int(self.kernel_timeout)
        value = struct.pack("@ll", seconds, int((self.kernel_timeout - seconds) * 1_000_000))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, value)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, value)
        sock.settimeout(None)
        return sock

    def can_read(self, timeout: float = 0) -> bool:
        """``False`` for a connection ready to send a command on; a connection error for one
        that is not: its peer closed or reset it, or it holds a reply nobody read.

        redis-py's pool asks this of every connection it hands out and, on a connection
        error, reconnects it. Its own check is a ``poll()``: a system call that releases the
        GIL, and so a hand-off between a worker's busy threads, once per command; and with
        its maintenance notifications on (redis-py 8's default), it looks only at a closed
        peer, not at a reply left unread (a caller interrupted between sending and reading),
        which the next command would take for its own. Here both are looked at with
        ``getsockopt``, which keeps the GIL: the TCP state (``TCP_INFO``: anything but
        ``ESTABLISHED``) and bytes waiting to be read (``SO_MEMINFO``, besides what the parser
        holds). With a parser of another kind (no hiredis), off Linux, or where the kernel
        refuses those options: redis-py's own check, and data it finds waiting is refused the
        same way (redis-py would hand the connection out). Asked with a timeout (to wait for
        data): redis-py's own answer.

        Raises:
            redis.ConnectionError: the connection must not be used (the pool reconnects it).
        """
        if timeout != 0:
            return bool(super().can_read(timeout))
        sock = self._sock
        reader = getattr(self._parser, "_reader", None)
        check = _SOCKOPT_CHECK and not KernelTimeoutConnection._sockopt_refused
        if sock is not None and check and hasattr(reader, "has_data"):
            try:
                state = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]
                queued = sock.getsockopt(socket.SOL_SOCKET, _SO_MEMINFO, _MEMINFO_SIZE)
            except OSError as exc:
                if exc.errno not in _UNSUPPORTED_ERRNOS:
                    raise redis.ConnectionError(f"ledger connection broken: {exc}") from exc
                # Not a broken connection: a kernel without the option. Every connection
                # would fail the check, and every command with it.
                KernelTimeoutConnection._sockopt_refused = True
                log.info("ledger connections: getsockopt check unavailable (%s); using poll()", exc)
            else:
                if state != _TCP_ESTABLISHED:
                    raise redis.ConnectionError("the ledger Redis closed the connection")
                if reader.has_data() or struct.unpack_from("I", queued)[0] > 0:
                    raise redis.ConnectionError("a reply nobody read is waiting on the connection")
                return False
        if super().can_read(0):
            raise redis.ConnectionError("a reply nobody read is waiting on the connection")
        return False


def _plain_options(url: str, options: dict[str, Any]) -> dict[str, Any]:
    """The options of a plain ``redis://`` client: kernel-bounded waits where they apply (TCP
    on Linux and the BSDs; not TLS, whose reads must not see ``EAGAIN``, nor Unix sockets)."""
    timeout = options["socket_timeout"]
    if not url.startswith("redis://") or sys.platform == "win32" or not timeout:
        return options
    return options | {
        "socket_timeout": None,
        "kernel_timeout": timeout,
        "connection_class": KernelTimeoutConnection,
    }


def is_cluster_node(client: redis.Redis) -> bool:
    """Whether the Redis ``client`` talks to runs in cluster mode (``INFO cluster``).

    Raises:
        redis.RedisError: Redis could not be asked (unreachable, authentication).
    """
    info = client.info("cluster")
    return bool(int(info.get("cluster_enabled", 0) or 0))


def connect_redis(
    url: str,
    *,
    socket_timeout: float = DEFAULT_REDIS_SOCKET_TIMEOUT_S,
    connect_timeout: float = DEFAULT_REDIS_CONNECT_TIMEOUT_S,
    wait_s: float = DEFAULT_DETECT_WAIT_S,
    variable: str = "SMS_REDIS_URL",
) -> LedgerClient:
    """A client for the ledger's Redis at ``url``, with explicit timeouts.

    A ``redis://`` URL is asked once whether it is a cluster node (waiting up to ``wait_s``
    while it is unreachable); a ``sentinel://`` URL connects lazily, on the first command.

    Args:
        url: ``SMS_REDIS_URL``.
        socket_timeout: seconds a command may wait for its answer.
        connect_timeout: seconds a connection may take.
        wait_s: how long to wait for an unreachable ``redis://`` Redis to answer the cluster
            question; 0 asks once.
        variable: the setting ``url`` came from, for error messages.

    Raises:
        LedgerUnavailable: a ``redis://`` Redis stayed unreachable for ``wait_s``.
        ConfigError: a cluster URL names a database other than 0, or the URL is malformed.
        redis.AuthenticationError: the password is wrong or missing.
    """
    options = _options(socket_timeout, connect_timeout)
    if url.startswith("sentinel:"):
        return _sentinel_master(url, options, variable)
    plain: redis.Redis = redis.Redis.from_url(
        url,
        **_plain_options(url, options),
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 2),
    )
    if url.startswith("unix:") or not _ask_cluster(plain, url, wait_s):
        return plain
    db = plain.connection_pool.connection_kwargs.get("db", 0)
    plain.close()
    if db:
        raise ConfigError(f"{variable}: a Redis Cluster has database 0 only, not {db}")
    log.info("ledger Redis is a cluster node: using a cluster client")
    cluster: RedisCluster = RedisCluster.from_url(url, **options)
    return cluster


def _ask_cluster(client: redis.Redis, url: str, wait_s: float) -> bool:
    started = time.monotonic()
    while True:
        try:
            return is_cluster_node(client)
        except (redis.AuthenticationError, redis.exceptions.AuthorizationError):
            raise  # (ConnectionErrors to redis-py, but waiting will not fix a password)
        except redis.ResponseError as exc:
            if "not allowed in cluster mode" in str(exc):
                return True  # SELECT of a database other than 0, on a cluster node
            unknown = str(exc).startswith("unknown command")
            if not (unknown or isinstance(exc, redis.exceptions.NoPermissionError)):
                raise
            # An ACL user without INFO, or a Redis-compatible server without it (a proxy,
            # fakeredis): take it for a plain Redis. (On a cluster node, the first MOVED then
            # fails the message loudly, naming SMS_REDIS_URL.)
            say = log.debug if unknown else log.warning
            say("SMS_REDIS_URL: INFO cluster refused (%s); assuming a plain Redis", exc)
            return False
        except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError) as exc:
            if time.monotonic() - started >= wait_s:
                raise LedgerUnavailable(f"ledger Redis unavailable: {type(exc).__name__}") from exc
            time.sleep(_DETECT_PAUSE_S)


def _sentinel_master(url: str, options: dict[str, Any], variable: str) -> redis.Redis:
    parsed = parse_sentinel_url(url, variable)
    sentinel = Sentinel(  # type: ignore[no-untyped-call]
        list(parsed.sentinels),
        socket_timeout=options["socket_timeout"],
        socket_connect_timeout=options["socket_connect_timeout"],
    )
    # The master's pool asks the sentinels again when its master stops answering or turns
    # read-only (a failover); the ledger's outage budget rides out the switch.
    master: redis.Redis = sentinel.master_for(  # type: ignore[no-untyped-call]
        parsed.master_name,
        db=parsed.db,
        username=parsed.username,
        password=parsed.password,
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 2),
        **options,
    )
    return master
