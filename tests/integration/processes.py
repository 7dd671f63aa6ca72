"""Processes a test started, followed and stopped by PID (never by name: this machine runs other
people's Ray clusters and services)."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path


def descendants(pids: set[int]) -> set[int]:
    """`pids` and all their descendants, from /proc."""
    parent: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_bytes().rsplit(b")", 1)[1].split()
            parent[int(stat.parent.name)] = int(fields[1])
        except (OSError, IndexError, ValueError):
            continue
    keep = {p for p in pids if p in parent}
    while True:
        more = {p for p, q in parent.items() if q in keep and p not in keep}
        if not more:
            return keep
        keep |= more


def alive(pid: int) -> bool:
    """Running and not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != b"Z"


def kill_all(pids: set[int], *, grace_s: float = 10.0) -> None:
    """SIGTERM, then SIGKILL whatever is left after `grace_s`. By PID only."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in pids:
        if alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def processes_matching(text: str) -> set[int]:
    """This user's processes whose command line contains `text`."""
    uid, found = os.getuid(), set()
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if cmdline.parent.stat().st_uid != uid:
                continue
            if text.encode() in cmdline.read_bytes():
                found.add(int(cmdline.parent.name))
        except OSError:
            continue
    found.discard(os.getpid())
    return found


def started_at(pid: int) -> int | None:
    """The process's start time (clock ticks since boot), which with the PID names one process:
    a PID may be reused once its process is gone."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


class Tracked:
    """A command run in the background with its output in a file; every descendant it ever had
    is remembered (polled from /proc), so that the test can check none outlives it."""

    def __init__(self, args: list[str], *, cwd: Path, env: dict[str, str], log: Path) -> None:
        self.log = log
        self._out = log.open("wb")
        self.process = subprocess.Popen(
            args, cwd=cwd, env=env, stdout=self._out, stderr=subprocess.STDOUT
        )
        # (pid, start time) of the process and of every descendant seen.
        self.seen: set[tuple[int, int | None]] = {(self.process.pid, started_at(self.process.pid))}
        self._done = threading.Event()
        self._poller = threading.Thread(target=self._poll, daemon=True)
        self._poller.start()

    def _poll(self) -> None:
        while not self._done.is_set():
            self.seen |= {(p, started_at(p)) for p in descendants({self.process.pid})}
            if self.process.poll() is not None:
                return
            self._done.wait(0.2)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, pattern: str, *, timeout_s: float) -> re.Match[str]:
        """The first match of `pattern` in the output; fails (with the output) if the process
        exits first or `timeout_s` passes."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            match = re.search(pattern, self.output())
            if match:
                return match
            assert self.process.poll() is None, f"exited early:\n{self.output()[-6000:]}"
            time.sleep(0.2)
        raise AssertionError(f"no {pattern!r} within {timeout_s} s:\n{self.output()[-6000:]}")

    def wait(self, *, timeout_s: float) -> int:
        """Wait for the process to exit; its return code."""
        try:
            code = self.process.wait(timeout=timeout_s)
        finally:
            self._done.set()
            self._poller.join(timeout=5)
            self._out.close()
        return code

    def stop(self, *, timeout_s: float = 90.0) -> int:
        """SIGTERM by PID (what Ctrl-C or service.sh stop sends) and wait."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.wait(timeout_s=timeout_s)

    def _running(self) -> set[int]:
        return {p for p, t in self.seen if alive(p) and started_at(p) == t}

    def leftovers(self, *, within_s: float = 30.0) -> set[int]:
        """Descendants still running `within_s` after the process exited; killed (by PID), and
        returned so that the test fails naming them."""
        deadline = time.monotonic() + within_s
        while self._running() and time.monotonic() < deadline:
            time.sleep(0.2)
        left = self._running()
        kill_all(left)
        return left
