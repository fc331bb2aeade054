"""A real Redis Cluster of 3 masters and 3 replicas on loopback ports, for failover tests.

:class:`RedisClusterProcs` starts six ``redis-server --cluster-enabled yes`` processes in temp
dirs on free ports (each with its cluster bus port, ``port + 10000``, free too), joins them
with ``redis-cli --cluster create ... --cluster-replicas 1 --cluster-yes`` and waits for
``cluster_state:ok``. Nodes time out after ``node_timeout_ms`` (1 s by default), so a replica
takes over a SIGKILLed master within a few seconds. Nothing here touches the shared Redis on
6379. :func:`redis_cluster` is the context manager tests use; it stops every process it
started (SIGKILL after a short grace), whatever happened.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import time
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path

from redis.crc import key_slot

from kvtest.prereq import require_program


def free_cluster_port(avoid: Collection[int] = ()) -> int:
    """A free loopback port whose cluster bus port (``port + 10000``) is free too, neither of
    them in ``avoid`` nor the bus port of one in ``avoid``. (Free only when asked: another
    process may take it before the server binds it; :meth:`RedisClusterProcs.start` moves a
    node that cannot bind to another port.)"""
    taken = {q for p in avoid for q in (p, p + 10000)}
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port + 10000 >= 65536 or port in taken or port + 10000 in taken:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port


@dataclass(frozen=True)
class ClusterNode:
    """One line of ``CLUSTER NODES``: a node's port, id, role, master id and slot ranges."""

    port: int
    node_id: str
    role: str  # "master" | "slave"
    master_id: str  # "-" for a master
    failed: bool
    slots: tuple[tuple[int, int], ...]

    def owns(self, slot: int) -> bool:
        return any(lo <= slot <= hi for lo, hi in self.slots)


