"""deploy/redis.conf on a real redis-server (the project's embedded binary), started the way
deploy/service.sh starts it: port, dir and bind on the command line, the password from an include."""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from scheduler.embedded_redis import find_redis_server

CONF = Path(__file__).resolve().parents[2] / "deploy" / "redis.conf"
PASSWORD = "test-only-5f1c2b"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Server:
    port: int
    data_dir: Path
    process: subprocess.Popen[bytes]

    def client(self, password: str | None = PASSWORD) -> redis.Redis:
        return redis.Redis(port=self.port, password=password, decode_responses=True)

    def stop(self) -> None:
        if self.process.poll() is None:
            # SIGTERM: Redis flushes the AOF and exits cleanly.
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


def start(data_dir: Path, port: int) -> Server:
    secret = data_dir.parent / "redis-secret.conf"
    secret.write_text(f"requirepass {PASSWORD}\n")
    args = [
        str(find_redis_server()),
        str(CONF),
        "--port", str(port),
        "--dir", str(data_dir),
        "--bind", "127.0.0.1",
        "--include", str(secret),
        "--logfile", str(data_dir.parent / "redis.log"),
    ]  # fmt: skip
    process = subprocess.Popen(
        args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    server = Server(port, data_dir, process)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if process.poll() is not None:
            log = (data_dir.parent / "redis.log").read_text(errors="replace")
            pytest.fail(f"redis-server exited with {process.returncode}:\n{log}")
        try:
            if server.client().ping():
                return server
        except redis.ConnectionError:
            time.sleep(0.05)
    server.stop()
    pytest.fail("redis-server did not answer within 15 s")


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    srv = start(data_dir, _free_port())
    try:
        yield srv
    finally:
        srv.stop()


def test_settings_in_effect(server: Server) -> None:
    """AOF with fsync every second, noeviction, loopback bind, protected mode, the password from
    the include, the data dir from the command line."""
    with server.client() as r:
        assert r.config_get("appendonly") == {"appendonly": "yes"}
        assert r.config_get("appendfsync") == {"appendfsync": "everysec"}
        assert r.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
        assert r.config_get("protected-mode") == {"protected-mode": "yes"}
        assert r.config_get("bind")["bind"].split() == ["127.0.0.1"]
        assert r.config_get("requirepass") == {"requirepass": PASSWORD}
        assert Path(r.config_get("dir")["dir"]).resolve() == server.data_dir.resolve()
        assert r.config_get("port") == {"port": str(server.port)}
        assert r.config_get("save")["save"].split() == ["900", "1", "300", "100"]


def test_password_is_required(server: Server) -> None:
    """Without the password every command is refused."""
    with server.client(password=None) as r, pytest.raises(redis.AuthenticationError):
        r.set("k", "v")
    with server.client(password="wrong") as r, pytest.raises(redis.AuthenticationError):
        r.ping()


def test_queue_state_survives_a_restart(tmp_path: Path, server: Server) -> None:
    """Writes reach the AOF: after a clean stop and a restart on the same dir the data is back."""
    with server.client() as r:
        r.zadd("bilevel:{t}:queue:q", {"job-1": 1.0, "job-2": 2.0})
        r.hset("bilevel:{t}:job:job-1", mapping={"status": "queued"})
    server.stop()
    assert any(server.data_dir.rglob("appendonly.aof*"))
    again = start(server.data_dir, server.port)
    try:
        with again.client() as r:
            assert r.zrange("bilevel:{t}:queue:q", 0, -1) == ["job-1", "job-2"]
            assert r.hget("bilevel:{t}:job:job-1", "status") == "queued"
    finally:
        again.stop()
