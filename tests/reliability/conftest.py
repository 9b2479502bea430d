"""Fixtures for the reliability scenarios (issue 5).

The scenarios reuse ``tests/conftest.py`` (the session's private redis-server, ``account``,
``sim``, ``start_worker``) and add private redis-servers that a test may kill and restart, and
a producer that enqueues by task name on any broker. Measuring tools live in ``tools.py``.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers import RedisServer, WorkerProcess

from .tools import Producer


@pytest.fixture
def make_redis() -> Iterator[Callable[..., RedisServer]]:
    """Start private redis-servers (AOF on by default); all are stopped after the test.

    Request this fixture before ``start_worker`` so that workers stop first.
    """
    servers: list[RedisServer] = []

    def make(*, appendonly: bool = True) -> RedisServer:
        directory = Path(tempfile.mkdtemp(prefix="polyv-sms-rel-redis-"))
        server = RedisServer(directory, appendonly=appendonly).start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop(kill=True)
        shutil.rmtree(server.directory, ignore_errors=True)


@pytest.fixture
def producer() -> Iterator[Callable[[str], Producer]]:
    """``producer(broker_url)``: an application that enqueues by task name on that broker."""
    made: list[Producer] = []

    def make(broker_url: str) -> Producer:
        made.append(Producer(broker_url))
        return made[-1]

    yield make
    for item in made:
        item.close()


class AutoRestart:
    """Restarts a worker process that exits, as supervisord's ``autorestart=true`` does.

    Celery 5.7 with kombu 5.7 can end a worker with "Unrecoverable error: AttributeError(...
    'hostname')" when its broker connection drops while it holds unacknowledged messages
    (kombu restores them through a connection Celery has already closed). The deployment runs
    workers under supervisord, which starts them again; the scenarios that cut the broker do
    the same.
    """

    def __init__(self) -> None:
        self.workers: list[WorkerProcess] = []
        self.restarts = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def watch(self, worker: WorkerProcess) -> WorkerProcess:
        self.workers.append(worker)
        return worker

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _watch(self) -> None:
        while not self._stop.wait(0.2):
            for worker in self.workers:
                if worker.process is not None and not worker.alive() and not self._stop.is_set():
                    worker._close()
                    worker.start(wait=False)
                    self.restarts += 1


@pytest.fixture
def autorestart(start_worker) -> Iterator[AutoRestart]:
    """Watch workers (``autorestart.watch(start_worker(...))``); stops before they are stopped."""
    supervisor = AutoRestart()
    yield supervisor
    supervisor.stop()