class RedisClusterProcs:
    """``redis-server`` processes forming a cluster of ``masters`` masters with ``replicas``
    replicas each (3 + 3 by default; see module)."""

    def __init__(
        self, root: Path, *, masters: int = 3, replicas: int = 1, node_timeout_ms: int = 1000
    ) -> None:
        self.server = require_program("redis-server")
        self.cli = require_program("redis-cli")
        self.root = root
        self.node_timeout_ms = node_timeout_ms
        self.replicas_per_master = replicas
        self.ports: list[int] = []
        for _ in range(masters * (1 + replicas)):
            self.ports.append(free_cluster_port(self.ports))
        self.procs: dict[int, subprocess.Popen[bytes]] = {}

    # -- life cycle -------------------------------------------------------------------------
    def start(self) -> None:
        for port in self.ports:
            self._launch(port)
        for i in range(len(self.ports)):
            self.ports[i] = self._wait_serving(self.ports[i])
        r = subprocess.run(
            [
                self.cli,
                "--cluster", "create",
                *(f"127.0.0.1:{p}" for p in self.ports),
                "--cluster-replicas", str(self.replicas_per_master),
                "--cluster-yes",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )  # fmt: skip
        if r.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed:\n{r.stdout}\n{r.stderr}")
        self.wait_ok()
        # every replica attached to its master and synced (the create command returns before)
        n_replicas = len(self.ports) - len(self.ports) // (1 + self.replicas_per_master)
        self._wait("every replica attached", lambda: len(self.replicas()) == n_replicas)
        for n in self.replicas():
            self._wait(f"replica {n.port} in sync", lambda p=n.port: self.link_up(p))

    def _launch(self, port: int) -> None:
        d = self.root / str(port)
        d.mkdir(parents=True, exist_ok=True)
        self.procs[port] = subprocess.Popen(
            [
                self.server,
                "--port", str(port),
                "--bind", "127.0.0.1",
                "--cluster-enabled", "yes",
                "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", str(self.node_timeout_ms),
                "--appendonly", "no",
                "--save", "",
                "--maxmemory-policy", "noeviction",
                "--repl-diskless-sync", "yes",
                "--repl-diskless-sync-delay", "0",
                # a replica takes over however long it has been cut off (a loaded test
                # machine must not leave a slot without a master)
                "--cluster-replica-validity-factor", "0",
                "--dir", str(d),
                "--logfile", str(d / "redis.log"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip

    def _wait_serving(self, port: int) -> int:
        """The port the node launched on ``port`` serves on: ``port`` once it answers
        ``PING``, or, when its server exited (the port or its bus port was taken after it was
        chosen), a fresh port it was relaunched on; a few tries."""
        for _ in range(5):
            proc = self.procs[port]
            deadline = time.monotonic() + 30
            while proc.poll() is None and time.monotonic() < deadline:
                if self.cli_call(port, "ping") == "PONG\n":
                    return port
                time.sleep(0.1)
            if proc.poll() is None:
                raise RuntimeError(f"timed out waiting for redis-server on port {port}")
            del self.procs[port]
            port = free_cluster_port([*self.ports, *self.procs])
            self._launch(port)
        raise RuntimeError("redis-server exited on every port tried (see redis.log files)")

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    # -- inspection -------------------------------------------------------------------------
    @property
    def url(self) -> str:
        """An entry URL, on a replica: tests kill masters only, and a client built later from
        this one URL must still find the cluster after a master died. (A cluster client learns
        every node from its entry node; only building a client needs that node.)"""
        return f"redis://127.0.0.1:{self.replicas()[0].port}/0"

    def alive(self, port: int) -> bool:
        proc = self.procs.get(port)
        return proc is not None and proc.poll() is None

    def cli_call(self, port: int, *args: str) -> str:
        r = subprocess.run(
            [self.cli, "-p", str(port), *args], capture_output=True, text=True, timeout=10
        )
        return r.stdout

    def nodes(self) -> list[ClusterNode]:
        """The cluster's view from the first live node (``CLUSTER NODES``)."""
        for port in self.ports:
            if self.alive(port):
                text = self.cli_call(port, "cluster", "nodes")
                if text.strip():
                    return [_parse_node(line) for line in text.strip().splitlines()]
        raise RuntimeError("no live cluster node answers")

    def live_masters(self) -> list[ClusterNode]:
        return [n for n in self.nodes() if n.role == "master" and not n.failed and n.slots]

    def replicas(self) -> list[ClusterNode]:
        return [n for n in self.nodes() if n.role == "slave" and not n.failed]

    def master_of(self, key: str | bytes) -> ClusterNode:
        """The live master serving ``key``'s hash slot."""
        slot = key_slot(key.encode() if isinstance(key, str) else key)
        for n in self.live_masters():
            if n.owns(slot):
                return n
        raise RuntimeError(f"no live master serves slot {slot}")

    def replica_of(self, master: ClusterNode) -> ClusterNode:
        for n in self.replicas():
            if n.master_id == master.node_id:
                return n
        raise RuntimeError(f"master {master.port} has no replica")

    def role(self, port: int) -> str:
        """``master`` or ``slave`` as the node itself says (``ROLE``)."""
        return self.cli_call(port, "role").split("\n", 1)[0].strip()

    def link_up(self, port: int) -> bool:
        """Whether the replica on ``port`` has its replication link to its master up."""
        return "master_link_status:up" in self.cli_call(port, "info", "replication")

    def cluster_ok(self) -> bool:
        """Every live node reports ``cluster_state:ok``."""
        return all(
            "cluster_state:ok" in self.cli_call(p, "cluster", "info")
            for p in self.ports
            if self.alive(p)
        )

    # -- faults -----------------------------------------------------------------------------
    def kill(self, port: int) -> None:
        """SIGKILL one node (no shutdown save: it has no persistence anyway)."""
        proc = self.procs[port]
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    def wait_failover(self, dead: ClusterNode, replica: ClusterNode, limit_s: float = 60) -> None:
        """Wait until ``replica`` says it is a master, owns ``dead``'s slots, and every live
        node reports ``cluster_state:ok``."""

        def done() -> bool:
            if self.role(replica.port) != "master":
                return False
            promoted = [n for n in self.live_masters() if n.port == replica.port]
            return bool(promoted) and promoted[0].slots == dead.slots and self.cluster_ok()

        self._wait(f"replica {replica.port} to take over from master {dead.port}", done, limit_s)

    def wait_ok(self, limit_s: float = 60) -> None:
        self._wait("cluster_state:ok on every node", self.cluster_ok, limit_s)

    # -- internals --------------------------------------------------------------------------
    @staticmethod
    def _wait(what: str, cond: object, limit_s: float = 30) -> None:
        deadline = time.monotonic() + limit_s
        while not cond():  # type: ignore[operator]
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out waiting for {what}")
            time.sleep(0.1)


def _parse_node(line: str) -> ClusterNode:
    # <id> <ip:port@cport> <flags> <master> <ping-sent> <pong-recv> <epoch> <link> <slot> ...
    parts = line.split()
    port = int(parts[1].split("@", 1)[0].rsplit(":", 1)[1])
    flags = parts[2].split(",")
    role = "master" if "master" in flags else "slave"
    slots: list[tuple[int, int]] = []
    for s in parts[8:]:
        if s.startswith("["):  # a slot being migrated
            continue
        lo, _, hi = s.partition("-")
        slots.append((int(lo), int(hi or lo)))
    return ClusterNode(
        port=port,
        node_id=parts[0],
        role=role,
        master_id=parts[3],
        failed="fail" in flags,
        slots=tuple(sorted(slots)),
    )


@contextlib.contextmanager
def redis_cluster(root: Path, **kwargs: int) -> Iterator[RedisClusterProcs]:
    """``with redis_cluster(tmp_path) as rc``: a started 3+3 cluster, stopped afterwards."""
    rc = RedisClusterProcs(root, **kwargs)
    try:
        rc.start()
        yield rc
    finally:
        rc.stop()
