"""A real Redis Sentinel deployment on loopback for tests: one master, one replica (or more), three
sentinels.

Every process is the redis-server binary the tests use (scheduler.embedded_redis.find_redis_server),
on a free 127.0.0.1 port, in its own directory under one temporary root, and dies with its owner
(PR_SET_PDEATHSIG). Failover is fast (the master is judged down after `down_after_ms`), so a test
can kill -9 the master and wait for the promotion in a few seconds. `stop()` (also run at exit) ends
every process it started, by PID, and removes the root.

Importing this module starts nothing; tests/integration/conftest.py holds the fixtures.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote

import redis

from scheduler.embedded_redis import die_with_parent, find_redis_server

_START_TIMEOUT_S = 10.0
# Sentinels find each other through hello messages every 2 s, and a replica needs a full sync.
_READY_TIMEOUT_S = 30.0
_PORT_ATTEMPTS = 5
_POLL_S = 0.05


class SentinelClusterError(RuntimeError):
    """The deployment did not start, or did not reach the state waited for in time."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Node:
    """One redis-server process of the deployment (a data node or a sentinel)."""

    name: str
    port: int
    dir: Path
    process: subprocess.Popen[bytes]

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    @property
    def log(self) -> Path:
        return self.dir / "redis.log"


class SentinelCluster:
    """Master, replica and sentinels watching `master_name`. Use as a context manager, or call
    start() and stop(). `password` protects the data nodes, `sentinel_password` the sentinels."""

    def __init__(
        self,
        *,
        master_name: str = "bilevel",
        password: str | None = None,
        sentinel_password: str | None = None,
        sentinels: int = 3,
        replicas: int = 1,
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 2000,
        tls: bool = False,
        binary: Path | None = None,
    ) -> None:
        self.master_name = master_name
        self.password = password
        self.sentinel_password = sentinel_password
        self.sentinel_count = sentinels
        # More than one, so a failover leaves the new master a replica (needed by replica_acks).
        self.replica_count = replicas
        self.quorum = sentinels // 2 + 1
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        # TLS only (no plain port) between everyone, with a CA made for this deployment
        # (needs the openssl command); clients are not asked for certificates.
        self.tls = tls
        self.binary = binary or find_redis_server()
        self.root: Path | None = None
        self.data_nodes: list[Node] = []
        self.sentinels: list[Node] = []
        self.master: Node | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> SentinelCluster:
        """Start everything and wait until the replica is in sync and every sentinel agrees on
        the master, knows the replica and the other sentinels."""
        if self.root is not None:
            return self
        self.root = Path(tempfile.mkdtemp(prefix="bilevel-sentinel-"))
        atexit.register(self.stop)
        try:
            if self.tls:
                _make_certificates(self.root / "tls")
            master = self._start_data_node("master", replica_of=None)
            self.master = master
            for i in range(self.replica_count):
                replica = self._start_data_node(
                    "replica" if i == 0 else f"replica{i}", replica_of=master.port
                )
                self._wait(lambda r=replica: self._in_sync(r), "a replica to sync with the master")
            for i in range(self.sentinel_count):
                self.sentinels.append(self._start_sentinel(i, master.port))
            self._wait(lambda: self._agreed(master.port), "the sentinels to agree on the master")
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """End every process this cluster started (by PID) and remove its directories."""
        for node in [*self.sentinels, *self.data_nodes]:
            _terminate(node.process)
        self.sentinels, self.data_nodes, self.master = [], [], None
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None
        atexit.unregister(self.stop)

    def __enter__(self) -> SentinelCluster:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- addresses ---------------------------------------------------------------------------

    @property
    def sentinel_ports(self) -> list[int]:
        return [s.port for s in self.sentinels]

    def url(
        self,
        *,
        password: str | None = None,
        sentinel_password: str | None = None,
        master_name: str | None = None,
        db: int = 0,
        options: dict[str, str] | None = None,
    ) -> str:
        """The redis+sentinel:// URL of this deployment, with its own passwords unless others
        are given (to test refusals)."""
        password = self.password if password is None else password
        sentinel_password = (
            self.sentinel_password if sentinel_password is None else sentinel_password
        )
        userinfo = f":{quote(password, safe='')}@" if password else ""
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)
        query = dict(options or {})
        if sentinel_password:
            query["sentinel_password"] = sentinel_password
        if self.tls:
            query["ssl_ca_certs"] = str(self.ca_file)
        tail = "&".join(f"{k}={quote(v, safe='')}" for k, v in query.items())
        name = self.master_name if master_name is None else master_name
        scheme = "rediss+sentinel" if self.tls else "redis+sentinel"
        return f"{scheme}://{userinfo}{hosts}/{name}/{db}" + (f"?{tail}" if tail else "")

    @property
    def ca_file(self) -> Path:
        assert self.root is not None
        return self.root / "tls" / "ca.crt"

    def _tls_kwargs(self) -> dict[str, Any]:
        return {"ssl": True, "ssl_ca_certs": str(self.ca_file)} if self.tls else {}

    def data_client(self, node: Node) -> redis.Redis:
        """A plain (sync) client of one data node, for setup and inspection."""
        return redis.Redis(
            port=node.port,
            password=self.password,
            decode_responses=True,
            socket_timeout=5.0,
            **self._tls_kwargs(),
        )

    def sentinel_client(self, node: Node) -> redis.Redis:
        return redis.Redis(
            port=node.port,
            password=self.sentinel_password,
            decode_responses=True,
            socket_timeout=5.0,
            **self._tls_kwargs(),
        )

    def master_port_by_sentinels(self) -> set[int | None]:
        """The master port each live sentinel names (None where one cannot be asked)."""
        ports: set[int | None] = set()
        for sentinel in self.sentinels:
            try:
                with self.sentinel_client(sentinel) as client:
                    addr: Any = client.execute_command(
                        "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.master_name
                    )
                ports.add(int(addr[1]) if addr else None)
            except redis.RedisError:
                ports.add(None)
        return ports

    # -- faults ------------------------------------------------------------------------------

    def kill_master(self) -> tuple[Node, float]:
        """SIGKILL the current master by PID (no shutdown, no last write); returns it and the
        time.monotonic() of the kill."""
        master = self.master
        if master is None or not master.alive:
            raise SentinelClusterError("no live master to kill")
        os.kill(master.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        master.process.wait(timeout=10)
        return master, killed_at

    def log_tails(self, lines: int = 15) -> str:
        """The last lines of every node's log, for a failure message: what the sentinels and
        replicas did (a full resync, a TILT, a second election) is only written there."""
        out = []
        for node in [*self.data_nodes, *self.sentinels]:
            try:
                tail = node.log.read_text(errors="replace").splitlines()[-lines:]
            except OSError as exc:
                tail = [f"(no log: {exc})"]
            out.append(f"--- {node.name} :{node.port} ---\n" + "\n".join(tail))
        return "\n".join(out)

    def replicas(self) -> list[Node]:
        """The live data nodes other than the current master."""
        return [n for n in self.data_nodes if n is not self.master and n.alive]

    def pause(self, node: Node) -> None:
        """SIGSTOP a node: it keeps its connections but reads and answers nothing (a replica
        paused this way falls behind its master), until resume()."""
        os.kill(node.pid, signal.SIGSTOP)

    def resume(self, node: Node) -> None:
        os.kill(node.pid, signal.SIGCONT)

    def split_off_replica(self) -> Node:
        """Make the replica a master of its own and point every sentinel at it, leaving the old
        master up and writable: the split a partition or a manual failover leaves for a while,
        made permanent (no sentinel will demote the old master). Returns the new master."""
        [replica] = self.replicas()
        with self.data_client(replica) as client:
            client.execute_command("REPLICAOF", "NO", "ONE")
        m = self.master_name
        for sentinel in self.sentinels:
            with self.sentinel_client(sentinel) as client:
                client.execute_command("SENTINEL", "REMOVE", m)
                client.execute_command(
                    "SENTINEL", "MONITOR", m, "127.0.0.1", replica.port, self.quorum
                )
                settings: list[Any] = [
                    "down-after-milliseconds", self.down_after_ms,
                    "failover-timeout", self.failover_timeout_ms,
                ]  # fmt: skip
                if self.password:
                    settings += ["auth-pass", self.password]
                client.execute_command("SENTINEL", "SET", m, *settings)
        self.master = replica
        return replica

    def wait_promoted(self, old: Node, timeout_s: float = _READY_TIMEOUT_S) -> Node:
        """Wait until every sentinel names another data node as master and that node says it is
        one; returns the new master."""
        others = [n for n in self.data_nodes if n is not old and n.alive]
        if not others:
            raise SentinelClusterError("no data node left to promote")

        def promoted() -> Node | None:
            ports = self.master_port_by_sentinels()
            if len(ports) != 1:
                return None
            [port] = ports
            for node in others:
                if node.port == port and self._role(node) == "master":
                    return node
            return None

        new: Node = self._wait(promoted, "a replica to be promoted", timeout_s)
        self.master = new
        return new

    # -- internals ---------------------------------------------------------------------------

    def _node_dir(self, name: str) -> Path:
        assert self.root is not None
        path = self.root / name
        path.mkdir()
        return path

    def _listen_args(self, port: int) -> list[str]:
        if not self.tls:
            return ["--port", str(port)]
        tls = self.ca_file.parent
        return [
            "--port", "0",
            "--tls-port", str(port),
            "--tls-cert-file", str(tls / "server.crt"),
            "--tls-key-file", str(tls / "server.key"),
            "--tls-ca-cert-file", str(tls / "ca.crt"),
            # Replicas and sentinels reach the data nodes (and each other) over TLS too.
            "--tls-replication", "yes",
            "--tls-auth-clients", "no",
        ]  # fmt: skip

    def _start_data_node(self, name: str, replica_of: int | None) -> Node:
        directory = self._node_dir(name)

        def args(port: int) -> list[str]:
            out = [
                "--bind", "127.0.0.1",
                *self._listen_args(port),
                "--dir", str(directory),
                "--appendonly", "yes",
                "--save", "",
                "--daemonize", "no",
                "--protected-mode", "yes",
                "--logfile", "redis.log",
                # No 5 s wait for more replicas before a full sync starts.
                "--repl-diskless-sync-delay", "0",
            ]  # fmt: skip
            if self.password:
                out += ["--requirepass", self.password, "--masterauth", self.password]
            if replica_of is not None:
                out += ["--replicaof", "127.0.0.1", str(replica_of)]
            return out

        node = self._spawn(name, directory, args, self.password)
        self.data_nodes.append(node)
        return node

    def _start_sentinel(self, index: int, master_port: int) -> Node:
        name = f"sentinel{index}"
        directory = self._node_dir(name)
        m = self.master_name

        def args(port: int) -> list[str]:
            listen = self._listen_args(port)
            lines = [
                *(
                    f"{name[2:]} {value}"
                    for name, value in zip(listen[::2], listen[1::2], strict=True)
                ),
                "bind 127.0.0.1",
                f"dir {directory}",
                "logfile redis.log",
                "daemonize no",
                f"sentinel monitor {m} 127.0.0.1 {master_port} {self.quorum}",
                f"sentinel down-after-milliseconds {m} {self.down_after_ms}",
                f"sentinel failover-timeout {m} {self.failover_timeout_ms}",
                f"sentinel parallel-syncs {m} 1",
            ]
            if self.password:
                lines.append(f"sentinel auth-pass {m} {self.password}")
            if self.sentinel_password:
                lines += [
                    f"requirepass {self.sentinel_password}",
                    f"sentinel sentinel-pass {self.sentinel_password}",
                ]
            # A sentinel rewrites its config file as it learns the deployment: one per process.
            config = directory / "sentinel.conf"
            config.write_text("\n".join(lines) + "\n")
            return [str(config), "--sentinel"]

        return self._spawn(name, directory, args, self.sentinel_password)

    def _spawn(
        self, name: str, directory: Path, args: Callable[[int], list[str]], password: str | None
    ) -> Node:
        last_error = ""
        for _ in range(_PORT_ATTEMPTS):
            port = _free_port()
            process = subprocess.Popen(
                [str(self.binary), *args(port)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                cwd=directory,
                preexec_fn=die_with_parent,
            )
            node = Node(name, port, directory, process)
            error = _wait_ping(node, password, self._tls_kwargs())
            if error is None:
                return node
            _terminate(process)
            last_error = error
        raise SentinelClusterError(f"{name} did not start: {last_error} (see {directory})")

    def _role(self, node: Node) -> str | None:
        try:
            with self.data_client(node) as client:
                return str(client.execute_command("ROLE")[0])
        except redis.RedisError:
            return None

    def _in_sync(self, replica: Node) -> bool:
        with self.data_client(replica) as client:
            info = client.info("replication")
        return bool(
            info.get("master_link_status") == "up" and not info.get("master_sync_in_progress")
        )

    def _agreed(self, master_port: int) -> bool:
        for sentinel in self.sentinels:
            with self.sentinel_client(sentinel) as client:
                state: Any = client.execute_command("SENTINEL", "MASTER", self.master_name)
                if isinstance(state, list):
                    state = dict(zip(state[::2], state[1::2], strict=True))
                replicas: Any = client.execute_command("SENTINEL", "REPLICAS", self.master_name)
            if int(state["port"]) != master_port or state["flags"] != "master":
                return False
            if int(state["num-other-sentinels"]) != self.sentinel_count - 1:
                return False
            live = [r for r in replicas if "s_down" not in _field(r, "flags")]
            if len(live) != len(self.data_nodes) - 1:
                return False
        return True

    def _wait(self, probe: Any, what: str, timeout_s: float = _READY_TIMEOUT_S) -> Any:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                result = probe()
            except redis.RedisError:
                result = None
            if result:
                return result
            time.sleep(_POLL_S)
        logs = ", ".join(str(n.log) for n in [*self.data_nodes, *self.sentinels])
        raise SentinelClusterError(f"timed out after {timeout_s:g} s waiting for {what} ({logs})")


def _field(reply: Any, name: str) -> str:
    if isinstance(reply, dict):
        return str(reply.get(name, ""))
    pairs = dict(zip(reply[::2], reply[1::2], strict=True))
    return str(pairs.get(name, ""))


def _make_certificates(directory: Path) -> None:
    """A CA and a server certificate for 127.0.0.1 signed by it, made with openssl."""
    directory.mkdir()
    openssl = shutil.which("openssl")
    if openssl is None:
        raise SentinelClusterError("a TLS deployment needs the openssl command")
    (directory / "san.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    steps = [
        ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
         "-days", "2", "-subj", "/CN=bilevel test CA"],
        ["req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
         "-subj", "/CN=127.0.0.1"],
        ["x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
         "-CAcreateserial", "-out", "server.crt", "-days", "2", "-extfile", "san.cnf"],
    ]  # fmt: skip
    for step in steps:
        done = subprocess.run(
            [openssl, *step], cwd=directory, capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            raise SentinelClusterError(f"openssl {step[0]} failed: {done.stderr.strip()}")


def _wait_ping(node: Node, password: str | None, tls: dict[str, Any]) -> str | None:
    deadline = time.monotonic() + _START_TIMEOUT_S
    client = redis.Redis(port=node.port, password=password, socket_connect_timeout=0.5, **tls)
    try:
        while time.monotonic() < deadline:
            if node.process.poll() is not None:
                return f"exited with code {node.process.returncode}"
            try:
                if client.ping():
                    return None
            except redis.ConnectionError:
                time.sleep(0.01)
        return f"no answer on port {node.port} within {_START_TIMEOUT_S:g} s"
    finally:
        client.close()


def _terminate(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        # A paused (SIGSTOPped) node acts on SIGTERM only once it runs again.
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGCONT)
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)
