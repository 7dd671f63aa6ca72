"""Headless Chromium for the dashboard's tests: found on PATH, or installed with apt when the tests
run as root on a machine that has apt (Debian's `chromium` package), else the test fails saying
why. Only BILEVEL_TESTS_WITHOUT_BROWSER=1 turns that failure into a skip, for a machine where a
browser cannot be had; a test that silently skipped would prove nothing.

Each run gets a fresh profile directory, no network of its own (no component updates, sync or
background fetches) and is bounded in time; on a timeout its process group (the browser and the
helpers it spawned, started here in a session of their own) is killed by its id.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest

NAMES = ("chromium", "chromium-browser", "google-chrome")
ALLOW_SKIP_ENV = "BILEVEL_TESTS_WITHOUT_BROWSER"
INSTALL_TIMEOUT_S = 900.0
RUN_TIMEOUT_S = 120.0
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
)


def _found() -> str | None:
    for name in NAMES:
        path = shutil.which(name)
        if path is not None:
            return path
    return None


def _install() -> str:
    """apt-get install chromium, when root with apt; what happened, for the failure message."""
    if os.geteuid() != 0:
        return "not root, so it was not installed (apt-get install chromium as root)"
    if shutil.which("apt-get") is None:
        return "no apt-get here to install it with"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "chromium"]):
        try:
            done = subprocess.run(
                command, env=env, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S
            )
        except subprocess.TimeoutExpired:
            return f"{' '.join(command)} took over {INSTALL_TIMEOUT_S:.0f} s"
        if done.returncode != 0:
            return f"{' '.join(command)} failed: {done.stderr.strip()[-500:]}"
    return "apt-get install chromium ran but no chromium is on PATH"


def chromium() -> str:
    """The browser's path; installs it if it can, else fails (or skips, when allowed)."""
    path = _found()
    if path is not None:
        return path
    why = _install()
    path = _found()
    if path is not None:
        return path
    message = f"headless Chromium is needed for the dashboard tests: {why}"
    if os.environ.get(ALLOW_SKIP_ENV) == "1":
        pytest.skip(f"{message} ({ALLOW_SKIP_ENV}=1)")
    pytest.fail(f"{message}; set {ALLOW_SKIP_ENV}=1 to skip these tests instead", pytrace=False)


def _run(args: list[str], timeout_s: float) -> subprocess.CompletedProcess[str]:
    with tempfile.TemporaryDirectory(prefix="blchrome") as profile:
        proc = subprocess.Popen(
            [chromium(), *FLAGS, f"--user-data-dir={profile}", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            out, err = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            # The browser has not exited, so its process group is still the one started here.
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            pytest.fail(f"chromium did not finish within {timeout_s:.0f} s: {args}")
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def dump_dom(url: str, *, budget_ms: int = 3000) -> str:
    """The page's DOM after its scripts ran (virtual time lets its timers and fetches settle)."""
    done = _run(["--dump-dom", f"--virtual-time-budget={budget_ms}", url], RUN_TIMEOUT_S)
    if done.returncode != 0 or "<html" not in done.stdout:
        pytest.fail(f"chromium --dump-dom {url} failed ({done.returncode}): {done.stderr[-800:]}")
    return done.stdout


def screenshot(url: str, path: Path, *, size: str = "1400,1100", budget_ms: int = 3000) -> Path:
    """A PNG of the page at `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    args = [f"--screenshot={path}", f"--window-size={size}", f"--virtual-time-budget={budget_ms}"]
    done = _run([*args, url], RUN_TIMEOUT_S)
    if done.returncode != 0 or not path.is_file():
        pytest.fail(f"chromium --screenshot {url} failed ({done.returncode}): {done.stderr[-800:]}")
    return path
