"""Loads the Lua job-store scripts and registers them with a Redis client.

A script line `-- @include NAME` is replaced by the file NAME from the same folder, so shared
fragments are written once (BullMQ's approach), and each script still runs as one atomic EVALSHA.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from redis.client import NEVER_DECODE
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

_INCLUDE = re.compile(r"^-- @include (\S+)$", re.MULTILINE)

SCRIPT_NAMES = (
    "submit",
    "enqueue",
    "promote",
    "lease",
    "heartbeat",
    "complete",
    "fail",
    "dead_letter",
    "cancel",
    "requeue_expired",
    "move",
    "stats",
    "watch",
    "results",
    "leader",
    "release",
    "peek",
    "stream_append",
    "stream_watch",
    "jobs",
    "replay",
    "purge",
)


_LUA_DIR = Path(__file__).parent / "lua"


def _read(name: str) -> str:
    return (_LUA_DIR / name).read_text(encoding="utf-8")


@cache
def script_source(name: str) -> str:
    """The full text of script `name`, includes spliced in."""
    if name not in SCRIPT_NAMES:
        raise ValueError(f"unknown store script {name!r}; known: {', '.join(SCRIPT_NAMES)}")
    return _INCLUDE.sub(lambda m: _read(m.group(1)), _read(f"{name}.lua"))


@dataclass(frozen=True, slots=True)
class Scripts:
    """Every store script, registered on one async Redis client (EVALSHA, reloaded on NOSCRIPT)."""

    submit: AsyncScript
    enqueue: AsyncScript
    promote: AsyncScript
    lease: AsyncScript
    heartbeat: AsyncScript
    complete: AsyncScript
    fail: AsyncScript
    dead_letter: AsyncScript
    cancel: AsyncScript
    requeue_expired: AsyncScript
    move: AsyncScript
    stats: AsyncScript
    watch: AsyncScript
    results: AsyncScript
    leader: AsyncScript
    release: AsyncScript
    peek: AsyncScript
    stream_append: AsyncScript
    stream_watch: AsyncScript
    jobs: AsyncScript
    replay: AsyncScript
    purge: AsyncScript

    @classmethod
    def register(cls, redis: Any) -> Scripts:
        return cls(**{name: redis.register_script(script_source(name)) for name in SCRIPT_NAMES})


async def run_raw(redis: Any, script: AsyncScript, keys: Sequence[str], args: Sequence[Any]) -> Any:
    """Run `script` as its own call does, but leave the reply's strings as bytes (redis-py's
    NEVER_DECODE). For replies carrying stored text: decoding the whole reply at once would fail
    on one value that is not UTF-8, so the caller decodes each value and judges it alone."""
    options = {NEVER_DECODE: True}
    try:
        return await redis.execute_command(
            "EVALSHA", script.sha, len(keys), *keys, *args, **options
        )
    except NoScriptError:
        # The server lost its script cache (a restart or SCRIPT FLUSH): load it again once.
        script.sha = await redis.script_load(script.script)
        return await redis.execute_command(
            "EVALSHA", script.sha, len(keys), *keys, *args, **options
        )
