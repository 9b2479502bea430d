"""Measuring tools for the reliability scenarios: a by-name producer, a result poller, and
views of what reached the simulator and what the ledger holds, keyed by message.

Every message a scenario sends carries its message id as the value of the template parameter
``tag``, so that each request the simulator records names the message it belongs to.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import redis
from celery import Celery
from helpers import WorkerProcess, read_http_request, wait_for

from polyv_sms.dispatch import OUTCOMES
from polyv_sms.ledger import Keys, parse_record
from polyv_sms.polyv.simulator import PolyvSimulator

TAG = "tag"


def phone(i: int) -> str:
    """The i-th test number (valid, 11 digits)."""
    return f"1370000{i:04d}"


# --------------------------------------------------------------------------- producing


class Producer:
    """An application that enqueues ``polyv_sms.send_sms`` by name (it never imports our task).

    It has no result backend: results are read by :class:`Results`.
    """

    def __init__(self, broker_url: str) -> None:
        self.app = Celery("reliability-producer", broker=broker_url)
        self.app.conf.update(
            task_serializer="json",
            accept_content=["json"],
            broker_connection_retry_on_startup=True,
        )

    def send(
        self,
        numbers: list[Any],
        *,
        tag: str,
        message_id: str | None = None,
        names: list[Any] | None = None,
        values: list[Any] | None = None,
        **extra: Any,
    ) -> str:
        """Enqueue one message; returns the task id."""
        kwargs = {
            "phone_numbers": numbers,
            "template_param_names": [TAG] if names is None else names,
            "template_param_values": [tag] if values is None else values,
            **extra,
        }
        if message_id is not None:
            kwargs["message_id"] = message_id
        return str(self.app.send_task("polyv_sms.send_sms", kwargs=kwargs, queue="sms").id)

    def close(self) -> None:
        self.app.close()


class Results:
    """Reads task results straight from a Redis result backend (``celery-task-meta-<id>``)."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client

    def meta(self, task_id: str) -> dict[str, Any] | None:
        try:
            raw = self.client.get(f"celery-task-meta-{task_id}")
        except redis.ConnectionError:
            return None
        return json.loads(raw) if raw else None

    def state(self, task_id: str) -> str:
        meta = self.meta(task_id)
        return str(meta["status"]) if meta else "PENDING"

    def wait(
        self, task_ids: Iterable[str], timeout: float, interval: float = 0.1
    ) -> dict[str, dict[str, Any]]:
        """Wait until every task has a final state; return ``{task_id: meta}``."""
        ids = list(task_ids)
        done: dict[str, dict[str, Any]] = {}

        def finished() -> bool:
            for task_id in ids:
                if task_id not in done:
                    meta = self.meta(task_id)
                    if meta and meta["status"] in ("SUCCESS", "FAILURE"):
                        done[task_id] = meta
            return len(done) == len(ids)

        try:
            wait_for(finished, timeout, interval=interval, what=f"{len(ids)} task results")
        except AssertionError as exc:
            missing = {t: self.meta(t) for t in ids if t not in done}
            raise AssertionError(f"{exc}; not final: {missing}") from None
        return done

    def successes(self, task_ids: Iterable[str], timeout: float) -> dict[str, dict[str, Any]]:
        """Like :meth:`wait`, and every task must have succeeded; returns the results."""
        metas = self.wait(task_ids, timeout)
        failed = {t: m for t, m in metas.items() if m["status"] != "SUCCESS"}
        assert not failed, f"tasks failed: {failed}"
        return {t: m["result"] for t, m in metas.items()}


# --------------------------------------------------------------------------- the simulator side


@dataclass
class Seen:
    """What the simulator saw of one (message, number): one entry per request carrying it."""

    requests: list[dict[str, Any]] = field(default_factory=list)

    @property
    def statuses(self) -> list[int | None]:
        return [r["status"] for r in self.requests]

    @property
    def accepted(self) -> list[str]:
        return [r["serial_no"] for r in self.requests if r["status"] == 12]

    @property
    def accepting_requests(self) -> list[str]:
        return [r["request_id"] for r in self.requests if r["status"] == 12]


def seen_by_message(sim: PolyvSimulator) -> dict[tuple[str, str], Seen]:
    """Every request the simulator recorded, per (message tag, number), oldest first.

    A request answered with a fault or an error envelope counts with ``status`` ``None``.
    """
    seen: dict[tuple[str, str], Seen] = defaultdict(Seen)
    for record in sim.requests():
        names, values = record["template_param_names"], record["template_param_values"]
        tag = str(values[names.index(TAG)]) if TAG in names else ""
        answers = {r["phoneNumber"]: r for r in record["results"]}
        for number in record["numbers"]:
            answer = answers.get(number, {})
            seen[(tag, str(number))].requests.append(
                {
                    "request_id": record["request_id"],
                    "received_at": record["received_at"],
                    "fault": record["fault"],
                    "http_status": record["http_status"],
                    "error_code": record["error_code"],
                    "status": answer.get("status"),
                    "serial_no": answer.get("serialNo"),
                }
            )
    return dict(seen)


