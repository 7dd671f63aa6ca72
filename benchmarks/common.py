"""What the benchmarks that run the live service share: the commit they measured and a local
Ray of their own."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def commit() -> str:
    """The checkout's commit, `-dirty` when it has uncommitted changes; "unknown" without git."""
    try:
        done = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return done.stdout.strip() or "unknown"


@contextlib.contextmanager
def bench_ray() -> Iterator[str]:
    """A local Ray in a temp dir of its own (yielded: the service's processes name it), shut
    down and removed at the end; workers import the repository's modules."""
    import ray

    ray_temp_dir = tempfile.mkdtemp(prefix="blbench", dir="/tmp")
    ray.init(
        _temp_dir=ray_temp_dir,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
        namespace="bilevel-bench",
        runtime_env={"env_vars": {"PYTHONPATH": str(REPO_ROOT)}},
    )
    try:
        yield ray_temp_dir
    finally:
        ray.shutdown()
        shutil.rmtree(ray_temp_dir, ignore_errors=True)


__all__ = ["REPO_ROOT", "bench_ray", "commit"]
