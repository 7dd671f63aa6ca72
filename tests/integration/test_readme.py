"""Every code block of README.md, run as written and in order, the way a user would: `serve` blocks
start the service in the background (its own embedded Redis and local Ray) and the blocks after
them talk to it through the variables it printed; files the README asks to save are saved."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO_ROOT
from tests.integration.processes import Tracked, processes_matching

README = REPO_ROOT / "README.md"
VENV_BIN = Path(sys.executable).parent
# A marker on the line before a block: `serve` (start in the background), `file NAME` (save the
# block as NAME), `skip: REASON` (not run, with the reason on the page).
BLOCK = re.compile(
    r"(?:<!-- readme-test: (?P<marker>[^\n]*?) -->\n)?^```(?P<lang>[a-z]*)\n(?P<body>.*?)^```$",
    re.S | re.M,
)
# What a skipped block may be: nothing else is left out.
SKIPS_ALLOWED = {"make demo   #", "make test   #"}
SERVE_ADDRESS = re.compile(r"BILEVEL_REDIS_URL=(\S+) BILEVEL_NAMESPACE=(\S+)")


@dataclass(frozen=True)
class Block:
    line: int
    lang: str
    marker: str
    body: str

    @property
    def where(self) -> str:
        return f"README.md line {self.line} ({self.lang} block)"


def readme_blocks() -> list[Block]:
    text = README.read_text(encoding="utf-8")
    return [
        Block(
            line=text.count("\n", 0, m.start("body")),
            lang=m.group("lang"),
            marker=(m.group("marker") or "").strip(),
            body=m.group("body"),
        )
        for m in BLOCK.finditer(text)
    ]


def test_every_block_is_runnable_or_says_why_not() -> None:
    """Each block is sh, python or yaml, and a skip gives its reason and covers only the two
    commands that cannot run inside the suite (the suite itself, and the install + demo)."""
    blocks = readme_blocks()
    assert blocks, "no code blocks found in README.md"
    for block in blocks:
        assert block.lang in {"sh", "python", "yaml"}, f"{block.where}: say the language"
        if block.marker.startswith("skip"):
            assert block.marker.startswith("skip: "), block.where
            assert len(block.marker) > 10, f"{block.where}: give the reason"
            lines = {ln[:13] for ln in block.body.splitlines() if ln.strip()}
            assert lines <= SKIPS_ALLOWED, f"{block.where}: only make demo/test may be skipped"
        else:
            assert block.marker in {"", "serve"} or block.marker.startswith("file "), block.where


class ReadmeSession:
    """Runs the blocks in order: a checkout-like directory for commands that name shipped files,
    and a directory of the user's own for the files the README has them save."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.checkout = tmp_path / "checkout"
        self.checkout.mkdir()
        for name in ("deploy", "policies", "docs"):
            (self.checkout / name).symlink_to(REPO_ROOT / name)
        self.own = tmp_path / "own"
        self.own.mkdir()
        self.saved: list[str] = []
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("BILEVEL_", "RAY_"))}
        self.env |= {
            "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "PYTHONPATH": str(REPO_ROOT),
            "RAY_USAGE_STATS_ENABLED": "0",
            "COLUMNS": "100",
        }
        self.service: Tracked | None = None
        self.services = 0

    def cwd_for(self, block: Block) -> Path:
        """The user's directory for a block that names a file they saved, else the checkout."""
        return self.own if any(name in block.body for name in self.saved) else self.checkout

    def run(self, block: Block) -> None:
        if block.marker.startswith("skip"):
            return
        if block.marker.startswith("file "):
            name = block.marker.removeprefix("file ").strip()
            (self.own / name).write_text(block.body, encoding="utf-8")
            self.saved.append(name)
            if block.lang == "yaml":
                yaml.safe_load(block.body)
            return
        if block.marker == "serve":
            self.serve(block)
        elif block.lang == "sh":
            self.check(["bash", "-euo", "pipefail", "-c", block.body], block)
        elif block.lang == "python":
            self.check([sys.executable, "-c", block.body], block)
        else:
            assert isinstance(yaml.safe_load(block.body), dict), f"{block.where}: not a mapping"

    def check(self, args: list[str], block: Block) -> None:
        done = subprocess.run(
            args,
            cwd=self.cwd_for(block),
            env=self.env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert done.returncode == 0, (
            f"{block.where} exited {done.returncode}:\n{block.body}\n--- stdout\n"
            f"{done.stdout[-4000:]}\n--- stderr\n{done.stderr[-4000:]}"
        )

    def serve(self, block: Block) -> None:
        """The block's one command in the background, until it serves; its address becomes the
        environment of the blocks after it, as the README tells the user to do."""
        [command] = [ln for ln in block.body.splitlines() if ln.strip()]
        self.stop()
        self.services += 1
        # serve runs in a terminal of its own: the variables are set where the user submits.
        serve_env = {k: v for k, v in self.env.items() if not k.startswith("BILEVEL_")}
        self.service = Tracked(
            ["bash", "-c", f"exec {command}"],
            cwd=self.cwd_for(block),
            env=serve_env,
            log=self.tmp_path / f"serve-{self.services}.log",
        )
        address = self.service.wait_for(SERVE_ADDRESS.pattern, timeout_s=240)
        url, namespace = address.group(1), address.group(2)
        self.service.wait_for(rf"bilevel serving namespace {re.escape(namespace)}", timeout_s=240)
        self.env |= {"BILEVEL_REDIS_URL": url, "BILEVEL_NAMESPACE": namespace}

    def stop(self) -> None:
        if self.service is None:
            return
        service, self.service = self.service, None
        code = service.stop()
        assert code == 0, service.output()[-4000:]
        assert not service.leftovers(), "processes of serve survived it"


def ray_temp_dirs() -> set[Path]:
    return set(Path("/tmp").glob("blray*"))


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_the_readme_runs_as_written(tmp_path: Path) -> None:
    """Quick start, client, own handlers, jobs and dead letters, simulate/evaluate/train: every
    block in order, each exiting 0, against the services the README's own serve blocks start."""
    before = ray_temp_dirs()
    session = ReadmeSession(tmp_path)
    try:
        for block in readme_blocks():
            session.run(block)
    finally:
        session.stop()
        # The local Rays those serves started kept their files in /tmp/blray*: remove this
        # test's (new since it started, and no process of this user names them any more).
        for directory in ray_temp_dirs() - before:
            if not processes_matching(str(directory)):
                shutil.rmtree(directory, ignore_errors=True)
    assert session.services == 2, "the README starts the demo service and the user's own"
    assert (session.checkout / "ckpt" / "mine.pt").is_file(), "train wrote no checkpoint"