def check_results_match_simulator(
    results: dict[str, dict[str, Any]], sim: PolyvSimulator
) -> Counter[str]:
    """Assert that the results report exactly what reached the simulator; return the counts.

    ``results`` maps message tags to result dicts. For every number: the attempts reported
    equal the requests that carried it; the last status equals Polyv's last answer; an
    accepted number's serialNo is the one Polyv gave; a number never sent (refused by our own
    quota, invalid) never reached the simulator. And the simulator saw no message we did not
    send.
    """
    seen = seen_by_message(sim)
    counts: Counter[str] = Counter()
    expected_keys = set()
    for tag, result in results.items():
        for entry in result["results"]:
            number, outcome = entry["phone_number"], entry["outcome"]
            assert outcome in OUTCOMES
            counts[outcome] += 1
            got = seen.get((tag, number))
            if entry["status"] is None and outcome != "failed":
                assert got is None, f"{tag}/{number} reached Polyv but reports {entry}"
                continue
            expected_keys.add((tag, number))
            assert got is not None, f"{tag}/{number} reports {entry} but never reached Polyv"
            assert entry["attempts"] == len(got.requests), (tag, number, entry, got)
            if entry["status"] is not None:
                assert got.statuses[-1] == entry["status"], (tag, number, entry, got)
            if outcome == "accepted":
                assert got.accepted == [entry["serial_no"]], (tag, number, entry, got)
            else:
                assert got.accepted == [], (tag, number, entry, got)
    assert set(seen) <= expected_keys, f"unexpected requests: {set(seen) - expected_keys}"
    return counts


# --------------------------------------------------------------------------- the ledger side


def ledger_quota(client: redis.Redis, app_id: str) -> Counter[str]:
    """Every quota hash of the account, summed: per number and ``_total``."""
    total: Counter[str] = Counter()
    for key in client.scan_iter(Keys(app_id).base + "quota:*"):
        total.update({k: int(v) for k, v in client.hgetall(key).items()})
    return total


def ledger_states(client: redis.Redis, app_id: str) -> dict[tuple[str, str], Any]:
    """Every number's state in every message record of the account: {(message, number): state}."""
    keys = Keys(app_id)
    prefix = keys.message("")
    states = {}
    for key in client.scan_iter(prefix + "*"):
        message_id = key[len(prefix) :]
        for name, value in client.hgetall(key).items():
            if name.startswith("n:"):
                states[(message_id, name[2:])] = parse_record(name[2:], value)
    return states


def pending_messages(client: redis.Redis, app_id: str) -> list[str]:
    """Messages the ledger still has numbers ``reserved`` for."""
    return list(client.zrange(Keys(app_id).pending, 0, -1))


def log_lines(worker: WorkerProcess, needle: str) -> list[str]:
    return [line for line in worker.log().splitlines() if needle in line]


def elapsed(started: float) -> float:
    return round(time.monotonic() - started, 1)


def ledger_accepted_at(client: redis.Redis, app_id: str) -> dict[tuple[str, str], float]:
    """When the ledger recorded each (message, number) ``accepted`` (seconds).

    A final state is never rewritten, so the record's ``updated_ms`` is the settle that
    accepted it.
    """
    keys = Keys(app_id)
    prefix = keys.message("")
    accepted = {}
    for key in client.scan_iter(prefix + "*"):
        for name, value in client.hgetall(key).items():
            if name.startswith("n:") and value.startswith("accepted|"):
                accepted[(key[len(prefix) :], name[2:])] = int(value.split("|", 6)[5]) / 1000
    return accepted


class ReplyDroppingProxy:
    """A TCP proxy in front of a redis-server that can lose replies, like a Redis that dies
    after running a command and before answering: it forwards the command, then closes the
    client's connection instead of passing the answer on.
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.dropped = 0
        self._to_drop = 0
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def drop_next_reply(self) -> None:
        with self._lock:
            self._to_drop += 1

    def close(self) -> None:
        self.listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            pair = (client, upstream)
            threading.Thread(target=self._pump, args=(client, upstream, pair), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, pair), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, pair: tuple) -> None:
        replies = source is pair[1]
        try:
            while data := source.recv(65536):
                if replies and self._take_drop():
                    break
                sink.sendall(data)
        except OSError:
            pass
        for sock in pair:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _take_drop(self) -> bool:
        with self._lock:
            if self._to_drop:
                self._to_drop -= 1
                self.dropped += 1
                return True
            return False


class TricklingProxy:
    """An HTTP proxy in front of the simulator whose first ``trickle`` answers arrive slowly:
    the request reaches the simulator at once (Polyv processes it), and the answer's bytes are
    passed on one at a time, spread over ``duration_s`` - each read well inside any socket
    timeout, the whole answer far beyond it. Later answers pass at full speed.
    """

    def __init__(self, upstream_port: int, duration_s: float, trickle: int = 1) -> None:
        self.upstream_port = upstream_port
        self.duration_s = duration_s
        self.left = trickle
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self.cut_short = 0  # trickled answers the client stopped reading
        self.delivered = 0  # trickled answers passed on whole
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self._stopped.set()
        self.listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        from helpers import read_http_request

        with client:
            while request := read_http_request(client):
                with socket.create_connection(("127.0.0.1", self.upstream_port)) as upstream:
                    upstream.sendall(request)
                    answer = _read_http_answer(upstream)
                with self._lock:
                    slow, self.left = self.left > 0, self.left - 1
                if not slow:
                    client.sendall(answer)
                    continue
                pause = self.duration_s / max(len(answer), 1)
                try:
                    for index in range(len(answer)):
                        client.sendall(answer[index : index + 1])
                        if self._stopped.wait(pause):
                            return
                except OSError:
                    self.cut_short += 1
                    return
                self.delivered += 1


def _read_http_answer(conn: socket.socket) -> bytes:
    message = read_http_request(conn)
    if b"\r\n\r\n" not in message:
        return message  # the connection closed before the headers ended
    head, _, body = message.partition(b"\r\n\r\n")
    # One answer per connection to the simulator; the client may keep its own open.
    head = b"\r\n".join(
        line for line in head.split(b"\r\n") if not line.lower().startswith(b"connection:")
    )
    return head + b"\r\n\r\n" + body
