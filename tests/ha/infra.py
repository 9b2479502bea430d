"""Real HA set-ups started by the tests: a 3-master Redis Cluster, a Sentinel set, a RabbitMQ
vhost of the test's own. Everything on 127.0.0.1, on free ports, in temporary directories."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import redis
from helpers import REDIS_SERVER, free_port, wait_for

REDIS_CLI = shutil.which("redis-cli") or "redis-cli"
RABBITMQCTL = shutil.which("rabbitmqctl") or "rabbitmqctl"


class Node:
    """One redis-server process with extra arguments (cluster node, replica, sentinel)."""

    def __init__(
        self, directory: Path, *args: str, port: int | None = None, password: str | None = None
    ) -> None:
        self.port = port or free_port()
        self.password = password
        self.directory = directory / str(self.port)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.args = args
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, *head: str) -> Node:
        self.process = subprocess.Popen(
            [
                REDIS_SERVER,
                *head,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--dir",
                str(self.directory),
                "--logfile",
                str(self.directory / "redis.log"),
                *self.args,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

        def pong() -> bool:
            with contextlib.suppress(redis.RedisError), self.client() as probe:
                return bool(probe.ping())
            return False

        wait_for(pong, 15, what=f"redis-server on port {self.port}")
        return self

    def client(self) -> redis.Redis:
        return redis.Redis(
            port=self.port, password=self.password, decode_responses=True, socket_timeout=5
        )

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(10)
            self.process = None


class Cluster:
    """Three masters, no replicas, slots spread by ``redis-cli --cluster create``."""

    def __init__(self, directory: Path) -> None:
        # cluster-port: the bus port, by default port + 10000, which a free port may not have
        self.nodes = [
            Node(
                directory,
                "--cluster-enabled",
                "yes",
                "--cluster-node-timeout",
                "5000",
                "--cluster-port",
                str(free_port()),
            )
            for _ in range(3)
        ]

    def start(self) -> Cluster:
        for node in self.nodes:
            node.start()
        subprocess.run(
            [
                REDIS_CLI,
                "--cluster",
                "create",
                *(f"127.0.0.1:{node.port}" for node in self.nodes),
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )

        def ok() -> bool:
            for node in self.nodes:
                with node.client() as client:
                    if client.cluster("info")["cluster_state"] != "ok":
                        return False
            return True

        wait_for(ok, 30, interval=0.2, what="the cluster to be ok")
        return self

    def node_id(self, node: Node) -> str:
        with node.client() as client:
            return str(client.cluster("myid"))

    def owner(self, slot: int) -> Node:
        with self.nodes[0].client() as client:
            for start, end, master, *_ in client.cluster("slots"):
                if start <= slot <= end:
                    return next(n for n in self.nodes if n.port == int(master[1]))
        raise AssertionError(f"slot {slot} is not served")

    def move_slot(self, slot: int, target: Node, pause_s: float = 0.02) -> int:
        """Reshard one slot to ``target`` the way ``redis-cli --cluster reshard`` does:
        IMPORTING/MIGRATING, MIGRATE key by key (clients get ASK meanwhile), then NODE.

        Returns:
            The keys moved.
        """
        source = self.owner(slot)
        assert source is not target
        source_id, target_id = self.node_id(source), self.node_id(target)
        moved = 0
        with source.client() as src, target.client() as dst:
            dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
            src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
            while keys := src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 1):
                src.execute_command(
                    "MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "REPLACE", "KEYS", *keys
                )
                moved += len(keys)
                time.sleep(pause_s)  # a slow migration: the workers meet ASK redirections
            for node in self.nodes:
                with node.client() as client:
                    client.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
        return moved

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


class SentinelSet:
    """A master, a replica and one sentinel watching them (quorum 1)."""

    MASTER_NAME = "polyvmaster"

    def __init__(self, directory: Path) -> None:
        # no 5 s wait before the initial (diskless) sync: the replica is ready sooner
        self.master = Node(directory, "--repl-diskless-sync-delay", "0")
        self.replica = Node(directory)
        self.sentinel = Node(directory)
        self.directory = directory

    def start(self) -> SentinelSet:
        self.master.start()
        self.replica.args = (
            "--replicaof",
            "127.0.0.1",
            str(self.master.port),
            "--repl-diskless-sync-delay",
            "0",
        )
        self.replica.start()

        def synced() -> bool:
            with self.replica.client() as client:
                return client.info("replication")["master_link_status"] == "up"

        # Promoting a replica that has not synced yet would lose everything: wait for it.
        wait_for(synced, 30, 0.05, "the replica to sync")
        conf = self.sentinel.directory / "sentinel.conf"
        name = self.MASTER_NAME
        conf.write_text(
            f"sentinel monitor {name} 127.0.0.1 {self.master.port} 1\n"
            f"sentinel down-after-milliseconds {name} 2000\n"
            f"sentinel failover-timeout {name} 10000\n"
            f"sentinel parallel-syncs {name} 1\n"
        )
        self.sentinel.start(str(conf), "--sentinel")

        def watching() -> bool:
            with self.sentinel.client() as client:
                replicas = client.sentinel_slaves(name)
                return any(r.get("flags") == "slave" for r in replicas)

        wait_for(watching, 30, interval=0.2, what="the sentinel to see the replica")
        return self

    def url(self, db: int) -> str:
        return f"sentinel://127.0.0.1:{self.sentinel.port}/{self.MASTER_NAME}/{db}"

    def master_port(self) -> int:
        """The master as ``SENTINEL MASTERS`` names it: what redis-py and kombu ask. (During a
        failover ``GET-MASTER-ADDR-BY-NAME`` names the promoted replica earlier.)"""
        with self.sentinel.client() as client:
            return int(client.sentinel_masters()[self.MASTER_NAME]["port"])

    def failover(self) -> int:
        """A planned switchover with ``SENTINEL FAILOVER``, as operations.md describes it:

        1. ``CLIENT PAUSE <ms> WRITE`` on the master: writes wait; then wait until the
           replica's offset reaches the master's, so it has every acknowledged write when it
           is promoted (asynchronous replication loses nothing);
        2. ``SENTINEL FAILOVER``; wait until ``SENTINEL MASTERS`` names the replica (the
           ``+switch-master`` event);
        3. ``REPLICAOF <new master>`` on the old master, then ``CLIENT UNPAUSE``: the paused
           writes are refused (``READONLY``, never applied), and redis-py and kombu ask Sentinel
           again and find the new master. (Sentinel itself demotes the old master only some
           seconds later; until then clients still connected to it would write where
           replication throws it away.)

        Returns:
            The new master's port.
        """
        before = self.master_port()
        old = next(n for n in (self.master, self.replica) if n.port == before)
        with old.client() as client:
            client.execute_command("CLIENT", "PAUSE", 30000, "WRITE")
            new = self.replica if old is self.master else self.master

            def caught_up() -> bool:
                offset = int(client.info("replication")["master_repl_offset"])
                with new.client() as replica:
                    return int(replica.info("replication")["slave_repl_offset"]) >= offset

            wait_for(caught_up, 10, 0.02, "the replica to catch up")
            with self.sentinel.client() as sentinel:
                sentinel.execute_command("SENTINEL", "FAILOVER", self.MASTER_NAME)
            wait_for(lambda: self.master_port() != before, 30, 0.05, "the failover")
            client.execute_command("REPLICAOF", "127.0.0.1", self.master_port())
            client.execute_command("CLIENT", "UNPAUSE")
        return self.master_port()

    def stop(self) -> None:
        for node in (self.sentinel, self.replica, self.master):
            node.stop()


def rabbitmq_available() -> bool:
    try:
        result = subprocess.run(
            [RABBITMQCTL, "status"], capture_output=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0


class Vhost:
    """A RabbitMQ vhost of the test's own (guest/guest), deleted afterwards."""

    def __init__(self) -> None:
        self.name = f"polyv-sms-test-{uuid.uuid4().hex[:10]}"

    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:5672/{self.name}"

    def _ctl(self, *args: str) -> str:
        done = subprocess.run(
            [RABBITMQCTL, *args], capture_output=True, text=True, timeout=60, check=True
        )
        return done.stdout

    def quorum_queues_enabled(self) -> bool:
        """Whether the node's ``quorum_queue`` feature flag is on (enabling it if it is off:
        a flag is node-wide, and enabling one is what an upgraded RabbitMQ asks for anyway)."""
        flags = self._ctl("list_feature_flags", "--quiet", "--no-table-headers")
        state = dict(line.split("\t")[:2] for line in flags.splitlines() if "\t" in line)
        if state.get("quorum_queue") == "enabled":
            return True
        if "quorum_queue" not in state:
            return False  # RabbitMQ before 3.8: no quorum queues at all
        with contextlib.suppress(subprocess.SubprocessError):
            self._ctl("enable_feature_flag", "quorum_queue")
            return True
        return False

    def create(self) -> Vhost:
        self._ctl("add_vhost", self.name)
        self._ctl("set_permissions", "-p", self.name, "guest", ".*", ".*", ".*")
        return self

    def queues(self) -> dict[str, str]:
        """Queue name -> type."""
        out = self._ctl(
            "list_queues", "-p", self.name, "name", "type", "--quiet", "--no-table-headers"
        )
        return dict(line.split("\t")[:2] for line in out.splitlines() if "\t" in line)

    def close_connections(self) -> None:
        self._ctl("close_all_connections", "--vhost", self.name, "test: a broker node went away")

    def delete(self) -> None:
        with contextlib.suppress(subprocess.SubprocessError):
            self._ctl("delete_vhost", self.name)
