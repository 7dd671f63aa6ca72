"""Evaluation and tuning episodes as Ray tasks (`bilevel evaluate/tune --workers N`).

`policies.evaluation` describes every (policy x seed) episode as an `EpisodeTask` and takes an
executor; here is the one that runs each task as a Ray task, and `episode_executor`, the context
the commands run in: a local Ray of N CPUs for N > 0 (its own temp dir, shut down on leaving), or
in-process for 0. Each episode is a pure function of its task, so both give the same numbers.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from policies.evaluation import EpisodeTask, MapEpisodes, RunOutcome, run_episode_task


def _episode_in_worker(task: EpisodeTask) -> RunOutcome:
    """One episode single-threaded (a learned policy's torch would otherwise start a thread per
    core in every worker, and they would fight over the cores)."""
    import torch

    torch.set_num_threads(1)
    return run_episode_task(task)


class RayEpisodes:
    """A `MapEpisodes` that runs each task as a Ray task (on the Ray the caller started) and
    returns the outcomes in task order; a task's trace goes to the object store once."""

    def __init__(self) -> None:
        import ray

        if not ray.is_initialized():
            raise RuntimeError("RayEpisodes needs ray.init() first")
        self._ray: Any = ray
        self._remote: Any = ray.remote(num_cpus=1)(_episode_in_worker)

    def __call__(
        self, tasks: Sequence[EpisodeTask], done: Callable[[int], None] | None = None
    ) -> list[RunOutcome]:
        refs = [self._remote.remote(task) for task in tasks]
        index = {ref: i for i, ref in enumerate(refs)}
        pending = list(refs)
        while pending:
            ready, pending = self._ray.wait(pending, num_returns=1)
            if done is not None:
                for ref in ready:
                    done(index[ref])
        outcomes: list[RunOutcome] = self._ray.get(refs)
        return outcomes


@contextlib.contextmanager
def episode_executor(workers: int) -> Iterator[MapEpisodes | None]:
    """The executor for `workers` parallel episodes: Ray tasks on a local Ray of that many CPUs,
    or None for 0 (the callers' in-process path, which draws each seed's jobs once for all its
    policies)."""
    if workers < 0:
        raise ValueError(f"--workers must be >= 0, got {workers}")
    if workers == 0:
        yield None
        return
    import ray

    ray.init(
        num_cpus=workers,
        include_dashboard=False,
        log_to_driver=False,
        _temp_dir=tempfile.mkdtemp(prefix="blepisodes", dir="/tmp"),
    )
    try:
        yield RayEpisodes()
    finally:
        ray.shutdown()
